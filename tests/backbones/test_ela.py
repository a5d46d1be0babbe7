"""ELA: the module against the paper's equations, the models against timm's plain ResNet / MobileNetV2 with the
same weights, parameter counts, and the timm model surface."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models.resnet import BasicBlock

import attnzoo  # noqa: F401  (registers our models in timm)
from attnzoo.backbones.ela import ELA_VERSIONS, EfficientLocalAttention, ElaResNet, _ela_layer
from attnzoo.kernels import trace, use_backend

from ._reference import assert_close_fp32, randomize_norms
from ._reference_ela import ELA as AuthorsELA
from ._reference_ela import MBV2_ELA72

RESNETS = {18: ("resnet18", 1, (2, 2, 2, 2)), 34: ("resnet34", 1, (3, 4, 6, 3)),
           50: ("resnet50", 4, (3, 4, 6, 3)), 101: ("resnet101", 4, (3, 4, 23, 3))}
# MobileNetV2 (Sandler et al. 2018, Table 2): (expansion t, output channels c, repeats n) after the stem's 32
MOBILENETV2 = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]


def ela_params(channels: int, version: str) -> int:
    """Conv1d C × (C/groups) × k, no bias, plus GroupNorm's weight and bias."""
    kernel, group_channels, _ = ELA_VERSIONS[version]
    return channels * group_channels * kernel + 2 * channels


def test_module_follows_the_equations_by_hand():
    """A loop-by-loop evaluation of y = x · σ(GN(conv(mean_W x))) · σ(GN(conv(mean_H x))) on a 1×4×3×5 map."""
    g = torch.Generator().manual_seed(0)
    m = EfficientLocalAttention(4, None, kernel_size=3, group_channels=2, norm_groups=2).double()
    with torch.no_grad():
        m.conv.weight.copy_(torch.randn(m.conv.weight.shape, generator=g))
        m.norm.weight.copy_(torch.randn(4, generator=g))
        m.norm.bias.copy_(torch.randn(4, generator=g))
    x = torch.randn(1, 4, 3, 5, generator=g, dtype=torch.float64)
    C, H, W = 4, 3, 5
    # w [C, 2, 3]: output channel c reads channels 2·(c//2) and 2·(c//2)+1
    w, gamma, beta = m.conv.weight.detach(), m.norm.weight.detach(), m.norm.bias.detach()

    def gate(strip):  # strip: list over C of lists over L
        L = len(strip[0])
        conv = [[sum(w[c, j, t] * strip[2 * (c // 2) + j][i + t - 1]
                     for j in range(2) for t in range(3) if 0 <= i + t - 1 < L) for i in range(L)]
                for c in range(C)]
        out = [[0.0] * L for _ in range(C)]
        for grp in range(2):  # GroupNorm over the 2 channels × L positions of each group, biased variance
            vals = [conv[c][i] for c in (2 * grp, 2 * grp + 1) for i in range(L)]
            mean = sum(vals) / len(vals)
            var = sum((v - mean) ** 2 for v in vals) / len(vals)
            for c in (2 * grp, 2 * grp + 1):
                for i in range(L):
                    z = (conv[c][i] - mean) / math.sqrt(var + m.norm.eps) * gamma[c] + beta[c]
                    out[c][i] = 1 / (1 + math.exp(-z))
        return out

    x_h = [[sum(x[0, c, h, j] for j in range(W)) / W for h in range(H)] for c in range(C)]
    x_w = [[sum(x[0, c, i, w_] for i in range(H)) / H for w_ in range(W)] for c in range(C)]
    a_h, a_w = gate(x_h), gate(x_w)
    want = torch.tensor([[[[x[0, c, h, j] * a_h[c][h] * a_w[c][j] for j in range(W)] for h in range(H)]
                          for c in range(C)]], dtype=torch.float64)
    for backend in ("reference", "torch"):
        with use_backend(backend), torch.no_grad():
            torch.testing.assert_close(m(x), want, atol=1e-12, rtol=1e-12)


def test_flat_strips_give_the_norm_bias_gate():
    """With a zero conv every strip normalises to 0, so each gate is σ(β) and y = x · σ(β)²."""
    m = EfficientLocalAttention(32, "t")
    with torch.no_grad():
        m.conv.weight.zero_()
        m.norm.bias.fill_(0.7)
    x = torch.randn(2, 32, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(m(x), x * torch.sigmoid(torch.tensor(0.7)) ** 2)


@pytest.mark.parametrize("version", list(ELA_VERSIONS))
def test_module_layout_per_version(version):
    kernel, group_channels, norm_groups = ELA_VERSIONS[version]
    m = EfficientLocalAttention(64, version)
    assert m.conv.kernel_size == (kernel,) and m.conv.groups == 64 // group_channels
    assert m.norm.num_groups == norm_groups and m.conv.bias is None
    assert sum(p.numel() for p in m.parameters()) == ela_params(64, version)


def test_module_rejects_channels_it_cannot_group():
    with pytest.raises(ValueError, match=r"ELA-T: `channels` must be divisible by norm_groups=32, got 144"):
        EfficientLocalAttention(144, "t")
    with pytest.raises(ValueError, match=r"`version` must be one of t, b, s, l"):
        EfficientLocalAttention(64, "x")


@pytest.mark.parametrize("depth", list(RESNETS))
def test_resnet_parameters_are_timm_plus_ela(depth):
    """Every block gets one ELA on its output channels (64·e … 512·e, e the block expansion)."""
    base, expansion, layers = RESNETS[depth]
    plain = sum(p.numel() for p in timm.create_model(base, device="meta").parameters())
    outs = [c * expansion for c, n in zip((64, 128, 256, 512), layers, strict=True) for _ in range(n)]
    for version in ELA_VERSIONS:
        model = timm.create_model(f"ela_{version}_resnet{depth}", device="meta")
        want = plain + sum(ela_params(c, version) for c in outs)
        assert sum(p.numel() for p in model.parameters()) == want


def test_resnet18_count_is_the_papers():
    """"ELA-ResNet18 ... 11.71M" (the paper's ImageNet table as wang-jing-xu/PDDR's README quotes it): ELA-B,
    C·7 + 2C in each of the 8 blocks; ELA-T (11.703M) or ELA-S/L (11.77M/11.80M) would not round to it."""
    counts = {v: sum(p.numel() for p in timm.create_model(f"ela_{v}_resnet18", device="meta").parameters())
              for v in ELA_VERSIONS}
    assert round(counts["b"] / 1e6, 2) == 11.71
    assert [v for v, n in counts.items() if round(n / 1e6, 2) == 11.71] == ["b"]


def test_mobilenetv2_parameters_are_timm_plus_ela():
    """ELA sits on the depthwise output of every expanding block: the expanded channels t·c_in; the first
    (t = 1) block has none, as in the authors' MbV2/models/mbv2_ela72.py."""
    plain = sum(p.numel() for p in timm.create_model("mobilenetv2_100", device="meta").parameters())
    mids, c_in = [], 32
    for t, c, n in MOBILENETV2:
        for _ in range(n):
            if t > 1:
                mids.append(t * c_in)
            c_in = c
    assert len(mids) == 16
    for version in ("b", "s", "l"):
        model = timm.create_model(f"ela_{version}_mobilenetv2_100", device="meta")
        assert sum(p.numel() for p in model.parameters()) == plain + sum(ela_params(c, version) for c in mids)


def strip_ela(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our state_dict without the ELA parameters, and our model with every ELA replaced by identity."""
    for module in list(model.modules()):
        for child_name, child in module.named_children():
            if isinstance(child, EfficientLocalAttention):
                setattr(module, child_name, torch.nn.Identity())
    return model.state_dict()


@pytest.mark.parametrize("name, base", [("ela_b_resnet18", "resnet18"), ("ela_s_resnet50", "resnet50"),
                                        ("ela_s_mobilenetv2_100", "mobilenetv2_100")])
def test_backbone_is_timms_with_ela_added(name, base):
    """Take ELA out and what is left is timm's own model, key for key and output for output."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ours, theirs = timm.create_model(name).eval(), timm.create_model(base).eval()
    n_ela = sum(isinstance(m, EfficientLocalAttention) for m in ours.modules())
    assert n_ela == (16 if "mobilenet" in name else sum(RESNETS[int(base[6:])][2]))
    state = strip_ela(ours)
    assert state.keys() == theirs.state_dict().keys()
    theirs.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def _load_authors_file(tmp_path, authors: torch.nn.Module, name: str, **kwargs):
    """Ours, and ours with ``features_only=True``, loaded through timm's pretrained path (the converter) from a
    file holding the authors' model's state_dict."""
    path = tmp_path / "weights.pth"
    torch.save(authors.state_dict(), path)
    kwargs = dict(kwargs, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    return timm.create_model(name, **kwargs).eval(), timm.create_model(name, features_only=True, **kwargs).eval()


@pytest.mark.parametrize("size", [(230, 300), *(pytest.param(size, marks=pytest.mark.slow)
                                                 for size in [(224, 224), (197, 251), (800, 1333)])])
def test_mobilenetv2_matches_the_authors_code(tmp_path, size):
    """The authors' ImageNet MobileNetV2 with ELA (tests/backbones/_reference_ela.py, written from their
    mbv2_ela72.py: ELA-L) and ela_l_mobilenetv2_100, same weights in their layout, fp32: logits and every
    features_only map (the output of each stage's last block, theirs counted through ``features``)."""
    torch.manual_seed(0)
    authors = randomize_norms(MBV2_ELA72())
    ours, features = _load_authors_file(tmp_path, authors, "ela_l_mobilenetv2_100")
    ends = [sum(len(stage) for stage in ours.blocks[:s + 1]) for s in range(len(ours.blocks))]
    stages = [int(m.split(".")[1]) for m in features.feature_info.module_name()]
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_backend("torch"):
        want, want_maps = authors(x)
        assert_close_fp32(ours(x), want, f"logits at {size}")
        for s, got in zip(stages, features(x), strict=True):
            assert_close_fp32(got, want_maps[ends[s]], f"stage {s} map at {size}")


@pytest.mark.parametrize("name, size", [
    ("ela_t_resnet18", (230, 300)),
    *(pytest.param(name, size, marks=pytest.mark.slow) for name, size in [
        ("ela_b_resnet18", (224, 224)), ("ela_l_resnet18", (800, 1333)), ("ela_s_resnet50", (197, 251))])])
def test_resnet_matches_timms_with_the_authors_module(tmp_path, name, size):
    """timm's own ResNet with the authors' ELA module (their ``custom_att`` with the version's constants) in the
    same slot, same weights loaded through the converter (their ``gn`` is our ``norm``): logits and
    features_only maps."""
    version, base = name.split("_")[1], name.split("_")[2]
    torch.manual_seed(0)
    theirs = randomize_norms(timm.create_model(base, block_args=dict(
        attn_layer=lambda channels, **_: AuthorsELA(channels, *ELA_VERSIONS[version]))))  # timm passes device=
    assert any(k.endswith(".se.gn.weight") for k in theirs.state_dict())
    ours, features = _load_authors_file(tmp_path, theirs, name)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_backend("torch"):
        assert_close_fp32(ours(x), theirs(x), f"logits at {size}")
        want = theirs.forward_intermediates(x, intermediates_only=True)
        for i, (got, expected) in enumerate(zip(features(x), want, strict=True)):
            assert_close_fp32(got, expected, f"feature {i} at {size}")


def test_ela_sits_where_the_docstring_says():
    """ResNet: on the block output before the addition; MobileNetV2: between depthwise conv and projection of
    the inverted residuals, none in the first (t = 1) block."""
    resnet = timm.create_model("ela_b_resnet18").eval()
    block = resnet.layer2[0]
    assert isinstance(block.se, EfficientLocalAttention) and block.se.conv.in_channels == block.bn2.num_features
    x = torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        branch = block.bn2(block.conv2(block.act1(block.bn1(block.conv1(x)))))
        want = block.act2(block.se(branch) + block.downsample(x))
        torch.testing.assert_close(block(x), want)
    mnv2 = timm.create_model("ela_b_mobilenetv2_100").eval()
    ir = mnv2.blocks[2][1]
    assert isinstance(ir.se, EfficientLocalAttention) and ir.se.conv.in_channels == ir.conv_dw.out_channels
    assert isinstance(mnv2.blocks[0][0].se, torch.nn.Identity)


def tiny_resnet(version: str = "b") -> ElaResNet:
    model = ElaResNet(BasicBlock, (1, 1, 1, 1), channels=(32, 32, 32, 32), num_classes=10, name="tiny",
                      block_args=dict(attn_layer=_ela_layer(version)))
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # timm zero-inits the last BN of each block, which would hide ELA's input
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=g)
    return model.eval()


def test_triton_backend_matches_torch():
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the kernels run in Triton's interpreter
    model = tiny_resnet().to(device)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    for backend in ("torch", "triton"):
        xb = x.clone().requires_grad_()
        with use_backend(backend), trace() as calls:
            out = model(xb)
        out.square().sum().backward()
        assert set(calls) == {("ela_pool", backend), ("ela_gate", backend)} and len(calls) == 8
        results[backend] = out.detach(), xb.grad
    for a, b in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "ela_b_mobilenetv2_100"])
def test_torch_compile_fullgraph(name):
    model = tiny_resnet() if name == "tiny" else timm.create_model(name).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with use_backend("torch"), torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, channels, reductions", [
    ("ela_l_resnet50", [256, 1024], [4, 16]), ("ela_b_mobilenetv2_100", [24, 96], [4, 16])])
def test_features_only(name, channels, reductions):
    model = timm.create_model(name, features_only=True, out_indices=(1, 3)).eval()
    assert model.feature_info.channels() == channels and model.feature_info.reduction() == reductions
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64))
    want = [(c, 64 // r, 64 // r) for c, r in zip(channels, reductions, strict=True)]
    assert [tuple(m.shape[1:]) for m in maps] == want


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(timm.list_models("ela_*")))
def test_full_size_forward(name):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
