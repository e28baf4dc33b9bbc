"""MLX AutoencoderKL vs diffusers' on the same weights and inputs (float32).

Tolerance: max|ours - ref| / max|ref| <= 1e-4 (measured ~2e-6 for encode, ~5e-6 for decode).
"""

import mlx_sd  # noqa: F401  (before mlx.core: installs the fast BLAS)

import re

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from convert.layout import diffusers_to_mlx
from mlx_sd.config import VAEConfig
from mlx_sd.vae import AutoencoderKL, load_vae
from mlx_sd.weights import load_strict
from fixtures import nhwc, rel_err

TOL = 1e-4


def to_mx(state_dict) -> dict:
    return {k: mx.array(v.detach().numpy()) for k, v in state_dict.items()}




@pytest.fixture(scope="module")
def tiny_pair(tiny_diffusers_dir):
    from diffusers import AutoencoderKL as TorchVAE

    torch_vae = TorchVAE.from_pretrained(tiny_diffusers_dir / "vae").eval()
    vae = AutoencoderKL(VAEConfig.from_diffusers(dict(torch_vae.config)))
    load_strict(vae, diffusers_to_mlx("vae", to_mx(torch_vae.state_dict())))
    return torch_vae, vae


@pytest.fixture(scope="module")
def image():
    # Non-square, batch 2, in [-1, 1].
    return torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_key_coverage(tiny_pair):
    torch_vae, vae = tiny_pair
    converted = set(diffusers_to_mlx("vae", to_mx(torch_vae.state_dict())))
    ours = set(dict(tree_flatten(vae.parameters())))
    assert converted - ours == set(), "diffusers keys the MLX VAE lacks"
    assert ours - converted == set(), "MLX VAE keys diffusers lacks"


def test_encode_parity(tiny_pair, image):
    torch_vae, vae = tiny_pair
    with torch.no_grad():
        dist = torch_vae.encode(image).latent_dist
    mean, logvar = vae.encode(mx.array(image.numpy().transpose(0, 2, 3, 1)))
    assert mean.shape == logvar.shape == (2, 4, 6, 4)
    for name, ours, ref in (("mean", mean, dist.mean), ("logvar", logvar, dist.logvar)):
        err = rel_err(ours, nhwc(ref))
        print(f"VAE encode {name}: relative max error {err:.2e}")
        assert err <= TOL, f"{name}: relative max error {err:.2e} > {TOL}"


def test_decode_parity(tiny_pair):
    torch_vae, vae = tiny_pair
    z = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch_vae.decode(z).sample
    ours = vae.decode(mx.array(z.numpy().transpose(0, 2, 3, 1)))
    assert ours.shape == (2, 32, 48, 3)
    err = rel_err(ours, nhwc(ref))
    print(f"VAE decode: relative max error {err:.2e}")
    assert err <= TOL, f"relative max error {err:.2e} > {TOL}"


def test_sample_and_scaling_factor(tiny_pair):
    _, vae = tiny_pair
    mean = mx.zeros((1, 64, 64, 4))
    # sample = mean + exp(logvar / 2) * N(0, 1): with logvar = log 4 the std is 2.
    z = vae.sample(mean, mx.full(mean.shape, float(np.log(4.0))), key=mx.random.key(0))
    assert abs(float(z.std()) - 2.0) < 0.05
    assert mx.array_equal(vae.sample(mean, mean, key=mx.random.key(3)), vae.sample(mean, mean, key=mx.random.key(3)))
    assert vae.scaling_factor == 0.18215


def test_clip_bounds():
    """The clamp itself: a huge encoder output must come back as [-30, 20], like diffusers."""
    vae = AutoencoderKL(VAEConfig(block_out_channels=(32,), layers_per_block=1))
    c = vae.quant_conv
    c.weight = mx.zeros_like(c.weight)
    c.bias = mx.array([0.0, 0.0, 0.0, 0.0, 1e3, -1e3, 5.0, 0.0])
    _, logvar = vae.encode(mx.zeros((1, 8, 8, 3)))
    assert logvar[0, 0, 0].tolist() == [20.0, -30.0, 5.0, 0.0]


def test_old_attention_names_convert(tiny_pair, image):
    """Old checkpoints (the published SD1.5 VAE) name the mid-block attention query/key/value/proj_attn."""
    torch_vae, vae = tiny_pair
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in torch_vae.state_dict().items():
        m = re.match(r"^(.*\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", k)
        if m:
            k = f"{m.group(1)}.{new_to_old[m.group(2)]}.{m.group(3)}"
            # Very old checkpoints stored these Linear weights as 1x1 convs.
            if k.endswith("weight") and m.group(2) in ("to_q", "to_out.0"):
                v = v[:, :, None, None]
        old[k] = v
    renamed = [k for k in old if re.search(r"\.(query|key|value|proj_attn)\.", k)]
    assert len(renamed) == 2 * 4 * 2  # encoder + decoder mid attention, 4 projections, weight + bias

    fresh = AutoencoderKL(vae.config)
    load_strict(fresh, diffusers_to_mlx("vae", to_mx(old)))
    x = mx.array(image.numpy().transpose(0, 2, 3, 1))
    for a, b in zip(fresh.encode(x), vae.encode(x)):
        assert mx.array_equal(a, b)
    z = mx.random.normal((1, 4, 4, 4), key=mx.random.key(2))
    assert mx.array_equal(fresh.decode(z), vae.decode(z))


def test_load_vae_from_folder(tiny_pair, tiny_diffusers_dir, tmp_path):
    torch_vae, vae = tiny_pair
    mx.save_safetensors(str(tmp_path / "model.safetensors"), diffusers_to_mlx("vae", to_mx(torch_vae.state_dict())))
    (tmp_path / "config.json").write_text((tiny_diffusers_dir / "vae" / "config.json").read_text())
    loaded = load_vae(tmp_path)
    z = mx.random.normal((1, 4, 4, 4), key=mx.random.key(5))
    assert mx.array_equal(loaded.decode(z), vae.decode(z))
