"""window_attention: the fused Triton kernel (under TRITON_INTERPRET=1 on CPU) and the SDPA path against the
reference, forward and gradients, on the ragged shapes the models produce.

Every launch is configured for an H100 (sm_90a), so the interpreter runs the block sizes a GPU runs."""
import dataclasses

import pytest
import torch

from attnzoo.kernels import trace, use_backend, window_attention
from attnzoo.kernels._triton import SM90, use_target
from attnzoo.kernels.window import fused
from attnzoo.kernels.window.fused import MAX_D

from ._util import assert_within_precision, max_err, past_int32_batch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def gpu_target():
    with use_target(SM90):
        yield


def make_case(B, H, N, D, bias=None, mask_groups=None, dtype=torch.float32, device=DEVICE, seed=0):
    """q, k, v and optional bias (shape `bias`) and key mask ([mask_groups, N], every window keeping a key
    except window 0, which keeps a single one)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device, dtype) for _ in range(3))
    bias_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    b = None if bias is None else torch.randn(*bias, generator=g).to(device, bias_dtype)
    m = None
    if mask_groups:
        m = torch.rand(mask_groups, N, generator=g) > 0.4
        m[:, 0] = True
        m[0] = False
        m[0, N // 2] = True  # a window that is almost all padding
        m = m.to(device)
    return q, k, v, b, m


def naive_low_precision(q, k, v, bias, mask):
    """The attention formula evaluated entirely in q's dtype, logits and softmax included."""
    B, H, N, _ = q.shape
    bias = bias.view(-1, *bias.shape[-3:])
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    s = (s.view(B // bias.shape[0], *bias.shape) + bias.to(q.dtype)).view(B, H, N, N)
    s = s.view(B // mask.shape[0], mask.shape[0], H, N, N).masked_fill(~mask[:, None, None], float("-inf"))
    return s.view(B, H, N, N).softmax(-1) @ v


def run(backend, q, k, v, bias, mask, grad_out, dtype=None):
    """Output and gradients of q, k, v (and bias) on `backend`, in `dtype` (default: the inputs')."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    if backend == "naive":
        out = naive_low_precision(*leaves, b, mask)
    else:
        with use_backend(backend), trace() as calls:
            out = window_attention(*leaves, bias=b, mask=mask)
        assert calls == [("window_attention", backend)], f"expected the {backend} path, ran {calls}"
    out.backward(grad_out.to(out.dtype))
    grads = [t.grad for t in leaves] + ([b.grad] if b is not None else [])
    return out, grads


def assert_matches_reference_fp32(backend, q, k, v, bias, mask, grad_out):
    """Output within 1e-5 of the reference, every gradient within 1e-5 relative to its size."""
    ref, ref_grads = run("reference", q, k, v, bias, mask, grad_out)
    out, grads = run(backend, q, k, v, bias, mask, grad_out)
    assert max_err(out, ref) <= 1e-5
    for name, g, rg in zip(["dq", "dk", "dv", "dbias"], grads, ref_grads, strict=False):  # dbias only with a bias
        assert max_err(g, rg) <= 1e-5 * max(1.0, rg.abs().max().item()), name


CASES = {
    # id: (B, H, N, D, bias shape, mask groups)
    "plain-N49-D24": (4, 2, 49, 24, None, None),
    "B1-N49-D32-bias": (1, 3, 49, 32, (3, 49, 49), None),
    "rel-bias-N49": (6, 2, 49, 32, (2, 49, 49), None),
    "window-bias-G3-headshared": (6, 2, 16, 16, (3, 1, 16, 16), None),
    "pad-mask-G2": (4, 2, 49, 24, None, 2),
    "bias-and-mask-G3": (6, 2, 49, 16, (2, 49, 49), 3),
    "N64-D48": (2, 2, 64, 48, (2, 64, 64), None),
    "N100-D24-mask": (2, 1, 100, 24, (1, 100, 100), 2),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_reference_fp32(case, backend):
    B, H, N, D, bias, mask_groups = case
    q, k, v, b, m = make_case(B, H, N, D, bias, mask_groups)
    grad_out = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert_matches_reference_fp32(backend, q, k, v, b, m, grad_out)


@pytest.mark.parametrize("D", [16, 24, 32, 48, 64, 96, MAX_D])
def test_every_supported_head_dim(D):
    q, k, v, b, m = make_case(2, 1, 49, D, (1, 49, 49), 2)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert_matches_reference_fp32("triton", q, k, v, b, m, grad_out)


def test_non_contiguous_inputs():
    """q, k, v as models produce them: views of one qkv projection, transposed to [B, H, N, D]."""
    B, N, H, D = 3, 49, 2, 24
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    bias = torch.randn(H, N, N, device=DEVICE)
    grad_out = torch.randn(B, H, N, D, device=DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert_matches_reference_fp32("triton", q, k, v, bias, None, grad_out)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_fully_masked_window_gives_zeros_not_nan(backend):
    q, k, v, _, _ = make_case(4, 2, 16, 16)
    mask = torch.ones(2, 16, dtype=torch.bool, device=DEVICE)
    mask[1] = False  # windows 1 and 3 have no key at all
    out, grads = run(backend, q, k, v, None, mask, torch.ones_like(q))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert out[1::2].abs().max() == 0 and out[0::2].abs().max() > 0
    assert grads[0][1::2].abs().max() == 0  # dq of a query that attends to nothing


def test_padded_keys_get_no_weight():
    """Changing the masked keys' content changes nothing."""
    q, k, v, b, _ = make_case(2, 2, 49, 32, (2, 49, 49))
    mask = torch.arange(49, device=DEVICE) < 30
    with use_backend("triton"):
        out = window_attention(q, k, v, b, mask)
        k2, v2 = k.clone(), v.clone()
        k2[..., 30:, :] = 1e3
        v2[..., 30:, :] = -1e3
        assert torch.equal(window_attention(q, k2, v2, b, mask), out)


def assert_low_precision_matches(q, k, v, b, m, dtype, seed=1):
    """The fused result in `dtype` within FlashAttention's rule (twice the same-dtype PyTorch error) of fp64."""
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(q.device)
    exact, exact_grads = run("reference", q.double(), k.double(), v.double(), b.double(), m, grad_out.double())
    plain, plain_grads = run("naive", q, k, v, b, m, grad_out, dtype)
    fused_out, fused_grads = run("triton", q, k, v, b, m, grad_out, dtype)
    assert fused_out.dtype == dtype
    assert_within_precision("out", fused_out, plain, exact, dtype)
    for name, f, p, e in zip(["dq", "dk", "dv", "dbias"], fused_grads, plain_grads, exact_grads, strict=True):
        assert_within_precision(name, f, p, e, dtype)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype, seed):
    """fp16 exactly as the GPU runs it; bf16 through the interpreter's fp32 `tl.dot` workaround on CPU
    (the bf16 tensor-core path itself is checked by test_cuda.py on a GPU)."""
    q, k, v, b, m = make_case(4, 2, 49, 32, (2, 49, 49), 2, seed=seed)
    assert_low_precision_matches(q, k, v, b, m, dtype, seed=seed + 1)


@pytest.mark.parametrize("N", [49, 144])
def test_bf16_tiling_with_fp16_data(monkeypatch, N):
    """bf16's launch configuration (its tiles, warps, its tensor-core dot rather than the fp32 workaround) on
    fp16 data: the interpreter's bf16 `tl.dot` is wrong, its fp16 one exact."""
    config = fused._launch_config
    monkeypatch.setattr(fused, "_launch_config", lambda N, D, dtype, target: config(N, D, torch.bfloat16, target))
    q, k, v, b, m = make_case(2, 2, N, 32, (1, 2, N, N), 2)
    assert_low_precision_matches(q, k, v, b, m, torch.float16)


def test_several_key_blocks_fp32():
    """144 tokens (MaxViT at 384 px): 5 key blocks of 32 in fp32, looped with the online softmax, with a bias,
    its gradient and a key mask."""
    assert triton_key_blocks(144, torch.float32) > 1
    q, k, v, b, m = make_case(2, 1, 144, 32, (1, 144, 144), 2)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert_matches_reference_fp32("triton", q, k, v, b, m, grad_out)


def test_several_key_blocks_fp16():
    """144 tokens in fp16: 3 key blocks of 64 (not one of 256), dQ by its own kernel, the bias gradient added
    tile by tile."""
    assert triton_key_blocks(144, torch.float16) == 3
    q, k, v, b, m = make_case(2, 2, 144, 32, (2, 144, 144), 2)
    assert_low_precision_matches(q, k, v, b, m, torch.float16)


def triton_key_blocks(N, dtype):
    return -(-N // fused._launch_config(N, 32, dtype, SM90)["BLOCK_N"])


@pytest.mark.parametrize("N", [16, 49])
def test_bias_grad_summed_over_several_windows_per_program(N):
    """On a 1-SM target each bias-gradient program takes several windows: their dS summed in registers (N=16,
    one query block) or added tile by tile (N=49: 2 query blocks of 32 in fp32) into the program's partial sum."""
    target = dataclasses.replace(SM90, num_sms=1)
    B, H = 8, 2
    assert fused._bias_grad_chunks(B, 1, H, triton_key_blocks(N, torch.float32), target) > 1
    q, k, v, b, m = make_case(B, H, N, 16, (H, N, N), 2)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with use_target(target):
        assert_matches_reference_fp32("triton", q, k, v, b, m, grad_out)


def test_views_past_int32_offsets():
    """Window 2 of this view starts past element 2³¹: its offsets must be 64-bit. The storage is reserved, not
    written (the OS commits only the pages touched), and the results equal those on contiguous copies."""
    B, H, N, D = 3, 1, 16, 16
    stride = 2**30 + 4096  # an int32 stride; window 2 at 2·stride > 2³¹
    store = torch.empty(2 * stride + 3 * H * N * D, dtype=torch.float16, device=DEVICE)
    q, k, v = (store.as_strided((B, H, N, D), (stride, N * D, D, 1), i * H * N * D) for i in range(3))
    g = torch.Generator().manual_seed(0)
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, generator=g))
    mask = torch.arange(N, device=DEVICE) < N - 3
    grad_out = torch.randn(q.shape, generator=g).to(DEVICE, torch.float16)
    out, grads = run("triton", q, k, v, None, mask, grad_out)
    ref, ref_grads = run("triton", q.contiguous(), k.contiguous(), v.contiguous(), None, mask, grad_out)
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    exact = window_attention(q.double(), k.double(), v.double(), mask=mask)
    assert max_err(out, exact) < 1e-2


def test_views_past_int32_row_offsets():
    """Token 2 of each window of these views sits past element 2³¹ (a token stride of 2³⁰ + 2²⁰): the in-window
    row offsets, row · stride, must be 64-bit too. The results equal those on contiguous copies."""
    q, k, v = (past_int32_batch((1, 2, 3, 16), torch.float16, seed, dim=2) for seed in range(3))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).half()
    out, grads = run("triton", q, k, v, None, None, grad_out)
    ref, ref_grads = run("triton", q.contiguous(), k.contiguous(), v.contiguous(), None, None, grad_out)
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    assert max_err(out, window_attention(q.double(), k.double(), v.double())) < 1e-2


def test_reference_gradcheck_fp64():
    q, k, v, b, m = make_case(3, 2, 9, 8, (3, 2, 9, 9), 3, dtype=torch.float64, device="cpu")
    inputs = [t.requires_grad_() for t in (q, k, v, b)]
    with use_backend("reference"):
        assert torch.autograd.gradcheck(lambda q, k, v, b: window_attention(q, k, v, b, m), inputs)


def test_compiles_without_graph_break():
    q, k, v, b, m = make_case(4, 2, 49, 32, (2, 49, 49), 2, device="cpu")
    compiled = torch.compile(window_attention, fullgraph=True, backend="eager")
    assert torch.equal(compiled(q, k, v, b, m), window_attention(q, k, v, b, m))


BAD = {
    "k-shape": (dict(k=torch.randn(2, 2, 16, 8)), r"`k` must have the shape of `q` \[B, H, N, D\] = \[2, 2, 16, 16\]"),
    "q-rank": (dict(q=torch.randn(2, 16, 16)), r"`q` must be 4-D \[B, H, N, D\], got shape \[2, 16, 16\]"),
    "int-dtype": (dict(v=torch.ones(2, 2, 16, 16, dtype=torch.int64)), r"`v` must be a floating-point tensor"),
    "dtype-mismatch": (dict(v=torch.randn(2, 2, 16, 16, dtype=torch.float64)), r"`v` has dtype torch.float64"),
    "bias-N": (dict(bias=torch.randn(2, 16, 15)), r"`bias` must be \[H, N, N\] or \[G, H, N, N\]"),
    "bias-groups": (dict(bias=torch.randn(3, 2, 16, 16)), r"`bias` must be .* with B divisible by G \(B=2"),
    "bias-heads": (dict(bias=torch.randn(3, 16, 16)), r"`bias` must be \[H, N, N\].*got \[3, 16, 16\]"),
    "mask-dtype": (dict(mask=torch.ones(16)), r"`mask` must be a boolean tensor"),
    "mask-shape": (dict(mask=torch.ones(2, 15, dtype=torch.bool)), r"`mask` must be \[N\] or \[G, N\]"),
}


@pytest.mark.parametrize("override,message", BAD.values(), ids=BAD.keys())
def test_bad_input_names_the_argument(override, message):
    args = dict(q=torch.randn(2, 2, 16, 16), k=torch.randn(2, 2, 16, 16), v=torch.randn(2, 2, 16, 16))
    args.update(override)
    with pytest.raises(ValueError, match="window_attention: " + message):
        window_attention(**args)


def test_head_dim_over_the_kernel_limit():
    q = torch.randn(2, 1, 16, MAX_D + 32)
    with use_backend("triton"), pytest.raises(ValueError, match=f"supports a head dim D <= {MAX_D}, got `q` with D"):
        window_attention(q, q, q)
    with trace() as calls:
        window_attention(q, q, q)  # the automatic choice runs it on the torch path
    assert calls == [("window_attention", "torch")]
