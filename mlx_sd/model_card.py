"""`lora_weights/README.md`: a Hugging Face model card, so the folder uploads as a complete repo.

    huggingface-cli upload user/shoe-lora runs/shoes/lora_weights

The card has the Hub's YAML metadata (base model, license, tags, the validation grid as widget
image, the trigger words) and says what was trained on what, with which settings, and how to load
the adapter in diffusers, PEFT, ComfyUI / A1111 and mlx-sd-generate. Metadata values are written
as JSON strings, which YAML reads as double-quoted scalars.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

from .io import atomic_file, is_repo_id, write_text

CARD = "README.md"
WIDGET_IMAGE = "validation_grid.png"
SD15_LICENSE = "creativeml-openrail-m"


def trigger_words(captions: list[str], keep_tokens: int, separator: str = ",") -> list[str]:
    """The tags kept in front of every shuffled caption (--keep_tokens), most frequent first."""
    if not keep_tokens:
        return []
    heads = Counter(", ".join(t.strip() for t in c.split(separator)[:keep_tokens]) for c in captions)
    return [h for h, n in heads.most_common(3) if n >= max(2, len(captions) // 10)] or [heads.most_common(1)[0][0]]


def _settings(cfg: dict, steps: int) -> list[tuple[str, str]]:
    batch = cfg.get("train_batch_size", 1) * cfg.get("world_size", 1)
    accum = cfg.get("gradient_accumulation_steps", 1)
    rows = [
        ("updates", f"{steps}"),
        ("images per update", f"{batch * accum} ({cfg.get('train_batch_size')} per micro-batch x {accum} "
                              f"accumulation x {cfg.get('world_size', 1)} rank(s))"),
        ("resolution", f"{cfg.get('resolution')}" + (" (aspect-ratio buckets)" if cfg.get("enable_bucket") else "")),
        ("learning rate", f"{cfg.get('learning_rate')} ({cfg.get('lr_scheduler')}, {cfg.get('lr_warmup_steps')} "
                          "warm-up updates)"),
        ("LoRA", f"rank {cfg.get('lora_rank')}, alpha {cfg.get('lora_alpha')}, dropout {cfg.get('lora_dropout')}, on "
                 f"{', '.join(cfg.get('lora_targets') or [])}"),
        ("text encoder", "LoRA trained" + (f" (learning rate {cfg['text_encoder_lr']})" if cfg.get("text_encoder_lr")
                                           else "") if cfg.get("train_text_encoder") else "frozen"),
        ("optimizer", f"AdamW (betas {cfg.get('adam_beta1')}, {cfg.get('adam_beta2')}, weight decay "
                      f"{cfg.get('adam_weight_decay')}), gradient clipping {cfg.get('max_grad_norm')}"),
        ("precision", f"float32 adapter, {cfg.get('base_dtype', 'float32')} base weights"),
        ("seed", f"{cfg.get('seed')}"),
    ]
    extras = [f"{k} {cfg[k]}" for k in ("snr_gamma", "noise_offset", "caption_dropout_rate") if cfg.get(k)]
    if cfg.get("shuffle_caption"):
        extras.append(f"tags shuffled (first {cfg.get('keep_tokens', 0)} kept)")
    if cfg.get("random_flip"):
        extras.append("random flips")
    if extras:
        rows.append(("also", ", ".join(extras)))
    return rows


def write_model_card(out_dir: Path, config: dict, steps: int, captions: list[str], prompts: list[str],
                     grid: Path | None = None, files: dict[str, Path] | None = None) -> Path:
    """Write `out_dir/README.md` (and the validation grid beside it); returns the card's path."""
    out_dir = Path(out_dir)
    # A converted folder remembers the Hub id it came from ("model"); a path is shown as given.
    base = next((str(b) for b in (config.get("model"), config.get("pretrained_model_name_or_path"))
                 if b and is_repo_id(str(b))), str(config.get("pretrained_model_name_or_path") or ""))
    trigger = trigger_words(captions, config.get("keep_tokens", 0), config.get("caption_separator", ","))
    widget = grid is not None and Path(grid).is_file()
    if widget:
        with atomic_file(out_dir / WIDGET_IMAGE) as tmp:
            shutil.copyfile(grid, tmp)

    meta = []
    if is_repo_id(base):
        meta.append(f"base_model: {json.dumps(base)}")
    meta += [f"license: {SD15_LICENSE}", "library_name: diffusers", "tags:"]
    meta += [f"- {t}" for t in ("stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers",
                                "lora", "mlx", "mlx-sd-lora")]
    meta.append("inference: true")
    if trigger:
        meta.append(f"instance_prompt: {json.dumps(trigger[0], ensure_ascii=False)}")
    if widget and prompts:
        meta.append("widget:")
        for p in prompts:
            meta += [f"- text: {json.dumps(p, ensure_ascii=False)}", "  output:", f"    url: {WIDGET_IMAGE}"]

    name = Path(str(config.get("output_dir", out_dir.parent))).name or "adapter"
    source = config.get("dataset_name") or Path(str(config.get("train_data_dir", "the training folder"))).name
    distinct = len(set(captions))
    examples = "\n".join(f"- {json.dumps(c, ensure_ascii=False)}" for c in sorted(set(captions))[:5])
    settings = "\n".join(f"| {k} | {v} |" for k, v in _settings(config, steps))
    files = files or {}
    listed = "\n".join(f"| `{Path(p).name}` | {what} |" for what, p in (
        ("diffusers (`load_lora_weights`)", files.get("diffusers")), ("PEFT (with `adapter_config.json`)",
                                                                       files.get("peft")),
        ("kohya: ComfyUI, A1111, kohya sd-scripts", files.get("kohya"))) if p)
    if files.get("peft_text_encoder"):  # PEFT keeps it in a folder of its own
        listed += ("\n| `text_encoder/` | PEFT: the text encoder's LoRA "
                   "(`PeftModel.from_pretrained(text_encoder, ...)`) |")
    weight = Path(files["kohya"]).stem if files.get("kohya") else "lora_kohya"
    example = prompts[0] if prompts else (trigger[0] if trigger else (captions[0] if captions else "a photo"))
    base_load = base if is_repo_id(base) else "stable-diffusion-v1-5/stable-diffusion-v1-5"

    base_dtype = config.get("base_dtype") or "float32"
    body = f"""# {name}: a LoRA for Stable Diffusion 1.5

A LoRA adapter for `{base}`, trained with mlx-sd-lora (MLX; float32 adapter on {base_dtype} base weights) on
{len(captions)} images from {source} ({distinct} distinct captions).
{("Trigger words: " + ", ".join(f"`{t}`" for t in trigger) + " (at the start of every caption).") if trigger else ""}

Example captions:
{examples}

{f"![validation images]({WIDGET_IMAGE})" if widget else ""}

## Training settings

| setting | value |
| --- | --- |
{settings}

## Files

| file | loaded by |
| --- | --- |
{listed}

ComfyUI and A1111 load `lora_kohya.safetensors` completely. Do not give them the diffusers file: ComfyUI
skips its UNet keys without an error and applies a trained text encoder's keys at scale 1.0 (alpha is only
in the file's metadata), which is neither the adapter nor the base model.

## Use it

diffusers:

```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base_load}", torch_dtype=torch.float16).to("mps")
pipe.load_lora_weights("path/or/hub-id-of-this-folder", weight_name="pytorch_lora_weights.safetensors")
image = pipe({json.dumps(example, ensure_ascii=False)}, num_inference_steps=25, guidance_scale=7.5).images[0]
```

ComfyUI: copy `lora_kohya.safetensors` to `ComfyUI/models/loras/` and add a LoraLoader node.
A1111: copy it to `stable-diffusion-webui/models/Lora/` and write `<lora:{weight}:0.8>` in the prompt.

mlx-sd-generate:

```bash
mlx-sd-generate --model {base_load} --lora path/to/this/folder:0.8 \\
    --prompt {json.dumps(example, ensure_ascii=False)} --output_dir samples
```
"""
    body = re.sub(r"\n{3,}", "\n\n", body)  # the lines left empty when there is no trigger or grid
    write_text(out_dir / CARD, "---\n" + "\n".join(meta) + "\n---\n\n" + body)
    return out_dir / CARD
