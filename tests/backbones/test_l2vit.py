"""L²ViT: the authors' checkpoint layout converted and loaded strictly, the paper's parameter counts, the linear
attention block against the authors' formula, and the timm model surface."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from attnzoo.backbones.l2vit import L2ViT, LinearAttention, checkpoint_filter_fn
from attnzoo.kernels import trace, use_backend

from ..tools.conftest import load_tool
from ._reference import assert_close_fp32, noisy_padding, randomize_norms
from ._reference_l2vit import L2ViT as AuthorsL2ViT

SLOW = pytest.mark.slow
FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "l2vit_state_dict.json").read_text())["variants"]
TINY = dict(depths=(2, 2, 2, 2), dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4), num_classes=10)

# Parameters in millions, ChuanyangZheng/L2ViT readme.md's table (the paper's Table): T 29M, S 50M, B 89M
PAPER_PARAMS_M = {"l2vit_tiny": 29, "l2vit_small": 50, "l2vit_base": 89, "l2vit_base_384": 89}
VARIANTS = ["l2vit_tiny", pytest.param("l2vit_small", marks=SLOW), pytest.param("l2vit_base", marks=SLOW)]


def _authors_state_dict(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the authors' exact keys and shapes (the fixture, written from their classes)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) if shape else torch.tensor(7)
            for k, shape in FIXTURE[variant]["state_dict"].items()}


def _small_model(**kwargs) -> L2ViT:
    torch.manual_seed(0)
    return timm.create_model("l2vit_tiny", **dict(TINY, **kwargs))


def test_registered_with_tags_on_the_authors_release():
    assert set(timm.list_models("l2vit_*")) == {"l2vit_tiny", "l2vit_small", "l2vit_base", "l2vit_base_384"}
    release = "https://github.com/ChuanyangZheng/L2ViT/releases/download/v1.0/"
    for tag, file in [("l2vit_tiny.in1k", "L2ViT-Tiny-checkpoint-best-ema.pth"),
                      ("l2vit_small.in1k", "L2ViT-Small-checkpoint-best-ema.pth"),
                      ("l2vit_base.in1k", "L2ViT-Base-checkpoint-best-ema.pth"),
                      ("l2vit_base.in22k_ft_in1k", "L2ViT-Base-22k21k-finetune-224-checkpoint-best.pth"),
                      ("l2vit_base.in22k", "L2ViT-Base-22k-pretrain-checkpoint-best.pth"),
                      ("l2vit_base_384.in22k_ft_in1k", "L2ViT-Base-22k21k-finetune-384-checkpoint-best.pth")]:
        assert timm.models.get_pretrained_cfg(tag).url == release + file


@pytest.mark.parametrize("name", ["l2vit_tiny", "l2vit_small", "l2vit_base", "l2vit_base_384"])
def test_parameter_counts(name):
    """Exactly the authors' model (its count recorded in the fixture), which the paper rounds to whole millions."""
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == FIXTURE[name.removesuffix("_384")]["params"]
    assert round(count / 1e6) == PAPER_PARAMS_M[name]


@pytest.mark.parametrize("name", VARIANTS)
def test_converter_loads_the_authors_layout_strictly(name):
    model = timm.create_model(name)
    authors = _authors_state_dict(name)
    converted = checkpoint_filter_fn(authors, model)
    model.load_state_dict(converted, strict=True)
    torch.testing.assert_close(model.stem.conv1.weight, authors["downsample_layers.0.proj.proj.0.weight"])
    torch.testing.assert_close(model.stages[1].downsample.norm.weight, authors["downsample_layers.1.norm.weight"])
    torch.testing.assert_close(model.stages[0].blocks[1].lcm.bn.running_var,
                               authors["stages.0.1.local_mp.bn.running_var"])
    torch.testing.assert_close(model.head.fc.weight, authors["head.weight"])
    # our own layout passes through unchanged
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()


def _release_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str, ema: dict) -> Path:
    """The release file as the authors' training script saves it, in an offline torch hub cache."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    path = tmp_path / "hub" / "checkpoints" / Path(timm.models.get_pretrained_cfg(variant).url).name
    path.parent.mkdir(parents=True)
    torch.save({"model": {k: torch.zeros_like(v) for k, v in ema.items()}, "model_ema": ema, "epoch": 299,
                "args": argparse.Namespace(model="L2ViT_Tiny", drop_path=0.1)}, path)
    return path


def test_a_best_file_gives_the_plain_weights_a_best_ema_file_the_ema(tmp_path, monkeypatch):
    """The authors' main.py writes checkpoint-best.pth when the plain weights peak and checkpoint-best-ema.pth
    when the EMA does, both files holding both: the file's name picks the entry (timm's loader and convert.py)."""
    from attnzoo.backbones._pretrained import checkpoint_weights

    plain, ema = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    both = {"model": plain, "model_ema": ema, "epoch": 90}
    assert checkpoint_weights(both, "L2ViT-Base-22k21k-finetune-224-checkpoint-best.pth") is plain
    assert checkpoint_weights(both, "L2ViT-Tiny-checkpoint-best-ema.pth") is ema
    assert checkpoint_weights(plain, "anything-ema.pth") is plain  # a bare state_dict
    with pytest.raises(ValueError, match="says EMA weights, but the checkpoint has only"):
        checkpoint_weights({"model": plain}, "L2ViT-Tiny-checkpoint-best-ema.pth")
    # through convert.py: the release file as their script saves it (with its pickled Namespace) -> the EMA
    convert = load_tool("convert")
    weights = _authors_state_dict("l2vit_tiny", seed=3)
    path = _release_file(tmp_path, monkeypatch, "l2vit_tiny.in1k", weights)  # L2ViT-Tiny-checkpoint-best-ema.pth
    hub = tmp_path / "converted"
    assert convert.main(["l2vit_tiny", str(path), "--out", str(hub)]) == 0
    converted = load_file(hub / "model.safetensors")
    torch.testing.assert_close(converted["head.fc.weight"], weights["head.weight"])


def test_pretrained_loads_the_release_files_ema_weights(tmp_path, monkeypatch):
    ema = _authors_state_dict("l2vit_tiny", seed=1)
    _release_file(tmp_path, monkeypatch, "l2vit_tiny.in1k", ema)
    model = timm.create_model("l2vit_tiny.in1k", pretrained=True)
    torch.testing.assert_close(model.stages[2].blocks[3].attn.temperature, ema["stages.2.3.attn.temperature"])
    torch.testing.assert_close(model.head.fc.bias, ema["head.bias"])
    # another class count keeps everything but the head
    model = timm.create_model("l2vit_tiny.in1k", pretrained=True, num_classes=5)
    assert model.head.fc.weight.shape == (5, 768)
    torch.testing.assert_close(model.norm.weight, ema["norm.weight"])


# the parity configurations, ours and the authors' kwargs: L2ViT_Tiny, and a narrow one-pair-per-stage L2ViT
PARITY = {"l2vit_tiny": ({}, {}),
          "reduced": (TINY, TINY)}  # the same argument names


@pytest.fixture(scope="module")
def authors_and_ours(tmp_path_factory):
    """``get(config)``: the authors' L2ViT (written from their code: tests/backbones/_reference_l2vit.py) with
    random weights and norm statistics, saved as their training script saves a release file; ours and ours
    with ``features_only=True`` loaded from that file through timm's pretrained path (the converter)."""
    built = {}

    def get(config: str):
        if config not in built:
            kwargs, authors_kwargs = PARITY[config]
            torch.manual_seed(0)
            authors = randomize_norms(AuthorsL2ViT(**authors_kwargs))
            for name, p in authors.named_parameters():
                if name.endswith("temperature"):
                    p.data.uniform_(0.05, 0.5)
            weights = authors.state_dict()
            if config == "l2vit_tiny":
                assert {k: list(v.shape) for k, v in weights.items()} == FIXTURE["l2vit_tiny"]["state_dict"]
            path = tmp_path_factory.mktemp("l2vit") / "L2ViT-Tiny-checkpoint-best-ema.pth"
            torch.save({"model": weights, "model_ema": weights, "epoch": 299}, path)
            kwargs = dict(kwargs, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), custom_load=True))
            built[config] = (authors, timm.create_model("l2vit_tiny", **kwargs).eval(),
                             timm.create_model("l2vit_tiny", features_only=True, **kwargs).eval())
        return built[config]

    return get


@pytest.mark.parametrize("config,size", [
    ("reduced", (224, 224)), ("reduced", (230, 300)),
    *(pytest.param("l2vit_tiny", size, marks=SLOW) for size in [(224, 224), (230, 300), (800, 1333)])])
def test_matches_the_authors_code(authors_and_ours, config, size):
    """Logits and the detection maps of the authors' model and ours, same weights, fp32: at 224 every window
    tiles; at 230×300 and 800×1333 none of the stages does (58×75 → 8×10 against 7×7 windows)."""
    authors, ours, features = authors_and_ours(config)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_backend("torch"):
        want, want_maps = authors(x)
        assert_close_fp32(ours(x), want, f"logits at {size}")
        for i, (got, expected) in enumerate(zip(features(x), want_maps, strict=True)):
            assert_close_fp32(got, expected, f"stage {i} map at {size}")


@pytest.mark.parametrize("extra_windows", [0, 1])
def test_masked_windows_do_not_depend_on_the_padding(monkeypatch, extra_windows):
    """``window_padding="masked"``: the visible tokens' outputs are the same whatever the padded q/k/v hold and
    however much is padded (up to the window's multiple, or a whole window of rows and columns more)."""
    from attnzoo.backbones import davit

    model = _small_model(window_padding="masked", features_only=True).eval()
    x = torch.randn(1, 3, 40, 52, generator=torch.Generator().manual_seed(0))  # maps 10×13, 5×7, 3×4, 2×2
    with torch.no_grad(), use_backend("torch"):
        clean = model(x)
        monkeypatch.setattr(davit, "pad_to_multiple", noisy_padding(davit.pad_to_multiple, extra_windows))
        for a, b in zip(clean, model(x), strict=True):
            assert (a - b).abs().max().item() <= 1e-5
        monkeypatch.setattr(davit, "padding_key_mask", lambda *args: None)  # no mask: the noise leaks in
        assert (clean[0] - model(x)[0]).abs().max().item() > 1e-3


def test_linear_attention_is_the_authors_formula():
    """ChuanyangZheng/L2ViT LinearAttention.forward: τ (φ(q) · φ(k)ᵀv) / clamp(φ(q) · Σφ(k), 100)."""
    torch.manual_seed(2)
    attn = LinearAttention(48, num_heads=3)
    attn.temperature.data.uniform_(0.1, 0.5)
    x = torch.randn(2, 7, 9, 48) + 0.3  # NHWC; the clamp binds some tokens, not others
    B, N, C = 2, 63, 48
    q, k, v = attn.qkv(x.reshape(B, N, C)).reshape(B, N, 3, 3, 16).permute(2, 0, 3, 1, 4)
    q, k = F.relu(q), F.relu(k)
    denom = torch.clamp(q @ k.transpose(-2, -1).sum(dim=-1, keepdim=True), 1e2)
    assert (denom == 100).any() and (denom > 100).any()
    want = attn.proj(((q @ ((k.transpose(-2, -1) @ v) * attn.temperature)) / denom).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(attn(x).reshape(B, N, C), want, atol=1e-6, rtol=1e-5)


def test_blocks_alternate_local_and_global():
    model = _small_model()
    for stage in model.stages:
        assert [type(b).__name__ for b in stage.blocks] == ["DaVitBlock", "LinearGlobalBlock"]


@pytest.mark.parametrize("window_padding", ["zeros", "masked"])
def test_local_window_block_pads_as_the_authors(window_padding):
    """The LWA block is DaViT's spatial block, the authors' and timm's; on a 9×10 map the 7×7 windows are
    padded with zero tokens before qkv and attended to, as the authors' (and timm's SpatialBlock) do."""
    from timm.models.davit import SpatialBlock

    model = _small_model(window_padding=window_padding).eval()
    ours = model.stages[0].blocks[0]
    dim = TINY["dims"][0]
    ref = SpatialBlock(dim, TINY["num_heads"][0], window_size=7).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, dim, 9, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), use_backend("torch"):
        err = (ours(x) - ref(x)).abs().max().item()
    assert err <= 1e-5 if window_padding == "zeros" else err > 1e-3


@pytest.mark.parametrize("size", [(64, 64), (50, 37)])
def test_any_input_size(size):
    model = _small_model(features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *size))
    h, w = math.ceil(size[0] / 4), math.ceil(size[1] / 4)
    for i, f in enumerate(feats):
        assert f.shape == (1, TINY["dims"][i], h, w)
        h, w = math.ceil(h / 2), math.ceil(w / 2)


@pytest.mark.parametrize("size", [(56, 56), (45, 40)])
def test_triton_backend_matches_torch(size):
    model = _small_model(depths=(2, 2), dims=(32, 64), num_heads=(1, 2)).eval()
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), use_backend("torch"):
        want = model(x)
    with torch.no_grad(), use_backend("triton"), trace() as calls:
        got = model(x)
    assert {op for op, backend in calls if backend == "triton"} == {"window_attention", "linear_attention"}
    assert all(backend == "triton" for _, backend in calls)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_torch_compile_fullgraph():
    model = _small_model().eval()
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-5)


def test_bad_configuration_is_a_clear_error():  # bad input: tests/backbones/test_contract.py
    with pytest.raises(ValueError, match=r"L2ViT: each of `dims` \(32, 64, 96, 130\) must be divisible"):
        L2ViT(dims=(32, 64, 96, 130), num_heads=(1, 2, 3, 4))


@SLOW
@pytest.mark.parametrize("name,size", [("l2vit_tiny", 224), ("l2vit_base_384", 384)])
def test_full_size_forward(name, size):
    """The published configurations at their resolution: every window tiles, logits and features come out."""
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    assert [f.shape[-1] for f in feats] == [size // 4, size // 8, size // 16, size // 32]
