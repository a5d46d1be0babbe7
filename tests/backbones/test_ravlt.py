"""RAVLT: the authors' checkpoint layout converted and loaded strictly, the paper's parameter counts, the RALA
and softmax attention modules against the authors' formulas, and the timm model surface."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from attnzoo.backbones.ravlt import RAVLT, RalaAttention, checkpoint_filter_fn, rope_tables
from attnzoo.kernels import trace, use_backend
from attnzoo.kernels.linear.reference import rotate_pairs

from ._reference import assert_close_fp32, randomize_norms
from ._reference_ravlt import RAVLT as AuthorsRAVLT

SLOW = pytest.mark.slow
FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "ravlt_state_dict.json").read_text())["variants"]
TINY = dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), head_hidden_size=32,
            num_classes=10)

# Parameters in millions, the paper's Table (also qhfan/RALA README): T 15M, S 26M, B 48M, L 95M
PAPER_PARAMS_M = {"ravlt_t": 15, "ravlt_s": 26, "ravlt_b": 48, "ravlt_l": 95}
VARIANTS = ["ravlt_t", pytest.param("ravlt_s", marks=SLOW), pytest.param("ravlt_b", marks=SLOW),
            pytest.param("ravlt_l", marks=SLOW)]


def _authors_state_dict(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the authors' exact keys and shapes (the fixture, written from their classes)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) if shape else torch.tensor(7)
            for k, shape in FIXTURE[variant]["state_dict"].items()}


def _small_model(**kwargs) -> RAVLT:
    torch.manual_seed(0)
    return timm.create_model("ravlt_t", **dict(TINY, **kwargs))


def test_registered_with_tags_on_the_authors_hub_repo():
    assert set(timm.list_models("ravlt_*")) == {"ravlt_t", "ravlt_s", "ravlt_b", "ravlt_l"}
    for size in "tsbl":
        cfg = timm.models.get_pretrained_cfg(f"ravlt_{size}.in1k")
        assert (cfg.hf_hub_id, cfg.hf_hub_filename) == ("aldjalkdf/RAVLT", f"RAVLT_{size.upper()}.pth")


@pytest.mark.parametrize("name", list(PAPER_PARAMS_M))
def test_parameter_counts(name):
    """Exactly the authors' model (its count recorded in the fixture), which the paper rounds to whole millions."""
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == FIXTURE[name]["params"]
    assert round(count / 1e6) == PAPER_PARAMS_M[name]


@pytest.mark.parametrize("name", VARIANTS)
def test_converter_loads_the_authors_layout_strictly(name):
    model = timm.create_model(name)
    authors = _authors_state_dict(name)
    model.load_state_dict(checkpoint_filter_fn({"model": authors, "epoch": 299}, model), strict=True)
    torch.testing.assert_close(model.stem[3].bn.running_mean, authors["patch_embed.proj.10.running_mean"])
    torch.testing.assert_close(model.stages[1].downsample.conv.weight, authors["layers.0.downsample.reduction.weight"])
    torch.testing.assert_close(model.stages[0].blocks[1].ls2.gamma, authors["layers.0.blocks.1.gamma_2"].flatten())
    torch.testing.assert_close(model.stages[2].blocks[0].mlp.dwconv.weight,
                               authors["layers.2.blocks.0.ffn.dwconv.weight"])
    torch.testing.assert_close(model.head.fc.weight, authors["head.weight"])
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()


def test_pretrained_loads_the_hub_file(offline_hub):
    weights = _authors_state_dict("ravlt_t", seed=1)
    path = offline_hub("aldjalkdf/RAVLT", {}, "RAVLT_T.pth")
    torch.save({"model": weights, "epoch": 299, "args": argparse.Namespace(model="RAVLT_T")}, path)
    model = timm.create_model("ravlt_t.in1k", pretrained=True)
    torch.testing.assert_close(model.stages[3].blocks[1].attn.qkvo.weight,
                               weights["layers.3.blocks.1.attn.qkvo.weight"])
    model = timm.create_model("ravlt_t.in1k", pretrained=True, num_classes=5)
    assert model.head.fc.weight.shape == (5, 1024, 1, 1)
    torch.testing.assert_close(model.conv_head.bn.weight, weights["norm.weight"])


# the parity configurations, ours and the authors' kwargs: RAVLT_T, and a narrow one-block-per-stage RAVLT
PARITY = {"ravlt_t": ({}, {}),
          "reduced": (TINY, dict(embed_dims=TINY["dims"], depths=TINY["depths"], num_heads=TINY["num_heads"],
                                 projection=TINY["head_hidden_size"], num_classes=TINY["num_classes"]))}


@pytest.fixture(scope="module")
def authors_and_ours(tmp_path_factory):
    """``get(config)``: the authors' RAVLT (written from their code: tests/backbones/_reference_ravlt.py) with
    random weights, layer scales and norm statistics, saved as their training script saves a checkpoint; ours
    and ours with ``features_only=True`` loaded from that file through timm's pretrained path (the converter)."""
    built = {}

    def get(config: str):
        if config not in built:
            kwargs, authors_kwargs = PARITY[config]
            torch.manual_seed(0)
            authors = randomize_norms(AuthorsRAVLT(**authors_kwargs))
            for name, p in authors.named_parameters():
                if name.endswith(("gamma_1", "gamma_2")):
                    p.data.uniform_(0.5, 1.5)
            weights = authors.state_dict()
            if config == "ravlt_t":
                assert {k: list(v.shape) for k, v in weights.items()} == FIXTURE["ravlt_t"]["state_dict"]
            path = tmp_path_factory.mktemp("ravlt") / "RAVLT_T.pth"
            torch.save({"model": weights, "epoch": 299}, path)
            kwargs = dict(kwargs, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), custom_load=True))
            built[config] = (authors, timm.create_model("ravlt_t", **kwargs).eval(),
                             timm.create_model("ravlt_t", features_only=True, **kwargs).eval())
        return built[config]

    return get


@pytest.mark.parametrize("config,size", [
    ("reduced", (224, 224)), ("reduced", (230, 300)),
    *(pytest.param("ravlt_t", size, marks=SLOW) for size in [(224, 224), (230, 300), (800, 1333)])])
def test_matches_the_authors_code(authors_and_ours, config, size):
    """Logits and the detection maps (the authors' GLTA returns each stage's output before its downsampling) of
    the authors' model and ours, same weights, fp32, at 224 and at sizes that halve to odd maps."""
    authors, ours, features = authors_and_ours(config)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_backend("torch"):
        want, want_maps = authors(x)
        assert_close_fp32(ours(x), want, f"logits at {size}")
        for i, (got, expected) in enumerate(zip(features(x), want_maps, strict=True)):
            assert_close_fp32(got, expected, f"stage {i} map at {size}")


def test_rope_tables_are_the_authors():
    """qhfan/RALA RoPE: angle = 1/10000^linspace(0, 1, hd/4) repeated per pair; rows then columns."""
    cos, sin = rope_tables(16, (3, 5))
    angle = (1.0 / (10000 ** torch.linspace(0, 1, 4))).unsqueeze(-1).repeat(1, 2).flatten()
    n = 2 * 5 + 4  # row 2, column 4
    torch.testing.assert_close(sin[n], torch.cat([torch.sin(2 * angle), torch.sin(4 * angle)]))
    torch.testing.assert_close(cos[n], torch.cat([torch.cos(2 * angle), torch.cos(4 * angle)]))


@pytest.mark.parametrize("linear", [True, False])
def test_attention_is_the_authors_formula(linear):
    """GateLinearAttentionNoSilu (linear) and VanillaSelfAttention in qhfan/RALA classfication/RALA.py."""
    torch.manual_seed(3)
    B, C, H, W, heads = 2, 32, 5, 6, 2
    attn = RalaAttention(C, heads, linear)
    x = torch.randn(B, C, H, W)
    cos, sin = rope_tables(C // heads, (H, W))
    qkvo = attn.qkvo(x)
    o, lepe = qkvo[:, 3 * C:], attn.lepe(qkvo[:, 2 * C:3 * C])
    q, k, v = qkvo[:, :3 * C].reshape(B, 3, heads, C // heads, H * W).permute(1, 0, 2, 4, 3)  # m b n (h w) d
    scale, N = (C // heads) ** -0.5, H * W
    if linear:
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
        eff = torch.softmax(scale * q.mean(dim=-2, keepdim=True) @ k.transpose(-1, -2), dim=-1).transpose(-1, -2)
        k = k * eff * N
        z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        kv = (rotate_pairs(k, cos, sin).transpose(-2, -1) * N ** -0.5) @ (v * N ** -0.5)
        res = rotate_pairs(q, cos, sin) @ kv * z
    else:
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        res = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v
    res = res.permute(0, 1, 3, 2).reshape(B, C, H, W) + lepe
    torch.testing.assert_close(attn(x, (cos, sin)), attn.proj(res * o), atol=1e-6, rtol=1e-5)


def test_stages_one_and_two_are_linear():
    model = _small_model()
    assert [stage.blocks[0].attn.linear for stage in model.stages] == [True, True, False, False]


@pytest.mark.parametrize("size", [(64, 64), (50, 37)])
def test_any_input_size(size):
    model = _small_model(features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *size))
    h, w = math.ceil(size[0] / 4), math.ceil(size[1] / 4)
    for i, f in enumerate(feats):
        assert f.shape == (1, TINY["dims"][i], h, w)
        h, w = math.ceil(h / 2), math.ceil(w / 2)


def test_triton_backend_matches_torch():
    model = _small_model(depths=(1, 1), dims=(32, 64), num_heads=(1, 2), linear_stages=(True, True),
                         layer_scales=(1.0, 1.0)).eval()
    x = torch.randn(1, 3, 44, 36, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), use_backend("torch"):
        want = model(x)
    with torch.no_grad(), use_backend("triton"), trace() as calls:
        got = model(x)
    assert calls == [("linear_attention", "triton")] * 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_torch_compile_fullgraph():
    model = _small_model().eval()
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-5)


def test_bad_configuration_is_a_clear_error():  # bad input: tests/backbones/test_contract.py
    with pytest.raises(ValueError, match=r"RAVLT: each of `dims` \(16, 32, 48, 60\) must be divisible"):
        RAVLT(dims=(16, 32, 48, 60), num_heads=(1, 2, 3, 4))


@SLOW
@pytest.mark.parametrize("name", ["ravlt_t", "ravlt_l"])
def test_full_size_forward(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    assert [f.shape[-1] for f in feats] == [56, 28, 14, 7]
