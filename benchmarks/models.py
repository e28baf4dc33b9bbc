"""UNet forward and VAE encode: MLX vs diffusers (torch), same weights, same shapes, one run.

SD1.5 shapes (the bundled mlx_sd/configs/sd15) with random (seeded) weights, float32, batch 1.
Each timing is the median of `--repeats` runs after one warm-up run. The ratio is MLX time / torch time (below 1:
MLX is faster). On Linux these are CPU figures; see the README's "Speed" section for what carries
over to Apple Silicon.

    python benchmarks/models.py --sizes 256 512 --repeats 3
"""

import mlx_sd  # noqa: F401, I001  (first: puts the fast BLAS under MLX before mlx.core loads)

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np
import torch

from convert.layout import diffusers_to_mlx
from mlx_sd.blas import status as blas_status
from mlx_sd.config import UNetConfig, VAEConfig, read_json
from mlx_sd.configs import SD15
from mlx_sd.unet import UNet2DConditionModel
from mlx_sd.vae import AutoencoderKL
from mlx_sd.weights import load_strict


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, lazy init, BLAS thread pools
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def twins(name: str):
    """(torch model, MLX model) with identical random weights."""
    from diffusers import AutoencoderKL as TorchVAE, UNet2DConditionModel as TorchUNet

    config = read_json(SD15 / name / "config.json")
    torch.manual_seed(0)
    if name == "unet":
        ref, ours = TorchUNet.from_config(config), UNet2DConditionModel(UNetConfig.from_diffusers(config))
    else:
        ref, ours = TorchVAE.from_config(config), AutoencoderKL(VAEConfig.from_diffusers(config))
    ref.eval()
    load_strict(ours, diffusers_to_mlx(name, {k: mx.array(v.numpy()) for k, v in ref.state_dict().items()}))
    mx.eval(ours.parameters())
    return ref, ours


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes in pixels (latent = size/8)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (after one warm-up)")
    p.add_argument("--compile", action="store_true", help="also time the MLX UNet under mx.compile")
    args = p.parse_args()

    print(f"MLX {mx.__version__} on {mx.default_device()}, BLAS: {blas_status().describe()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32, batch 1, "
          f"median of {args.repeats} after 1 warm-up\n")

    torch_unet, unet = twins("unet")
    torch_vae, vae = twins("vae")
    compiled_unet = mx.compile(unet) if args.compile else None
    rng = np.random.default_rng(0)
    rows = []
    for size in args.sizes:
        lat = size // 8
        x = rng.standard_normal((1, 4, lat, lat), dtype=np.float32)
        ctx = rng.standard_normal((1, 77, 768), dtype=np.float32)
        img = rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
        x_t, ctx_t, img_t, t_t = map(torch.from_numpy, (x, ctx, img, np.array([500])))
        x_m, img_m = mx.array(x.transpose(0, 2, 3, 1)), mx.array(img.transpose(0, 2, 3, 1))
        ctx_m, t_m = mx.array(ctx), mx.array([500])

        with torch.no_grad():
            ref_unet = median_seconds(lambda: torch_unet(x_t, t_t, ctx_t), args.repeats)
            ref_vae = median_seconds(lambda: torch_vae.encode(img_t).latent_dist.mean, args.repeats)
        ours_unet = median_seconds(lambda: mx.eval(unet(x_m, t_m, ctx_m)), args.repeats)
        ours_vae = median_seconds(lambda: mx.eval(vae.encode(img_m)), args.repeats)
        rows.append((f"UNet forward {size}px ({lat}x{lat} latent)", ours_unet, ref_unet))
        if compiled_unet is not None:
            ours_c = median_seconds(lambda: mx.eval(compiled_unet(x_m, t_m, ctx_m)), args.repeats)
            rows.append((f"UNet forward {size}px, mx.compile", ours_c, ref_unet))
        rows.append((f"VAE encode {size}px", ours_vae, ref_vae))

    print(f"{'measurement':<40} {'MLX s':>9} {'torch s':>9} {'MLX/torch':>10}")
    for name, ours, ref in rows:
        print(f"{name:<40} {ours:>9.3f} {ref:>9.3f} {ours / ref:>10.2f}")


if __name__ == "__main__":
    main()
