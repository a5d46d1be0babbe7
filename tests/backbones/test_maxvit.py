"""MaxViT on attnzoo kernels against timm's own MaxxVit with identical weights."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models import maxxvit

from attnzoo.backbones import maxvit
from attnzoo.kernels import trace, use_backend

# every maxvit_* architecture timm registers (coatnet_* and maxxvit* stay timm's)
NAMES = sorted(n for n in maxxvit.__all__ if n.startswith("maxvit_"))
DEFAULT_RUN = ("maxvit_tiny_tf_224", "maxvit_rmlp_pico_rw_256")

# a reduced MaxViT: one block per stage, narrow, window = grid = 128 / 32 = 4
SMALL = dict(embed_dim=(32, 64, 64, 64), depths=(1, 1, 1, 1), stem_width=16, img_size=128)
SMALL_TF = dict(SMALL, head_hidden_size=64)


def _timm_and_ours(name: str, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """timm's model (its module function, bypassing the registry that now points at ours) and ours, with the
    same weights, in eval mode."""
    torch.manual_seed(0)
    ref = getattr(maxxvit, name)(**kwargs).eval()
    ours = timm.create_model(name, **kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_registry_points_at_ours_with_timms_tags():
    assert len(NAMES) >= 27
    for name in NAMES:
        assert timm.models.model_entrypoint(name).__module__ == "attnzoo.backbones.maxvit", name
    expected = sorted(
        f"{arch}.{tag}" for arch, default in maxxvit.default_cfgs.items() if arch.startswith("maxvit_")
        for tag in default.tags if default.cfgs[tag].has_weights
    )
    assert sorted(timm.list_pretrained("maxvit_*")) == expected
    cfg = timm.models.get_pretrained_cfg("maxvit_tiny_tf_224.in1k")
    assert cfg.hf_hub_id == "timm/maxvit_tiny_tf_224.in1k"
    assert timm.models.get_pretrained_cfg("maxvit_xlarge_tf_512.in21k_ft_in1k").hf_hub_id == (
        "timm/maxvit_xlarge_tf_512.in21k_ft_in1k")


@pytest.mark.parametrize(
    "name", [n if n in DEFAULT_RUN else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]
)
def test_matches_timm(name):
    ref, ours = _timm_and_ours(name)
    assert isinstance(ours, maxvit.MaxVit)
    size = ref.pretrained_cfg["input_size"][1:]
    # At random init the 14-block third stage of base/large/xlarge grows the residual stream to ~4e3, where
    # one fp32 ulp is ~5e-4: no two implementations that are not bit-identical agree to 1e-4 there. In fp64
    # the same 1e-4 check still exposes any real difference (measured: 1.5e-12 on maxvit_base_tf_224).
    dtype = torch.float64 if name.startswith(("maxvit_base_tf", "maxvit_large_tf", "maxvit_xlarge_tf")) else None
    if dtype is not None:
        ref, ours = ref.to(dtype), ours.to(dtype)
    x = torch.randn(1, 3, *size, dtype=dtype)
    with torch.no_grad(), use_backend("torch"), trace() as calls:
        logits = ours(x)
        expected = ref(x)
    blocks = sum(len(s.blocks) for s in ours.stages)
    assert calls == [("window_attention", "torch")] * 2 * blocks  # block + grid attention in every block
    assert expected.abs().max() > 1e-2  # not a vacuous comparison
    assert _max_diff(logits, expected) <= 1e-4

    ref_features = getattr(maxxvit, name)(features_only=True).eval()
    ours_features = timm.create_model(name, features_only=True).eval()
    ref_features.load_state_dict(ref.state_dict(), strict=False)
    ours_features.load_state_dict(ref_features.state_dict(), strict=True)
    if dtype is not None:
        ref_features, ours_features = ref_features.to(dtype), ours_features.to(dtype)
    with torch.no_grad(), use_backend("torch"):
        maps, expected_maps = ours_features(x), ref_features(x)
    assert [m.shape for m in maps] == [m.shape for m in expected_maps]
    for m, e in zip(maps, expected_maps, strict=True):
        assert _max_diff(m, e) <= 1e-4


def test_pretrained_loads_timm_weights(offline_hub):
    torch.manual_seed(0)
    weights = maxxvit.maxvit_rmlp_pico_rw_256().state_dict()
    offline_hub("timm/maxvit_rmlp_pico_rw_256.sw_in1k", weights)
    model = timm.create_model("maxvit_rmlp_pico_rw_256", pretrained=True)
    assert isinstance(model, maxvit.MaxVit)
    loaded = model.state_dict()
    assert loaded.keys() == weights.keys()
    for k, v in weights.items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("config,size", [
    ("small", (230, 300)),
    *(pytest.param("full", size, marks=pytest.mark.slow) for size in [(230, 300), (800, 1333)])])
def test_input_size_timm_rejects(config, size):
    """Sizes whose maps the windows and grid (4×4 small, 7×7 full) do not tile: timm refuses them; ours pads each
    partition to the window and masks the padded keys (the default; test_padded_keys_take_no_weight shows they
    take no weight), giving the logits and every features_only map, each the ceiling of size / reduction."""
    kwargs = SMALL_TF if config == "small" else {}
    ref, ours = _timm_and_ours("maxvit_tiny_tf_224", **kwargs)
    features = timm.create_model("maxvit_tiny_tf_224", features_only=True, **kwargs).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad(), use_backend("torch"):
        with pytest.raises(AssertionError, match="divisible"):
            ref(x)
        logits, maps = ours(x), features(x)
    assert logits.shape == (1, ours.num_classes) and torch.isfinite(logits).all()
    assert [tuple(m.shape[2:]) for m in maps] == [(-(-size[0] // r), -(-size[1] // r)) for r in (2, 4, 8, 16, 32)]
    assert all(torch.isfinite(m).all() for m in maps)


def test_matches_timm_at_another_tiling_size():
    """timm's MaxViT takes another size through ``img_size`` (window = grid = size / 32): 160×192 gives 5×6."""
    ref, ours = _timm_and_ours("maxvit_tiny_tf_224", **dict(SMALL_TF, img_size=(160, 192)))
    x = torch.randn(1, 3, 160, 192, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), use_backend("torch"):
        expected = ref(x)
        assert expected.abs().max() > 1e-2 and _max_diff(ours(x), expected) <= 1e-4
        for m, e in zip(ours.forward_intermediates(x, intermediates_only=True),
                        ref.forward_intermediates(x, intermediates_only=True), strict=True):
            assert _max_diff(m, e) <= 1e-4


@pytest.mark.parametrize("name, size", [
    ("maxvit_tiny_tf_224", (100, 76)),  # pads every stage: 25×19, 13×10, 7×5, 4×3 against a window of 4
    ("maxvit_tiny_pm_256", (160, 96)),  # _rw / _pm need multiples of 32: pads stages 2 and 3 (10×6, 5×3)
])
def test_padded_keys_take_no_weight(name, size, monkeypatch):
    """The output on real tokens does not depend on what the padded region holds (without the key mask it
    does)."""
    _, model = _timm_and_ours(name, **SMALL)
    x = torch.randn(2, 3, *size)

    zero_pad = maxvit.pad_to_multiple

    def noisy_pad(t, size):
        padded = zero_pad(t, size)
        noise = torch.randn_like(padded) * 10
        noise[:, : t.shape[1], : t.shape[2]] = 0
        return padded + noise

    def run():
        with torch.no_grad(), use_backend("torch"):
            return model.forward_intermediates(x, intermediates_only=True)

    clean = run()
    monkeypatch.setattr(maxvit, "pad_to_multiple", noisy_pad)
    for a, b in zip(clean, run(), strict=True):
        assert _max_diff(a, b) <= 1e-5
    monkeypatch.setattr(maxvit, "padding_key_mask", lambda *args: None)
    assert _max_diff(clean[-1], run()[-1]) > 1e-3


@pytest.mark.parametrize("size", [(128, 128), (96, 80)])
def test_triton_backend_matches_torch(size):
    _, model = _timm_and_ours("maxvit_tiny_tf_224", **SMALL_TF)
    x = torch.randn(1, 3, *size)

    def logits_and_grad(backend):
        xi = x.clone().requires_grad_()
        with use_backend(backend), trace() as calls:
            out = model(xi)
            out.square().sum().backward()
        assert {backend} == {b for _, b in calls}
        return out.detach(), xi.grad

    out, grad = logits_and_grad("triton")
    expected, expected_grad = logits_and_grad("torch")
    assert _max_diff(out, expected) <= 1e-4
    assert _max_diff(grad, expected_grad) <= 1e-4 * expected_grad.abs().max().item()


def test_torch_compile_fullgraph():
    _, model = _timm_and_ours("maxvit_tiny_tf_224", **SMALL_TF)
    x = torch.randn(1, 3, 100, 76)  # padded partitions and key masks in the graph too
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad(), use_backend("torch"):
        assert _max_diff(compiled(x), model(x)) <= 1e-5


def test_features_only_and_model_surface():
    ref, ours = _timm_and_ours("maxvit_tiny_tf_224", **SMALL_TF)
    x = torch.randn(2, 3, 128, 128)
    torch.manual_seed(0)
    ref_features = maxxvit.maxvit_tiny_tf_224(features_only=True, out_indices=(1, 3), **SMALL_TF).eval()
    features = timm.create_model("maxvit_tiny_tf_224", features_only=True, out_indices=(1, 3), **SMALL_TF)
    features.eval()
    features.load_state_dict(ref_features.state_dict(), strict=True)
    assert features.feature_info.channels() == [32, 64]
    assert features.feature_info.reduction() == [4, 16]
    assert features.feature_info.module_name() == ref_features.feature_info.module_name()

    with torch.no_grad(), use_backend("torch"):
        maps = features(x)
        assert [m.shape[1:] for m in maps] == [(32, 32, 32), (64, 8, 8)]
        for m, e in zip(maps, ref_features(x), strict=True):
            assert _max_diff(m, e) <= 1e-5
        final, inter = ours.forward_intermediates(x)
        ref_final, ref_inter = ref.forward_intermediates(x)
        assert len(inter) == 5
        for m, e in zip([final] + inter, [ref_final] + ref_inter, strict=True):
            assert _max_diff(m, e) <= 1e-5
        pooled = ours.forward_head(ours.forward_features(x), pre_logits=True)
        assert pooled.shape == (2, 64)
        assert _max_diff(pooled, ref.forward_head(ref.forward_features(x), pre_logits=True)) <= 1e-5
        ours.reset_classifier(7)
        assert ours(x).shape == (2, 7)


def test_checkpoint_filter_fn_resizes_rel_pos_tables():
    """timm's filter, re-exported beside the model, walks our module tree: 128 px weights (window 4) load into
    a 160 px model (window 5)."""
    torch.manual_seed(0)
    weights = maxxvit.maxvit_tiny_tf_224(**SMALL_TF).state_dict()
    model = timm.create_model("maxvit_tiny_tf_224", **dict(SMALL_TF, img_size=160))
    table = "stages.0.blocks.0.attn_block.attn.rel_pos.relative_position_bias_table"
    assert weights[table].shape[-2:] == (7, 7) and model.state_dict()[table].shape[-2:] == (9, 9)
    model.load_state_dict(maxvit.checkpoint_filter_fn(weights, model), strict=True)
    with torch.no_grad(), use_backend("torch"):
        assert torch.isfinite(model.eval()(torch.randn(1, 3, 160, 160))).all()


def test_clear_errors():
    rw = timm.create_model("maxvit_rmlp_pico_rw_256", **SMALL)
    with pytest.raises(ValueError, match=r"maxvit_rmlp_pico_rw_256: .*multiples of 32 \(or one less\).*250×"):
        rw(torch.randn(1, 3, 250, 270))
    with pytest.raises(ValueError, match=r"maxvit_tiny_tf_224: `transformer_attn_drop` must be 0.0"):
        timm.create_model("maxvit_tiny_tf_224", transformer_attn_drop=0.1, **SMALL_TF)
