"""The studio: a local web page for training runs and blind A/B human evaluation.

Optional: it needs the `studio` extra (starlette, uvicorn) and nothing in training imports it.
`mlx-sd-studio RUN_DIR ...` starts it (see `mlx_sd.studio.server`).
"""
