"""Feature extraction speed: MLX vs the torch references, same weights, same batch, one run.

InceptionV3 (pytorch-fid's network, input already 299 px), CLIP ViT-L/14 image tower + projection
(transformers CLIPModel.get_image_features, 224 px) and DINOv2 ViT-L/14 (transformers Dinov2Model,
224 px), random seeded weights, float32. Each timing is the median of `--repeats` forward passes
after one warm-up; images/s = batch / time; the ratio is MLX images/s over torch images/s (above 1:
MLX is faster). Peak memory: MLX's own accounting (`mx.get_peak_memory`, reset per model) and the
process's peak RSS after the torch model ran (benchmarks/rss.py), which includes everything
loaded before. On Linux these are CPU figures; see the README's "Speed" section for what carries
over to Apple Silicon.

    python benchmarks/feature_speed.py --batch 8 --repeats 3
"""

import mlx_sd  # noqa: F401, I001  (first: puts the fast BLAS under MLX before mlx.core loads)

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # metrics_reference: the seeded twins

from models import median_seconds  # benchmarks/models.py (this folder is on sys.path)
from rss import peak_rss_gb  # benchmarks/rss.py

from convert.feature_models import clip_to_mlx, dinov2_to_mlx, inception_to_mlx
from mlx_sd.blas import status as blas_status
from mlx_sd.metrics.clip_model import CLIPModel, CLIPModelConfig
from mlx_sd.metrics.dinov2 import Dinov2Config, Dinov2Model
from mlx_sd.metrics.inception import FIDInceptionV3
from mlx_sd.weights import load_strict


def to_mx(state) -> dict:
    return {k: mx.array(v.detach().float().numpy()) for k, v in state.items()}


def inception_pair():
    from metrics_reference import random_inception_state, reference_inception

    state = random_inception_state(0)
    ref = reference_inception(state)
    ours = load_strict(FIDInceptionV3(), inception_to_mlx(to_mx(state)))
    return (lambda x: ref(x)[0]), ours.pool3, 299


def clip_pair():
    from metrics_reference import CLIP_L14_TEXT, CLIP_L14_VISION
    from transformers import CLIPConfig
    from transformers import CLIPModel as Ref

    torch.manual_seed(0)
    vision = {k: v for k, v in CLIP_L14_VISION.items() if k != "projection_dim"}
    text = {k: v for k, v in CLIP_L14_TEXT.items() if k != "projection_dim"}
    ref = Ref(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).eval()
    ours = load_strict(CLIPModel(CLIPModelConfig.from_transformers(ref.config.to_dict())),
                       clip_to_mlx(to_mx(ref.state_dict())))
    return (lambda x: ref.get_image_features(pixel_values=x)), ours.image_embeds, 224


def dinov2_pair():
    from metrics_reference import DINOV2_L14
    from transformers import Dinov2Config as RefConfig
    from transformers import Dinov2Model as Ref

    torch.manual_seed(0)
    ref = Ref(RefConfig(**DINOV2_L14)).eval()
    ours = load_strict(Dinov2Model(Dinov2Config.from_transformers(ref.config.to_dict())),
                       dinov2_to_mlx(to_mx(ref.state_dict())))
    return (lambda x: ref(pixel_values=x).pooler_output), ours, 224


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="images per forward pass (both frameworks)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (after one warm-up)")
    p.add_argument("--models", nargs="+", default=["inception", "clip", "dinov2"], help="which models")
    args = p.parse_args()
    print(f"MLX {mx.__version__} on {mx.default_device()}, BLAS: {blas_status().describe()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32, batch {args.batch}, "
          f"median of {args.repeats} after 1 warm-up\n")
    pairs = {"inception": ("InceptionV3 (FID), 299 px", inception_pair),
             "clip": ("CLIP ViT-L/14 image tower, 224 px", clip_pair),
             "dinov2": ("DINOv2 ViT-L/14, 224 px", dinov2_pair)}
    header = (f"{'model':<36} {'MLX img/s':>10} {'torch img/s':>12} {'MLX/torch':>10} {'MLX peak GB':>12} "
              f"{'process peak RSS GB':>20}")
    print(header, flush=True)
    for name in args.models:
        label, make = pairs[name]
        ref, ours, size = make()
        x = np.random.default_rng(0).uniform(-1, 1, (args.batch, 3, size, size)).astype(np.float32)
        xt, xm = torch.from_numpy(x), mx.array(x.transpose(0, 2, 3, 1))
        mx.reset_peak_memory()
        t_ours = median_seconds(lambda f=ours, x=xm: mx.eval(f(x)), args.repeats)
        peak_mlx = mx.get_peak_memory() / 1e9
        with torch.no_grad():
            t_ref = median_seconds(lambda f=ref, x=xt: f(x), args.repeats)
        rss = peak_rss_gb()
        a, b = args.batch / t_ours, args.batch / t_ref
        print(f"{label:<36} {a:>10.2f} {b:>12.2f} {a / b:>10.2f} {peak_mlx:>12.2f} {rss:>20.2f}", flush=True)
        del ref, ours


if __name__ == "__main__":
    main()
