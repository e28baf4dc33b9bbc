"""MLX UNet vs diffusers' UNet2DConditionModel on the same weights and inputs (float32).

Tolerance: max|ours - ref| / max|ref| <= 1e-4 on tiny configs (measured ~2e-6) and <= 1e-3 on
the full SD1.5 shape (measured ~3e-6); both sides run float32 on the CPU, so the differences are
summation-order noise.
"""

import mlx_sd  # noqa: F401  (before mlx.core: installs the fast BLAS)

import mlx.core as mx
import mlx.nn as nn
import pytest
import torch
from mlx.utils import tree_flatten

from convert.layout import diffusers_to_mlx
from fixtures import SD15, TINY_UNET, _randomize_norms, nhwc, rel_err
from mlx_sd.config import UNetConfig, read_json
from mlx_sd.unet import ResnetBlock2D, Transformer2DModel, UNet2DConditionModel, load_unet
from mlx_sd.weights import load_strict

TOL = 1e-4


def converted_state_dict(torch_model) -> dict:
    return diffusers_to_mlx("unet", {k: mx.array(v.detach().numpy()) for k, v in torch_model.state_dict().items()})


def mlx_twin(torch_unet) -> UNet2DConditionModel:
    """Our UNet built from the diffusers model's config, carrying its weights."""
    config = UNetConfig.from_diffusers(dict(torch_unet.config))
    return load_strict(UNet2DConditionModel(config), converted_state_dict(torch_unet))


def nchw_to_nhwc(t: torch.Tensor) -> mx.array:
    return mx.array(t.numpy().transpose(0, 2, 3, 1))




def compare(torch_unet, unet, batch: int, size: tuple[int, int], timesteps, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    h, w = size
    x = torch.randn(batch, torch_unet.config.in_channels, h, w, generator=g)
    ctx = torch.randn(batch, 77, torch_unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(timesteps)
    with torch.no_grad():
        ref = torch_unet(x, t, ctx).sample
    ours = unet(nchw_to_nhwc(x), mx.array(t.numpy()), mx.array(ctx.numpy()))
    assert ours.shape == (batch, h, w, torch_unet.config.out_channels)
    err = rel_err(ours, nhwc(ref))
    print(f"UNet parity {tuple(torch_unet.config.block_out_channels)} t={timesteps}: relative max error {err:.2e}")
    return err


@pytest.fixture(scope="module")
def tiny_pair(tiny_diffusers_dir):
    from diffusers import UNet2DConditionModel as TorchUNet

    torch_unet = TorchUNet.from_pretrained(tiny_diffusers_dir / "unet").eval()
    return torch_unet, mlx_twin(torch_unet)


def test_key_coverage(tiny_pair):
    torch_unet, unet = tiny_pair
    converted = set(converted_state_dict(torch_unet))
    ours = set(dict(tree_flatten(unet.parameters())))
    assert converted - ours == set(), "diffusers keys the MLX UNet lacks"
    assert ours - converted == set(), "MLX UNet keys diffusers lacks"


def test_lora_targets_are_swappable_linears(tiny_pair):
    _, unet = tiny_pair
    modules = dict(unet.named_modules())
    names = [n for n in modules if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    # 16 transformers (3x2 down, 1 mid, 3x3 up) x (attn1, attn2) x 4 projections: SD1.5's 128.
    assert len(names) == 128
    assert all(type(modules[n]) is nn.Linear for n in names)


@pytest.mark.parametrize("timesteps", [(0, 999), (999, 0), (37, 500), (250.5, 999.0)])
def test_parity_tiny(tiny_pair, timesteps):
    torch_unet, unet = tiny_pair
    # Non-square 16x24 so a swapped H/W shows up; batch elements get different timesteps.
    err = compare(torch_unet, unet, batch=2, size=(16, 24), timesteps=list(timesteps))
    assert err <= TOL, f"relative max error {err:.2e} > {TOL}"


def test_scalar_timestep_broadcasts(tiny_pair):
    _, unet = tiny_pair
    x = mx.random.normal((2, 16, 16, 4), key=mx.random.key(1))
    ctx = mx.random.normal((2, 77, 32), key=mx.random.key(2))
    a = unet(x, 321, ctx)
    b = unet(x, mx.array([321, 321]), ctx)
    assert mx.array_equal(a, b)
    with pytest.raises(ValueError, match="divisible by 8"):
        unet(x[:, :12], 321, ctx)


def test_load_unet_from_folder(tiny_pair, tiny_diffusers_dir, tmp_path):
    torch_unet, unet = tiny_pair
    mx.save_safetensors(str(tmp_path / "model.safetensors"), converted_state_dict(torch_unet))
    (tmp_path / "config.json").write_text((tiny_diffusers_dir / "unet" / "config.json").read_text())
    loaded = load_unet(tmp_path)
    x = mx.random.normal((1, 16, 16, 4), key=mx.random.key(3))
    ctx = mx.random.normal((1, 77, 32), key=mx.random.key(4))
    assert mx.array_equal(loaded(x, 10, ctx), unet(x, 10, ctx))


def test_parity_sd2_shaped_config():
    """SD2.x quirks: use_linear_projection, per-block `attention_head_dim` list, upcast_attention.

    diffusers reads `attention_head_dim` as the number of *heads* per block (the field is
    misnamed; see UNet2DConditionModel.__init__), reversed for the up blocks. Distinct counts per
    block make a wrong reading or a missing reversal change the output. Uneven
    `transformer_layers_per_block` checks those are reversed for the up path too.
    """
    from diffusers import UNet2DConditionModel as TorchUNet

    cfg = dict(TINY_UNET, use_linear_projection=True, attention_head_dim=[1, 2, 4, 8], upcast_attention=True,
               cross_attention_dim=48, transformer_layers_per_block=[1, 2, 1, 2])
    torch.manual_seed(5)
    torch_unet = TorchUNet(**cfg).eval()
    _randomize_norms(torch_unet, torch.Generator().manual_seed(6))
    unet = mlx_twin(torch_unet)
    assert unet.config.num_attention_heads == (1, 2, 4, 8)
    assert unet.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 8
    assert [b.attentions[0].transformer_blocks[0].attn1.heads for b in unet.up_blocks[1:]] == [4, 2, 1]
    err = compare(torch_unet, unet, batch=2, size=(16, 16), timesteps=[0, 999], seed=7)
    assert err <= TOL, f"relative max error {err:.2e} > {TOL}"


@pytest.mark.slow
def test_parity_full_sd15_shape():
    """The real SD1.5 UNet config (320/640/1280/1280, 8 heads, context 768), random weights, 32x32."""
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    torch_unet = TorchUNet.from_config(read_json(SD15 / "unet" / "config.json")).eval()
    unet = mlx_twin(torch_unet)
    assert unet.config.block_out_channels == (320, 640, 1280, 1280)
    assert sum(v.size for _, v in tree_flatten(unet.parameters())) == 859_520_964
    err = compare(torch_unet, unet, batch=1, size=(32, 32), timesteps=[421])
    assert err <= 1e-3, f"relative max error {err:.2e} > 1e-3"


def test_gradient_checkpointing_same_loss_and_grads_less_memory(tiny_pair):
    unet = mlx_twin(tiny_pair[0])  # a separate copy: the shared one stays without checkpointing
    assert unet.gradient_checkpointing is False
    blocks = [m for _, m in unet.named_modules() if isinstance(m, (ResnetBlock2D, Transformer2DModel))]
    assert len(blocks) == 8 + 2 + 12 + 16  # resnets (down, mid, up) + transformers

    k = mx.random.split(mx.random.key(0), 3)
    x = mx.random.normal((2, 32, 32, 4), key=k[0])
    ctx = mx.random.normal((2, 77, 32), key=k[1])
    target = mx.random.normal((2, 32, 32, 4), key=k[2])
    t = mx.array([3, 700])

    def loss_fn(x, t, ctx, target):
        return ((unet(x, t, ctx) - target) ** 2).mean()

    value_and_grad = nn.value_and_grad(unet, loss_fn)
    results = {}
    for on in (False, True):
        unet.gradient_checkpointing = on
        assert all(b.gradient_checkpointing is on for b in blocks)
        mx.reset_peak_memory()
        loss, grads = value_and_grad(x, t, ctx, target)
        mx.eval(loss, grads)
        results[on] = (loss.item(), dict(tree_flatten(grads)), mx.get_peak_memory())

    (loss0, g0, peak0), (loss1, g1, peak1) = results[False], results[True]
    assert abs(loss1 - loss0) <= 1e-5 * abs(loss0)
    assert g0.keys() == g1.keys() and len(g0) == len(tree_flatten(unet.parameters()))
    # Each tensor must agree to 1e-5 of its own largest gradient. Some gradients are 0 by
    # construction (a per-channel bias right before a GroupNorm with one channel per group) and
    # hold rounding noise of about float32's epsilon times the largest gradient (measured up to
    # 1.2e-7 of it), hence the absolute floor of 1e-6 of the largest gradient.
    scale = max(float(mx.abs(g).max()) for g in g0.values())
    diff = {n: float(mx.abs(g1[n] - g0[n]).max()) for n in g0}
    ref = {n: float(mx.abs(g0[n]).max()) for n in g0}
    bad = [n for n in g0 if diff[n] > 1e-5 * ref[n] + 1e-6 * scale]
    assert not bad, f"gradients differ (largest {scale:.3e}): {[(n, diff[n], ref[n]) for n in bad[:5]]}"
    worst = max(diff[n] / ref[n] for n in g0 if ref[n] > 1e-3 * scale)
    print(f"gradient checkpointing: worst relative gradient difference {worst:.2e}")
    # Checkpointing must actually drop activations (measured ~2.5x lower peak here).
    assert peak1 < 0.7 * peak0, f"peak memory {peak1 / 1e6:.0f} MB with checkpointing vs {peak0 / 1e6:.0f} MB"



def test_checkpointing_keeps_large_self_attention_out_of_the_recompute(tiny_pair, monkeypatch):
    """Under checkpointing, a self-attention over >= `attention_chunk` tokens runs once per step
    (its own backward recomputes the probabilities); shorter ones and cross-attention run again
    in the recomputation. Same gradients as without checkpointing either way (test above)."""
    import mlx_sd.unet as unet_module

    unet = mlx_twin(tiny_pair[0])
    calls = []
    real = unet_module.attention

    def counting(q, k, v, *args, **kwargs):
        calls.append((q.shape[2], k.shape[2]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(unet_module, "attention", counting)
    x = mx.random.normal((1, 32, 32, 4), key=mx.random.key(1))
    ctx = mx.random.normal((1, 77, 32), key=mx.random.key(2))
    loss_fn = lambda x, ctx: unet(x, mx.array([500]), ctx).sum()  # noqa: E731

    counts = {}
    for on in (False, True):
        unet.gradient_checkpointing = on
        calls.clear()
        mx.eval(nn.value_and_grad(unet, loss_fn)(x, ctx))
        counts[on] = {pair: calls.count(pair) for pair in set(calls)}

    once = counts[False]  # without checkpointing every attention runs once
    assert unet.attention_chunk == 1024 and (1024, 1024) in once and any(q < 1024 for q, _ in once)
    for (q, k), n in once.items():
        kept = q == k and q >= unet.attention_chunk
        expected = n if kept else 2 * n
        assert counts[True][(q,
                             k)] == expected, f"attention {q}x{k} ran {counts[True][(q, k)]} times, expected {expected}"
