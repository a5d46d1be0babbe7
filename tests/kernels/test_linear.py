"""linear_attention: the fused Triton path (under the interpreter on CPU, at the launch configuration an H100
runs) against the reference, forward and all gradients; the reference against the two papers' formulas as their
authors write them, and autograd's numerical gradient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.backbones import l2vit, ravlt
from attnzoo.kernels import linear_attention, trace, use_backend
from attnzoo.kernels._triton import SM80, SM90, TARGETS, use_target
from attnzoo.kernels.linear import fused
from attnzoo.kernels.linear.reference import linear_attention_reference, rotate_pairs

from ._util import assert_within_precision

# the two models' settings: L²ViT (ReLU, clamped normalizer) and RALA (ELU+1, key weights, RoPE, eps)
L2VIT = dict(feature_map="relu", clamp_min=100.0)
RALA = dict(feature_map="elu", reweight_keys=True, eps=1e-6)


def _rope(N, D, dtype=torch.float32):
    """RALA's 2D tables for an N = h × w map: half the channels turn with the row, half with the column."""
    h = next(d for d in range(int(N ** 0.5), 0, -1) if N % d == 0)
    angle = (1.0 / 10000 ** torch.linspace(0, 1, D // 4)).repeat_interleave(2)
    rows, cols = torch.arange(h).repeat_interleave(N // h), torch.arange(N // h).repeat(h)
    theta = torch.cat([rows[:, None] * angle, cols[:, None] * angle], -1)
    return theta.cos().to(dtype), theta.sin().to(dtype)


def _inputs(B, H, N, D, dtype, seed=0, shift=0.0, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) for _ in range(3))
    q, k = q + shift, k + shift
    if transposed:  # a [B, N, H, D] layout viewed as [B, H, N, D], as the models' qkv split gives
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _run(fn, q, k, v, d_out):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), d_out))


CASES = {
    # name: (shape, options, shift of q and k: for l2vit, the clamp binds about half of the rows)
    "l2vit": ((2, 3, 49, 24), L2VIT, -0.2),
    "l2vit_unclamped": ((1, 2, 50, 32), dict(feature_map="relu"), 0.0),
    "rala": ((2, 2, 49, 32), dict(RALA, rope=True), 0.0),
    "rala_no_rope": ((1, 1, 300, 64), RALA, 0.0),
    "elu_plain": ((1, 2, 17, 16), dict(feature_map="elu"), 0.0),
    "rala_d96": ((1, 1, 140, 96), dict(RALA, rope=True), 0.0),  # RAVLT-B/L's head dim, padded to 128
}
SM80_CASES = ("rala", "rala_no_rope")  # D = 64: fp16/bf16 tiles differ between sm_80 and sm_90a


@pytest.fixture(autouse=True)
def _h100():
    """The fused kernels run at the launch configuration of an H100 (the CPU's default target, made explicit)."""
    with use_target(SM90):
        yield


def _model_head_dims() -> set[int]:
    """The head dims of every stage of every RAVLT and L²ViT variant."""
    return {dim // heads for models in (ravlt._MODELS, l2vit._MODELS) for cfg in models.values()
            for dim, heads in zip(cfg["dims"], cfg["num_heads"], strict=True)}


def test_cases_cover_the_models_tiles_and_split_sums():
    """The parity cases run every tile shape the models launch on either target, in fp32 and in fp16, and token
    sums split over several programs, each summing several tiles, with a ragged last tile."""
    for dtype in (torch.float32, torch.float16):
        tiles = {(c.BLOCK_N, c.BLOCK_D, c.num_warps) for c in
                 [fused.launch_config(*shape, dtype, SM90) for shape, _, _ in CASES.values()]
                 + [fused.launch_config(*CASES[case][0], dtype, SM80) for case in SM80_CASES
                    if dtype == torch.float16]}
        models = {(c.BLOCK_N, c.BLOCK_D, c.num_warps) for c in (fused.launch_config(8, 2, 3136, D, dtype, t)
                                                                for D in _model_head_dims() for t in TARGETS)}
        assert models <= tiles, f"{dtype}: tiles {models - tiles} untested"
        split = [(shape, c) for shape, c in ((s, fused.launch_config(*s, dtype, SM90)) for s, _, _ in CASES.values())
                 if c.split > 1 and c.chunk > c.BLOCK_N and shape[2] % c.BLOCK_N]
        assert split, f"{dtype}: no case splits its token sums into chunks of several tiles with a ragged tail"


def test_bf16_tiles_as_fp16():
    """bf16 launches exactly fp16's configuration, so the fp16 cases check bf16's tiling on the CPU: the
    interpreter's bf16 `tl.dot` is wrong, and its bf16 runs multiply the bf16 operands in exact fp32 instead."""
    for D in _model_head_dims():
        for N in (49, 3136, 9216):
            for t in TARGETS:
                assert fused.launch_config(4, 3, N, D, torch.bfloat16, t) == \
                    fused.launch_config(4, 3, N, D, torch.float16, t)


def _options(opts, N, D, dtype):
    opts = dict(opts)
    if opts.pop("rope", False):
        opts["rope"] = _rope(N, D, dtype)
    return opts


def _reference(q, k, v, feature_map="relu", reweight_keys=False, scale=None, rope=None, clamp_min=None, eps=0.0):
    s = q.shape[-1] ** -0.5 if reweight_keys and scale is None else scale
    cos, sin = rope if rope is not None else (None, None)
    return linear_attention_reference(q, k, v, feature_map, s, cos, sin, clamp_min, eps)


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference_fp32(case):
    shape, opts, shift = CASES[case]
    q, k, v = _inputs(*shape, torch.float32, shift=shift, transposed=case == "l2vit")
    opts = _options(opts, shape[2], shape[3], torch.float32)
    d_out = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    want = _run(lambda *t: _reference(*t, **opts), q, k, v, d_out)
    with use_backend("triton"), trace() as calls:
        got = _run(lambda *t: linear_attention(*t, **opts), q, k, v, d_out)
    assert calls == [("linear_attention", "triton")]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == torch.float32 and g.shape == w.shape
        err = (g - w).abs().max().item()
        assert err <= 1e-5 * max(1.0, w.abs().max().item()), f"{case} {name}: max error {err:.3g}"


def test_clamp_binds_some_rows_of_the_l2vit_case():
    """The l2vit case exercises both sides of the clamp (and so both branches of its gradient)."""
    (B, H, N, D), _, shift = CASES["l2vit"]
    q, k, _ = _inputs(B, H, N, D, torch.float32, shift=shift)
    den = F.relu(q) @ F.relu(k).sum(-2, keepdim=True).transpose(-2, -1)
    assert (den < 100).any() and (den > 100).any()


@pytest.mark.parametrize("case,dtype,target", [
    pytest.param(case, dtype, target, id=f"{case}-{str(dtype)[6:]}-{target.name}") for case, dtype, target in
    [(case, torch.float16, SM90) for case in CASES] + [(case, torch.bfloat16, SM90) for case in ("l2vit", "rala")]
    + [(case, torch.float16, SM80) for case in SM80_CASES]])
def test_triton_low_precision(case, dtype, target):
    """FlashAttention's rule: at most twice the error of the plain formula run in the low precision itself."""
    shape, opts, shift = CASES[case]
    q, k, v = _inputs(*shape, dtype, seed=2, shift=shift)
    d_out = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    exact = _run(lambda *t: _reference(*t, **_options(opts, shape[2], shape[3], torch.float64)),
                 *(t.detach().double().requires_grad_() for t in (q, k, v)), d_out.double())
    same_dtype = _run(lambda *t: _low_precision_formula(*t, **_options(opts, shape[2], shape[3], dtype)), q, k, v,
                      d_out)
    with use_backend("triton"), use_target(target):
        got = _run(lambda *t: linear_attention(*t, **_options(opts, shape[2], shape[3], dtype)), q, k, v, d_out)
    for name, g, s, e in zip(("out", "dq", "dk", "dv"), got, same_dtype, exact, strict=True):
        assert g.dtype == dtype
        assert_within_precision(f"{case} {name}", g, s, e, dtype)


def test_offsets_past_2_31_elements():
    """Views whose batch stride is 2^30 elements put the third image past 2^31: the kernels must give exactly
    what they give on contiguous copies (int32 offsets would wrap and read outside the tensors). The storage is
    one lazy `torch.empty` of 4 GiB, of which the OS commits only the pages the views touch."""
    B, H, N, D = 3, 1, 40, 16
    stride, size = 2 ** 30, H * N * D
    base = torch.empty(stride * (B - 1) + 4 * size, dtype=torch.float16)
    views = [base[i * size:].as_strided((B, H, N, D), (stride, N * D, D, 1)) for i in range(4)]
    gen = torch.Generator().manual_seed(7)
    for t in views:
        t.copy_(torch.randn(B, H, N, D, generator=gen))
    opts = _options(RALA, N, D, torch.float16)
    copies = [t.clone() for t in views]
    with use_backend("triton"):
        got = _run(lambda *t: linear_attention(*t, **opts), *(t.requires_grad_() for t in views[:3]), views[3])
        want = _run(lambda *t: linear_attention(*t, **opts), *(t.requires_grad_() for t in copies[:3]), copies[3])
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert torch.equal(g, w), f"{name} differs on the strided views"


def _low_precision_formula(q, k, v, feature_map="relu", reweight_keys=False, rope=None, clamp_min=None, eps=0.0):
    """The reference's steps, every one in the inputs' own dtype."""
    N = q.shape[-2]
    phi_q, phi_k = (F.relu(t) if feature_map == "relu" else F.elu(t) + 1 for t in (q, k))
    if reweight_keys:
        scores = q.shape[-1] ** -0.5 * phi_q.mean(-2, keepdim=True) @ phi_k.transpose(-2, -1)
        phi_k = phi_k * (N * scores.softmax(-1)).transpose(-2, -1)
    den = phi_q @ phi_k.sum(-2, keepdim=True).transpose(-2, -1) + N * eps
    if clamp_min is not None:
        den = den.clamp(min=clamp_min)
    if rope is not None:
        phi_q, phi_k = rotate_pairs(phi_q, *rope), rotate_pairs(phi_k, *rope)
    return phi_q @ (phi_k.transpose(-2, -1) @ v) / den


def test_reference_is_l2vit_linear_attention():
    """The authors' LinearAttention (ChuanyangZheng/L2ViT, classification/models/l2vit.py) between qkv and the
    temperature: (q · kᵀv) / clamp(q · Σk, 100) with q, k through ReLU."""
    q, k, v = (t.detach() for t in _inputs(2, 3, 49, 16, torch.float64, seed=4, shift=-0.2))
    q_, k_ = F.relu(q), F.relu(k)
    denom = torch.clamp(q_ @ k_.transpose(-2, -1).sum(dim=-1, keepdim=True), 1e2)
    want = q_ @ (k_.transpose(-2, -1) @ v) / denom
    torch.testing.assert_close(linear_attention_reference(q, k, v, "relu", None, None, None, 100.0, 0.0), want)


def test_reference_is_rala():
    """RALA as its authors compute it (qhfan/RALA, classfication/RALA.py, GateLinearAttentionNoSilu), in the
    mean form with the 1/√N factors, up to the LePE and the gate."""
    B, H, N, D = 2, 2, 30, 16
    q, k, v = (t.detach() for t in _inputs(B, H, N, D, torch.float64, seed=5))
    cos, sin = _rope(N, D, torch.float64)
    scale = D ** -0.5
    q_, k_ = F.elu(q) + 1.0, F.elu(k) + 1.0
    eff = torch.softmax(scale * q_.mean(dim=-2, keepdim=True) @ k_.transpose(-1, -2), dim=-1).transpose(-1, -2)
    k_ = k_ * eff * N
    z = 1 / (q_ @ k_.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
    kv = (rotate_pairs(k_, cos, sin).transpose(-2, -1) * N ** -0.5) @ (v * N ** -0.5)
    want = rotate_pairs(q_, cos, sin) @ kv * z
    got = linear_attention_reference(q, k, v, "elu", scale, cos, sin, None, 1e-6)
    torch.testing.assert_close(got, want)


def test_rotate_pairs_is_a_rotation_of_each_pair():
    x = torch.randn(3, 8, dtype=torch.float64)
    theta = torch.rand(3, 4, dtype=torch.float64).repeat_interleave(2, -1)
    y = rotate_pairs(x, theta.cos(), theta.sin())
    c, s = theta[:, ::2].cos(), theta[:, ::2].sin()
    torch.testing.assert_close(y[:, ::2], x[:, ::2] * c - x[:, 1::2] * s)
    torch.testing.assert_close(y[:, 1::2], x[:, 1::2] * c + x[:, ::2] * s)


@pytest.mark.parametrize("case", ["l2vit", "rala"])
def test_reference_gradcheck(case):
    shape, opts, shift = CASES[case]
    q, k, v = (t.detach().double()[:1, :1, :12, :8].requires_grad_()
               for t in _inputs(*shape, torch.float64, seed=6, shift=shift))
    opts = _options(opts, 12, 8, torch.float64)
    if "clamp_min" in opts:
        opts["clamp_min"] = 5.0  # binds on some of these 12 rows, not on others
    assert torch.autograd.gradcheck(lambda *t: _reference(*t, **opts), (q, k, v))


def test_cpu_tensors_default_to_torch_backend():
    q, k, v = _inputs(1, 1, 16, 16, torch.float32)
    with trace() as calls:
        linear_attention(q, k, v)
    assert calls == [("linear_attention", "torch")]


_x = torch.randn(1, 2, 8, 4)


@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.randn(2, 3, 8),) * 3, {}, r"`q` must be 4-D \[B, H, N, D\]"),
    ((_x, torch.randn(1, 2, 9, 4), _x), {}, "`k` must have the shape of `q`"),
    ((_x, _x.half(), _x), {}, "`k` has dtype"),
    ((_x,) * 3, {"feature_map": "softmax"}, "`feature_map` must be one of relu, elu"),
    ((_x,) * 3, {"scale": 0.5}, "`scale` only applies with `reweight_keys=True`"),
    ((_x,) * 3, {"clamp_min": torch.tensor(1.0)}, "`clamp_min` must be a Python number"),
    ((_x,) * 3, {"rope": (torch.ones(8, 6), torch.ones(8, 6))}, r"`rope` cos must be \[N, D\] = \[8, 4\]"),
    ((torch.randn(1, 2, 8, 5),) * 3, {"rope": (torch.ones(8, 5),) * 2},
     "`rope` rotates channel pairs and needs an even head dim D, got D=5"),
    ((torch.randn(1, 2, 0, 4),) * 3, {}, "`q` must not be empty"),
])
def test_bad_input_raises(args, kwargs, match):
    with pytest.raises(ValueError, match=f"linear_attention: {match}"):
        linear_attention(*args, **kwargs)


@pytest.mark.parametrize("t,match", [
    (torch.randn(1, 1, 4, 160), "triton backend supports a head dim D <= 128"),
    (torch.randn(1, 1, 4, 8, dtype=torch.float64), "triton backend takes float16, bfloat16 or float32"),
])
def test_triton_backend_rejects_unsupported(t, match):
    with use_backend("triton"), pytest.raises(ValueError, match=f"linear_attention: the {match}"):
        linear_attention(t, t, t)
