"""ULSAM: the module against the authors' per-subspace structure and the equations, the models against timm's
plain MobileNetV1 / V2 with the same weights, parameter counts, and the timm model surface."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import attnzoo  # noqa: F401  (registers our models in timm)
from attnzoo.backbones.ulsam import ULSAM, UlsamMobileNet
from attnzoo.kernels import trace, use_backend


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            for p in m.parameters():
                p.data = torch.randn(p.shape, generator=g) * 0.5
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean = 0.1 * torch.randn(m.running_mean.shape, generator=g)
            m.running_var = 0.5 + torch.rand(m.running_var.shape, generator=g)
    return model


class AuthorsSubSpace(nn.Module):
    """The authors' per-subspace layout (Nandan91/ULSAM:ulsam.py), written out here without their BN
    momentum: DW 1×1 + BN + ReLU, max-pool 3×3 s1, PW 1×1 to one map + BN + ReLU, softmax over H·W, x·a + x."""

    def __init__(self, nin):
        super().__init__()
        self.conv_dws, self.bn_dws = nn.Conv2d(nin, nin, 1, groups=nin), nn.BatchNorm2d(nin)
        self.conv_point, self.bn_point = nn.Conv2d(nin, 1, 1), nn.BatchNorm2d(1)

    def forward(self, x):
        out = nn.functional.max_pool2d(torch.relu(self.bn_dws(self.conv_dws(x))), 3, 1, 1)
        out = torch.relu(self.bn_point(self.conv_point(out)))
        B, _, H, W = out.shape
        a = out.view(B, 1, -1).softmax(dim=2).view(B, 1, H, W)
        return x * a + x


def load_authors_weights(ours: ULSAM, subspaces: list[AuthorsSubSpace]) -> None:
    cg = ours.conv_dw.out_channels // ours.num_subspaces
    for n, s in enumerate(subspaces):
        ch = slice(n * cg, (n + 1) * cg)
        for theirs, mine, part in ((s.conv_dws, ours.conv_dw, ch), (s.bn_dws, ours.bn_dw, ch),
                                   (s.conv_point, ours.conv_pw, slice(n, n + 1)),
                                   (s.bn_point, ours.bn_pw, slice(n, n + 1))):
            for key, value in theirs.state_dict().items():
                if key != "num_batches_tracked":
                    value.copy_(mine.state_dict()[key][part])


@pytest.mark.parametrize("train", [False, True])
def test_module_matches_authors_per_subspace_layout(train):
    ours = randomize(ULSAM(12, 3)).train(train)
    subspaces = [AuthorsSubSpace(4) for _ in range(3)]
    load_authors_weights(ours, subspaces)
    x = torch.randn(2, 12, 5, 7, generator=torch.Generator().manual_seed(1), requires_grad=True)
    want = torch.cat([s.train(train)(c) for s, c in zip(subspaces, x.chunk(3, dim=1), strict=True)], dim=1)
    (dx_want,) = torch.autograd.grad(want.square().sum(), x)
    for backend in ("reference", "torch", "triton"):
        with use_backend(backend):
            got = ours(x)
        (dx,) = torch.autograd.grad(got.square().sum(), x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, b=backend: f"{b}: {m}")
        torch.testing.assert_close(dx, dx_want, atol=1e-5, rtol=1e-5, msg=lambda m, b=backend: f"{b}: {m}")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for s in subspaces for p in s.parameters())


def test_flat_map_gives_uniform_attention():
    """With a zero pointwise conv, every subspace's map is constant: a = 1/(H·W), y = x · (1 + 1/(H·W))."""
    m = ULSAM(8, 2).eval()
    with torch.no_grad():
        m.conv_pw.weight.zero_()
        x = torch.randn(1, 8, 3, 5)
        torch.testing.assert_close(m(x), x * (1 + 1 / 15))


def test_parameters_are_timm_plus_ulsam():
    """5C + 3g per ULSAM: DW conv C + C (bias), BN 2C, PW conv C + g (bias), BN 2g."""
    for name, base, channels in (("ulsam_mobilenetv1_100", "mobilenetv1_100", 512),
                                 ("ulsam_mobilenetv2_100", "mobilenetv2_100", 96)):
        plain = sum(p.numel() for p in timm.create_model(base, device="meta").parameters())
        model = timm.create_model(name, device="meta")
        assert sum(p.numel() for p in model.parameters()) == plain + 5 * channels + 3 * 4


@pytest.mark.parametrize("name, base", [("ulsam_mobilenetv1_100", "mobilenetv1_100"),
                                        ("ulsam_mobilenetv2_100", "mobilenetv2_100")])
def test_backbone_is_timms_with_ulsam_added(name, base):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ours, theirs = timm.create_model(name).eval(), timm.create_model(base).eval()
    for stage in ours.blocks:
        if isinstance(stage[-1], ULSAM):
            del stage[-1]
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_triton_backend_matches_torch():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = timm.create_model("ulsam_mobilenetv2_100", ulsam={2: 4, 4: 2}).eval()
    for m in model.modules():  # random BN statistics in the attention, timm's init elsewhere
        if isinstance(m, ULSAM):
            randomize(m)
    model = model.to(device)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    for backend in ("torch", "triton"):
        xb = x.clone().requires_grad_()
        with use_backend(backend), trace() as calls:
            out = model(xb)
        out.square().sum().backward()
        assert calls == [("subspace_attention", backend)] * 2
        results[backend] = out.detach(), xb.grad
    for a, b in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_grad_checkpointing_gives_the_same_gradients():
    model = timm.create_model("ulsam_mobilenetv1_100").train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph():
    model = timm.create_model("ulsam_mobilenetv2_100").eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with use_backend("torch"), torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_model_surface_and_features():
    model = timm.create_model("ulsam_mobilenetv2_100").eval()
    assert isinstance(model, UlsamMobileNet) and isinstance(model.blocks[4][-1], ULSAM)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (1, 1280)
        model.reset_classifier(5)
        assert model(x).shape == (1, 5)
    features = timm.create_model("ulsam_mobilenetv2_100", features_only=True, out_indices=(2, 3)).eval()
    assert features.feature_info.channels() == [32, 96]
    with torch.no_grad():
        assert [tuple(t.shape) for t in features(x)] == [(1, 32, 8, 8), (1, 96, 4, 4)]


def test_bad_arguments_name_model_and_argument():
    with pytest.raises(ValueError, match=r"ulsam_mobilenetv1_100: the input `x` must be a \[B, 3, H, W\]"):
        timm.create_model("ulsam_mobilenetv1_100")(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"ulsam_mobilenetv2_100: `ulsam` stage 9 does not exist; stages are "
                                         r"0 … 6"):
        timm.create_model("ulsam_mobilenetv2_100", ulsam={9: 4})
    with pytest.raises(ValueError, match=r"ULSAM: `num_subspaces` must divide channels=96, got 5"):
        timm.create_model("ulsam_mobilenetv2_100", ulsam={4: 5})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ulsam_mobilenetv1_100", "ulsam_mobilenetv2_100"])
def test_full_size_forward(name):
    with torch.no_grad():
        assert timm.create_model(name).eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
