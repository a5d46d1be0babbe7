"""DaViT on attnzoo kernels against timm's own DaVit class with the same weights; the timm model surface."""
from __future__ import annotations

import re

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import davit as timm_davit

from attnzoo.backbones.davit import DaVit, WindowAttention
from attnzoo.kernels import trace, use_backend

from ._reference import noisy_padding

SLOW = pytest.mark.slow
# (name, input size): timm zero-pads to the window without a mask, so compare at sizes whose maps tile it
MODELS = [
    ("davit_tiny", 224),
    pytest.param("davit_small", 224, marks=SLOW),
    pytest.param("davit_base", 224, marks=SLOW),
    pytest.param("davit_large", 224, marks=SLOW),
    pytest.param("davit_huge", 224, marks=SLOW),
    pytest.param("davit_giant", 224, marks=SLOW),
    pytest.param("davit_base_fl", 384, marks=SLOW),  # window 12: maps 96, 48, 24, 12
    pytest.param("davit_huge_fl", 384, marks=SLOW),
]
TINY = dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128), num_heads=(2, 2, 2, 4), num_classes=10)


def _pair(name: str, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """timm's own class (its module function bypasses the registry, which now points at ours) and ours, with
    timm's weights loaded strictly into ours."""
    torch.manual_seed(0)
    ref = getattr(timm_davit, name)(**kwargs).eval()
    ours = timm.create_model(name, **kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _small_model(**kwargs) -> DaVit:
    torch.manual_seed(0)
    return timm.create_model("davit_tiny", **dict(TINY, **kwargs))


def test_registry_points_at_ours_with_timms_tags():
    for name in ("davit_tiny", "davit_small", "davit_base", "davit_large", "davit_huge", "davit_giant",
                 "davit_base_fl", "davit_huge_fl"):
        assert timm.models.model_entrypoint(name).__module__ == "attnzoo.backbones.davit"
    assert set(timm.list_pretrained("davit_*")) >= {
        "davit_tiny.msft_in1k", "davit_small.msft_in1k", "davit_base.msft_in1k",
        "davit_base_fl.msft_florence2", "davit_huge_fl.msft_florence2"}
    for name in ("davit_tiny", "davit_small", "davit_base"):
        assert timm.models.get_pretrained_cfg(f"{name}.msft_in1k").hf_hub_id == f"timm/{name}.msft_in1k"


@pytest.mark.parametrize("name,size", MODELS)
def test_matches_timm(name, size):
    ref, ours = _pair(name)
    assert type(ref) is timm_davit.DaVit and type(ours) is DaVit
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_backend("torch"):
        assert list(ours.state_dict()) == list(ref.state_dict())
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-4
        del ref, ours
        ref_f, ours_f = _pair(name, features_only=True)
        assert ours_f.feature_info.get_dicts() == ref_f.feature_info.get_dicts()
        for a, b in zip(ours_f(x), ref_f(x), strict=True):
            # the residual stream of a randomly initialised deep stage grows to ~1e3: 1e-4 relative there
            assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


def test_pretrained_from_hub_puts_timms_weights_in_ours(offline_hub):
    ref = timm_davit.davit_tiny()
    offline_hub("timm/davit_tiny.msft_in1k", ref.state_dict())
    ours = timm.create_model("davit_tiny", pretrained=True)
    assert type(ours) is DaVit
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def _to_msft_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's key layout written back in the official dingmyu/davit one."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^stem\.conv", "patch_embeds.0.proj", key)
        key = re.sub(r"^stem\.norm", "patch_embeds.0.norm", key)
        key = re.sub(r"^stages\.(\d+)\.downsample\.conv", r"patch_embeds.\1.proj", key)
        key = re.sub(r"^stages\.(\d+)\.downsample\.norm", r"patch_embeds.\1.norm", key)
        key = re.sub(r"^stages\.(\d+)\.blocks", r"main_blocks.\1", key)
        key = key.replace("cpe1", "cpe.0").replace("cpe2", "cpe.1")
        key = key.replace("head.norm.", "norms.").replace("head.fc.", "head.")
        out[key] = value
    return out


def test_pretrained_converts_the_official_msft_layout(offline_hub):
    ref = timm_davit.davit_tiny()
    msft = _to_msft_layout(ref.state_dict())
    assert "main_blocks.2.1.0.cpe.0.proj.weight" in msft and "norms.weight" in msft
    offline_hub("timm/davit_tiny.msft_in1k", msft)
    ours = timm.create_model("davit_tiny", pretrained=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("config,size", [
    ("reduced", (256, 320)), ("reduced", (230, 300)),
    *(pytest.param("davit_tiny", size, marks=SLOW) for size in [(256, 320), (230, 300), (800, 1333)])])
def test_matches_timm_where_the_windows_do_not_tile(config, size):
    """timm (and the authors) zero-pad the normed tokens before qkv and attend to them; so does the default."""
    kwargs = TINY if config == "reduced" else {}
    ref, ours = _pair("davit_tiny", **kwargs)
    ref_f, ours_f = _pair("davit_tiny", features_only=True, **kwargs)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_backend("torch"):
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5
        for a, b in zip(ours_f(x), ref_f(x), strict=True):
            assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
        masked = timm.create_model("davit_tiny", window_padding="masked", **kwargs).eval()
        masked.load_state_dict(ref.state_dict())
        assert (masked(x) - ref(x)).abs().max().item() > 1e-3  # the option really changes the padding


def test_window_padding_names_the_choices():
    with pytest.raises(ValueError, match=r"DaVit: `window_padding` takes 'zeros' or 'masked', got 'mask'"):
        timm.create_model("davit_tiny", window_padding="mask")


def test_masked_padding_gives_padded_keys_no_weight():
    """On a 9×10 map with 7×7 windows, each window's real tokens attend exactly as if alone."""
    torch.manual_seed(2)
    attn = WindowAttention(dim=16, num_heads=2, window_size=7, padding="masked").eval()
    x = torch.randn(2, 9, 10, 16)
    with torch.no_grad(), use_backend("torch"):
        out = attn(x)
        for rows in (slice(0, 7), slice(7, 9)):
            for cols in (slice(0, 7), slice(7, 10)):
                tokens = x[:, rows, cols].reshape(2, -1, 16)
                q, k, v = attn.qkv(tokens).reshape(2, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
                alone = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, -1, 16))
                torch.testing.assert_close(out[:, rows, cols].reshape(2, -1, 16), alone, atol=1e-6, rtol=1e-5)


def test_masked_model_does_not_depend_on_the_padding(monkeypatch):
    """``window_padding="masked"``, whole model: every map is the same whatever the padded q/k/v hold and however
    much is padded (to the window's multiple, or a whole window of rows and columns more)."""
    from attnzoo.backbones import davit

    model = _small_model(window_padding="masked", features_only=True).eval()
    x = torch.randn(1, 3, 40, 52, generator=torch.Generator().manual_seed(0))  # maps 10×13, 5×7, 3×4, 2×2
    with torch.no_grad(), use_backend("torch"):
        clean, zero_pad = model(x), davit.pad_to_multiple
        for extra in (0, 1):
            monkeypatch.setattr(davit, "pad_to_multiple", noisy_padding(zero_pad, extra))
            for a, b in zip(clean, model(x), strict=True):
                assert (a - b).abs().max().item() <= 1e-5
        monkeypatch.setattr(davit, "padding_key_mask", lambda *args: None)  # no mask: the noise leaks in
        assert (clean[0] - model(x)[0]).abs().max().item() > 1e-3


def test_non_tiling_input():
    model = timm.create_model("davit_tiny", features_only=True).eval()
    with torch.no_grad(), use_backend("torch"):
        maps = model(torch.randn(1, 3, 230, 250))
    # the stride-4 stem and stride-2 downsampling pad up: each map is the ceiling of input size / reduction
    assert [tuple(m.shape[2:]) for m in maps] == [(58, 63), (29, 32), (15, 16), (8, 8)]
    assert all(torch.isfinite(m).all() for m in maps)


@pytest.mark.parametrize("size", [64, (56, 70)])
def test_triton_backend_matches_torch(size):
    model = _small_model().eval()
    x = torch.randn(1, 3, *((size, size) if isinstance(size, int) else size),
                    generator=torch.Generator().manual_seed(3), requires_grad=True)
    results = {}
    for backend in ("torch", "triton"):
        with use_backend(backend), trace() as calls:
            out = model(x)
            (grad,) = torch.autograd.grad(out.square().sum(), x)
        assert {c[1] for c in calls} == {backend}
        assert {c[0] for c in calls} == {"window_attention", "channel_attention"}
        results[backend] = out, grad
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], atol=1e-5, rtol=1e-4)


def test_torch_compile_fullgraph():
    model = _small_model().eval()
    x = torch.randn(2, 3, 64, 50, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), use_backend("torch"):
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-5)

