"""Quality evaluation in MLX: feature models (FID InceptionV3, CLIP, DINOv2) and the metrics.

- `inception`, `clip_model`, `dinov2`: the networks, parity-tested against pytorch-fid and
  transformers; loaded strictly from folders made by `python -m convert --feature-model`.
- `images`: image folders and each model's preprocessing; `features`: batched extraction with
  a content-keyed cache; `scores`: FD, KID, CLIP score; `evaluate`/`cli`: `mlx-sd-eval`.
"""
