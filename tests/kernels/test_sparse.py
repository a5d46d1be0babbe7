"""sparse_attention: the fused Triton path (under the interpreter on CPU) and the SDPA path against the
reference, forward and all gradients, at several keep rates; the reference against its definition."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.kernels import sparse_attention, trace, use_backend
from attnzoo.kernels._triton import SM80, SM90, use_target
from attnzoo.kernels.sparse.fused import launch_config
from attnzoo.kernels.sparse.reference import sparse_attention_reference
from tests.kernels._util import assert_within_precision, past_int32_batch


def _inputs(B, H, M, N, D, keep, dtype=torch.float32, seed=0, transposed=False):
    """q, k, v and an index of ceil(keep·N) distinct keys per query, chosen at random (as a learned top-k)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, M, D, generator=gen)
    k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(2))
    if transposed:  # the model's qkv split gives [B, N, H, D] memory viewed as [B, H, N, D]
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    K = math.ceil(keep * N)
    index = torch.rand(B, H, M, N, generator=gen).topk(K, dim=-1).indices
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], index


def _run(fn, q, k, v, index, d_out):
    out = fn(q, k, v, index)
    return (out, *torch.autograd.grad(out, (q, k, v), d_out))


def _reference(q, k, v, index):
    return sparse_attention_reference(q, k, v, index, q.shape[-1] ** -0.5)


NAMES = ("out", "dq", "dk", "dv")


@pytest.mark.parametrize("keep", [1.0, 0.25, 1e-9])  # 1e-9: one key per query
@pytest.mark.parametrize("shape,transposed", [((2, 2, 49, 49, 24), True), ((1, 1, 196, 197, 64), False)])
def test_triton_matches_reference_fp32(keep, shape, transposed):
    (q, k, v), index = _inputs(*shape, keep, transposed=transposed)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    want = _run(_reference, q, k, v, index, d_out)
    with use_backend("triton"), trace() as calls:
        got = _run(sparse_attention, q, k, v, index, d_out)
    assert calls == [("sparse_attention", "triton")]
    for name, g, w in zip(NAMES, got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        err = (g - w).abs().max().item()
        assert err <= 1e-5 * max(1.0, w.abs().max().item()), f"{name}: {err:.3g}"


@pytest.mark.parametrize("target", [SM90, SM80], ids=lambda t: t.name)
@pytest.mark.parametrize("dtype,shape", [
    (torch.float16, (2, 2, 40, 49, 32)),    # one 64 x 64 tile
    (torch.float16, (1, 1, 130, 197, 64)),  # 3 query x 4 key blocks: the online softmax and the dK/dV loop
    (torch.bfloat16, (2, 2, 40, 49, 32)),   # runs the exact fp32 dot under the interpreter (its bf16 dot is
])                                          # wrong); bf16's tiles are fp16's (asserted), checked above
def test_triton_matches_reference_low_precision(dtype, shape, target):
    B, H, M, N, D = shape
    assert {**launch_config(M, N, D, torch.bfloat16, target), "FP32": False} == launch_config(
        M, N, D, torch.float16, target)
    (q, k, v), index = _inputs(*shape, 0.25, seed=2)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    exact = _run(_reference, *(t.detach().double().requires_grad_() for t in (q, k, v)), index, d_out.double())
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    same_dtype = _run(_reference_in_dtype, *low, index, d_out.to(dtype))
    with use_target(target), use_backend("triton"):
        got = _run(sparse_attention, *low, index, d_out.to(dtype))
    for name, g, s, e in zip(NAMES, got, same_dtype, exact, strict=True):
        assert g.dtype == dtype
        assert_within_precision(name, g, s, e, dtype)


@pytest.mark.parametrize("shape,dim,keep", [((3, 1, 40, 16), 0, 10), ((1, 2, 3, 16), 2, 2)], ids=["image", "token"])
def test_offsets_past_int32(shape, dim, keep):
    """q, k, v views whose image 2 (or token 2) starts past 2**31 elements, forward and gradients: the kernels'
    b · stride and token · stride offsets are int64."""
    q, k, v = (past_int32_batch(shape, torch.float16, seed, dim).requires_grad_() for seed in range(3))
    B, H, N, _ = shape
    index = torch.rand(B, H, N, N, generator=torch.Generator().manual_seed(3)).topk(keep, dim=-1).indices
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).half()
    want = _run(_reference_in_dtype, *(t.detach().float().requires_grad_() for t in (q, k, v)), index,
                d_out.float())
    with use_backend("triton"):
        got = _run(sparse_attention, q, k, v, index, d_out)
    for name, g, w in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(g.float(), w, atol=5e-3, rtol=5e-3, msg=name)


def test_repeated_index_counts_once():
    (q, k, v), index = _inputs(1, 2, 20, 30, 8, 0.2, seed=10)
    doubled = torch.cat([index, index[..., :2]], dim=-1)
    with use_backend("triton"):
        torch.testing.assert_close(sparse_attention(q, k, v, doubled), _reference(q, k, v, index),
                                   atol=1e-5, rtol=1e-5)


def _reference_in_dtype(q, k, v, index):
    """The reference computed entirely in the inputs' low precision (FlashAttention's error baseline)."""
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, index, True)
    return logits.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def test_keep_rate_one_is_dense_attention():
    (q, k, v), index = _inputs(1, 2, 50, 50, 16, 1.0, seed=4)
    dense = F.scaled_dot_product_attention(q, k, v)
    for backend in ("reference", "torch", "triton"):
        with use_backend(backend):
            torch.testing.assert_close(sparse_attention(q, k, v, index), dense, atol=1e-5, rtol=1e-5)


def test_reference_is_attention_over_the_kept_keys_only():
    """Row by row: softmax over the gathered keys, the others taking no part whatever their values."""
    (q, k, v), index = _inputs(1, 2, 6, 11, 8, 0.3, seed=5)
    out = _reference(q, k, v, index)
    for h in range(2):
        for i in range(6):
            keys = index[0, h, i]
            w = (q[0, h, i] @ k[0, h, keys].T * 8 ** -0.5).softmax(-1)
            torch.testing.assert_close(out[0, h, i], w @ v[0, h, keys])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_backend_matches_reference(dtype):
    (q, k, v), index = _inputs(2, 2, 48, 49, 16, 0.25, dtype=dtype, seed=6)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    with use_backend("torch"), trace() as calls:
        got = _run(sparse_attention, q, k, v, index, d_out)
    assert calls == [("sparse_attention", "torch")]
    want = _run(_reference, q, k, v, index, d_out)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    for name, g, w in zip(NAMES, got, want, strict=True):
        assert (g.float() - w.float()).abs().max().item() <= tol * max(1.0, w.float().abs().max().item()), name


def test_cpu_tensors_default_to_torch_backend():
    (q, k, v), index = _inputs(1, 1, 8, 8, 8, 0.5)
    with trace() as calls:
        sparse_attention(q, k, v, index)
    assert calls == [("sparse_attention", "torch")]


def test_reference_gradcheck():
    (q, k, v), index = _inputs(1, 2, 5, 7, 4, 0.5, seed=8)
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda *t: sparse_attention_reference(*t, index, 0.7), (q, k, v))


def test_int32_index_and_custom_scale():
    (q, k, v), index = _inputs(1, 2, 20, 30, 8, 0.2, seed=9)
    want = sparse_attention_reference(q, k, v, index, 0.3)
    with use_backend("triton"):
        got = sparse_attention(q, k, v, index.int(), scale=0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


_q = torch.randn(1, 2, 4, 8)
_i = torch.zeros(1, 2, 4, 2, dtype=torch.long)


@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.randn(2, 4, 8), _q, _q, _i), {}, r"`q` must be 4-D \[B, H, N, D\]"),
    ((_q, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), _i), {}, r"`k` and `v` must be \[B, H, N, D\]"),
    ((_q, _q.half(), _q, _i), {}, "`k` has dtype"),
    ((_q, _q, _q, _i.float()), {}, "`index` must be an int32 or int64 tensor"),
    ((_q, _q, _q, torch.zeros(1, 2, 4, 5, dtype=torch.long)), {}, r"`index` must be \[B, H, M, K\].*K <= N = 4"),
    ((_q, _q, _q, torch.zeros(1, 2, 3, 2, dtype=torch.long)), {}, r"`index` must be \[B, H, M, K\]"),
    ((_q, _q, _q, _i + 4), {}, r"`index` must hold key indices in \[0, 4\), got values in \[4, 4\]"),
    ((_q, _q, _q, _i), {"scale": torch.tensor(0.5)}, "`scale` must be a Python number"),
])
def test_bad_input_raises(args, kwargs, match):
    with pytest.raises(ValueError, match=f"sparse_attention: {match}"):
        sparse_attention(*args, **kwargs)


def test_triton_backend_rejects_unsupported():
    t = torch.randn(1, 1, 4, 160)
    with use_backend("triton"), pytest.raises(ValueError, match="the triton backend supports a head dim D <= 128"):
        sparse_attention(t, t, t, _i[:1, :1])
