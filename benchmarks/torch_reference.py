"""The LoRA training step of a diffusers + PEFT trainer (the PyTorch way this project replaces; the
README's "Speed" section compares against it), for the benchmarks' torch workers.

Frozen UNet with PEFT LoRA r=8 alpha=16 (gaussian init) on to_k/to_q/to_v/to_out.0, AdamW at
lr 1e-4; one step: DDPM noise at uniform timesteps, UNet prediction, MSE vs the noise,
backward, gradient clipping at 1.0, optimizer step.
"""

import torch
from peft import LoraConfig


def add_lora(unet, gradient_checkpointing: bool):
    """Freeze `unet`, add the LoRA adapter; returns (trainable parameters, AdamW)."""
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=1e-4)


def train_step(unet, scheduler, params, optimizer, latents, context) -> torch.Tensor:
    noise = torch.randn_like(latents)
    ts = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    pred = unet(scheduler.add_noise(latents, noise, ts), ts, context).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss
