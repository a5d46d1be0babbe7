"""HaloNet on attnzoo kernels against timm's own classes with the same weights, and the timm model surface."""
from __future__ import annotations

import re

import pytest
import timm
import torch
from timm.models import byoanet
from timm.models.byobnet import ByoBlockCfg, ByoModelCfg

import attnzoo  # noqa: F401  (registers our models in timm)
from attnzoo.backbones.halonet import HaloAttn, HaloNet
from attnzoo.kernels import trace, use_backend

MODELS = ["halonet26t", "haloregnetz_b", "halonet_h1", "sehalonet33ts", "halonet50ts", "eca_halonext26ts",
          "lamhalobotnet50ts_256", "halo2botnet50ts_256"]
FAST = {"halonet26t", "haloregnetz_b"}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm affine and statistics: timm zero-inits the last BN of every residual branch, which
    would leave the attention out of the logits entirely."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = 0.5 + 0.5 * torch.rand(m.weight.shape, generator=g)
            m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=g)
            m.running_mean = 0.1 * torch.randn(m.running_mean.shape, generator=g)
            m.running_var = 0.5 + torch.rand(m.running_var.shape, generator=g)
    return model.eval()


def test_every_timm_halo_model_is_ours():
    timm_halo = {name for name in byoanet.default_cfgs if "halo" in name}  # timm's own byoanet models
    assert timm_halo == set(MODELS) == set(timm.list_models(module="halonet"))
    for name in MODELS:
        assert timm.models.model_entrypoint(name).__module__ == "attnzoo.backbones.halonet"


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow)
                                  for n in MODELS])
def test_matches_timm(name):
    """Logits and features_only maps of timm's class and ours, same weights, fp32, torch backend."""
    size = timm.models.get_pretrained_cfg(name).input_size[-1]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    theirs = randomize(getattr(byoanet, name)())
    ours = timm.create_model(name).eval()
    assert isinstance(ours, HaloNet) and any(isinstance(m, HaloAttn) for m in ours.modules())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad(), use_backend("torch"), trace() as calls:
        got = ours(x)
    assert {c for c in calls} == {("halo_attention", "torch")}
    with torch.no_grad():
        torch.testing.assert_close(got, theirs(x), atol=1e-4, rtol=0)

    theirs = randomize(getattr(byoanet, name)(features_only=True, out_indices=(1, 2, 3, 4)))
    ours = timm.create_model(name, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.feature_info.get_dicts() == theirs.feature_info.get_dicts()
    with torch.no_grad(), use_backend("torch"):
        for a, b in zip(ours(x), theirs(x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_layer_matches_timm_on_every_backend():
    """Our HaloAttn against timm's on one layer, with strided queries, scaled position logits and a border."""
    from timm.layers.halo_attn import HaloAttn as TimmHaloAttn

    kwargs = dict(dim=32, num_heads=2, dim_head=24, block_size=4, halo_size=3, stride=2, scale_pos_embed=True)
    theirs, ours = TimmHaloAttn(**kwargs), HaloAttn(**kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 32, 8, 12, generator=torch.Generator().manual_seed(0), requires_grad=True)
    want = theirs(x)
    (dx_want,) = torch.autograd.grad(want.square().sum(), x)
    for backend in ("reference", "torch", "triton"):
        with use_backend(backend):
            got = ours(x)
        (dx,) = torch.autograd.grad(got.square().sum(), x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, b=backend: f"{b}: {m}")
        torch.testing.assert_close(dx, dx_want, atol=1e-5, rtol=1e-5, msg=lambda m, b=backend: f"{b}: {m}")


def test_pretrained_loads_timm_weights_offline(offline_hub):
    weights = randomize(byoanet.halonet26t()).state_dict()
    offline_hub("timm/halonet26t.a1h_in1k", weights)
    model = timm.create_model("halonet26t", pretrained=True)
    assert isinstance(model, HaloNet)
    assert model.pretrained_cfg["hf_hub_id"] == "timm/halonet26t.a1h_in1k"
    for key, value in weights.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=0, rtol=0, msg=key)


def test_untileable_size_names_block_size_and_nearest_sizes():
    model = timm.create_model("halonet26t").eval()
    message = r"halonet26t: input height 230 .*block_size=8.*nearest valid heights: "
    with pytest.raises(ValueError, match=message) as err, torch.no_grad():
        model(torch.randn(1, 3, 230, 256))
    nearest = [int(s) for s in re.findall(r"\d+", str(err.value).split("nearest valid heights:")[1])]
    assert nearest and all(model.tiles(s) for s in nearest)
    with pytest.raises(AssertionError):  # timm's own class cannot take it either, but only asserts
        with torch.no_grad():
            byoanet.halonet26t().eval()(torch.randn(1, 3, 230, 256))
    with torch.no_grad():
        assert model(torch.randn(1, 3, nearest[-1], 256)).shape == (1, 1000)  # a suggested size runs

    features = timm.create_model("halonet26t", features_only=True).eval()
    message = r"HaloAttn: a 15x16 feature map .*block_size=8; nearest valid sizes: 8 or 16 \(height\)"
    with pytest.raises(ValueError, match=message), torch.no_grad():
        features(torch.randn(1, 3, 230, 256))


@pytest.mark.parametrize("size", [(230, 300), pytest.param((800, 1333), marks=pytest.mark.slow)])
def test_sizes_the_blocks_do_not_tile_are_refused_by_both(size):
    """HaloNet has no padded form: timm's class asserts inside its first halo layer, ours names the problem."""
    with torch.no_grad():
        with pytest.raises(AssertionError):
            byoanet.halonet26t().eval()(torch.randn(1, 3, *size))
        with pytest.raises(ValueError, match=r"halonet26t: input height .*block_size=8"):
            timm.create_model("halonet26t").eval()(torch.randn(1, 3, *size))


@pytest.mark.slow
def test_matches_timm_at_another_size():
    """256×512, not the default 256×256: every halo stage's map is a multiple of the 8×8 blocks (the default
    run compares a reduced HaloNet at other sizes: test_reduced_halonet_matches_timm)."""
    x = torch.randn(1, 3, 256, 512, generator=torch.Generator().manual_seed(0))
    theirs = randomize(byoanet.halonet26t(features_only=True, out_indices=(1, 2, 3, 4)))
    ours = timm.create_model("halonet26t", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad(), use_backend("torch"):
        for a, b in zip(ours(x), theirs(x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    theirs = randomize(byoanet.halonet26t())
    ours = timm.create_model("halonet26t").eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad(), use_backend("torch"):
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=0)


def tiny_cfg(self_attn_layer=HaloAttn) -> ByoModelCfg:
    """Two halo stages (the second with strided queries) on a 32×32 input: 2×2 blocks of 4 in stage 1."""
    return ByoModelCfg(
        blocks=(ByoBlockCfg(type="self_attn", d=1, c=32, s=1, br=0.5),
                ByoBlockCfg(type="self_attn", d=2, c=64, s=2, br=0.5)),
        stem_chs=16, stem_type="7x7", stem_pool="maxpool", self_attn_layer=self_attn_layer,
        self_attn_kwargs=dict(block_size=4, halo_size=2, num_heads=2, dim_head=16))


def tiny_halonet(**kwargs) -> HaloNet:
    return randomize(HaloNet(tiny_cfg(), num_classes=10, name="tiny_halonet", **kwargs))


@pytest.mark.parametrize("size", [(32, 64), (64, 96)])
def test_reduced_halonet_matches_timm(size):
    """The reduced HaloNet against timm's ByobNet built from the same config with timm's HaloAttn, same weights,
    at non-square sizes: logits and features_only maps."""
    from timm.layers.halo_attn import HaloAttn as TimmHaloAttn
    from timm.models.byobnet import ByobNet

    ours = tiny_halonet()
    theirs = ByobNet(tiny_cfg(TimmHaloAttn), num_classes=10).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_backend("torch"):
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
        for a, b in zip(ours.forward_intermediates(x, intermediates_only=True),
                        theirs.forward_intermediates(x, intermediates_only=True), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_triton_backend_matches_torch():
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the kernels run in Triton's interpreter
    model = tiny_halonet().to(device)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    for backend in ("torch", "triton"):
        xb = x.clone().requires_grad_()
        with use_backend(backend), trace() as calls:
            out = model(xb)
        out.square().sum().backward()
        assert {c for c in calls} == {("halo_attention", backend)}
        results[backend] = out.detach(), xb.grad
    for a, b in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_torch_compile_fullgraph():
    model = tiny_halonet()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with use_backend("torch"), torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

