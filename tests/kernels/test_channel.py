"""channel_attention: the fused Triton path (under the interpreter on CPU) and the torch path against the
reference, forward and gradients; the reference against autograd's numerical gradient and timm's module."""
from __future__ import annotations

import pytest
import torch

from attnzoo.kernels import channel_attention, trace, use_backend
from attnzoo.kernels._triton import SM80, SM90, use_target
from attnzoo.kernels.channel import fused
from attnzoo.kernels.channel.reference import channel_attention_reference
from tests.kernels._util import past_int32_batch

# max |error| allowed, relative to the largest magnitude of the reference result (or absolute below 1)
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _inputs(B, G, N, D, dtype, transposed_q=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, G, N, D, generator=gen).to(dtype) for _ in range(3))
    if transposed_q:  # a [B, N, G, hd] layout viewed as [B, G, N, hd], as the model's qkv split gives
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        assert not q.is_contiguous()
    return [t.requires_grad_() for t in (q, k, v)]


def _run(fn, q, k, v, d_out):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), d_out))


def _assert_close(got, want, dtype, what):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == w.dtype == dtype and g.shape == w.shape
        err = (g.float() - w.float()).abs().max().item()
        bound = TOL[dtype] * max(1.0, w.float().abs().max().item())
        assert err <= bound, f"{what} {name}: max error {err:.3g} > {bound:.3g}"


def _reference_default_scale(q, k, v):
    return channel_attention_reference(q, k, v, q.shape[-1] ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,transposed_q", [((2, 3, 49, 24), True), ((1, 2, 200, 32), False)])
def test_triton_matches_reference(dtype, shape, transposed_q):
    q, k, v = _inputs(*shape, dtype, transposed_q)
    d_out = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = _run(_reference_default_scale, q, k, v, d_out)
    with use_backend("triton"), trace() as calls:
        got = _run(channel_attention, q, k, v, d_out)
    assert calls == [("channel_attention", "triton")]
    _assert_close(got, want, dtype, "triton")


@pytest.mark.parametrize("target", [SM90, SM80], ids=lambda t: t.name)
def test_triton_gpu_blocks_fp16(target):
    """The target's own launch (128-token blocks, the reduction split over them) on 3 blocks, the last ragged.
    bf16 launches the same blocks (asserted); the interpreter's bf16 `tl.dot` is wrong, so fp16 data checks them.
    """
    shape = (1, 2, 300, 32)
    config = fused.launch_config(*shape, torch.float16, target)
    assert fused.launch_config(*shape, torch.bfloat16, target) == config and config["BLOCK_N"] == 128
    q, k, v = _inputs(*shape, torch.float16, seed=7)
    d_out = torch.randn(shape, generator=torch.Generator().manual_seed(8)).half()
    want = _run(_reference_default_scale, q, k, v, d_out)
    with use_target(target), use_backend("triton"):
        got = _run(channel_attention, q, k, v, d_out)
    _assert_close(got, want, torch.float16, target.name)


@pytest.mark.parametrize("shape,dim", [((3, 1, 40, 16), 0), ((1, 2, 3, 16), 2)], ids=["image", "token"])
def test_offsets_past_int32(shape, dim):
    """q, k, v views whose image 2 (or token 2) starts past 2**31 elements: the (bg // G) · stride and
    token · stride offsets are int64."""
    q, k, v = (past_int32_batch(shape, torch.float16, seed, dim).requires_grad_() for seed in range(3))
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).half()
    want = _run(lambda *t: channel_attention_reference(*t, 0.25),
                *(t.detach().clone().requires_grad_() for t in (q, k, v)), d_out)
    with use_backend("triton"):
        got = _run(lambda *t: channel_attention(*t, scale=0.25), q, k, v, d_out)
    _assert_close(got, want, torch.float16, "past 2**31")


@pytest.mark.parametrize("block_n,splits", [(16, 3), (16, 13), (32, 1)])
def test_triton_split_n_reduction(block_n, splits):
    """The kᵀv and doutᵀq sums split over several programs of several N-blocks each, the last block ragged."""
    q, k, v = _inputs(2, 2, 200, 32, torch.float32, seed=2)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    launch = fused._Launch(q, block_n, splits)
    with torch.no_grad():
        out, attn = fused._forward(q, k, v, 0.3, launch)
        got = (out, *fused._backward(q, k, v, attn, d_out, 0.3, launch))
    want = _run(lambda *t: channel_attention_reference(*t, 0.3), q, k, v, d_out)
    _assert_close(got, want, torch.float32, f"block_n={block_n} splits={splits}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_backend_matches_reference(dtype):
    q, k, v = _inputs(2, 3, 49, 24, dtype, transposed_q=True, seed=4)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    with use_backend("torch"), trace() as calls:
        got = _run(lambda *t: channel_attention(*t, scale=0.5), q, k, v, d_out)
    assert calls == [("channel_attention", "torch")]
    _assert_close(got, _run(lambda *t: channel_attention_reference(*t, 0.5), q, k, v, d_out), dtype, "torch")


def test_cpu_tensors_default_to_torch_backend():
    q, k, v = _inputs(1, 1, 49, 16, torch.float32)
    with trace() as calls:
        channel_attention(q, k, v)
    assert calls == [("channel_attention", "torch")]


def test_reference_gradcheck():
    q, k, v = (t.detach().double().requires_grad_() for t in _inputs(1, 2, 7, 5, torch.float32, seed=6))
    assert torch.autograd.gradcheck(lambda *t: channel_attention_reference(*t, 0.7), (q, k, v))


def test_reference_matches_timm_channel_attention():
    """The op is timm's ChannelAttention between its qkv and proj layers, default scale included."""
    from timm.models.davit import ChannelAttention

    torch.manual_seed(7)
    B, N, C, G = 2, 20, 48, 3
    attn = ChannelAttention(C, num_heads=G, qkv_bias=True).eval()
    x = torch.randn(B, N, C)
    q, k, v = attn.qkv(x).reshape(B, N, 3, G, C // G).permute(2, 0, 3, 1, 4)
    with use_backend("reference"):
        ours = attn.proj(channel_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(ours, attn(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.randn(2, 3, 8),) * 3, {}, r"`q` must be 4-D \[B, G, N, d\]"),
    ((torch.randn(1, 2, 8, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 8, 4)), {}, "`k` must have the"),
    ((torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4).half(), torch.randn(1, 2, 8, 4)), {}, "`k` has dtype"),
    ((torch.ones(1, 2, 8, 4, dtype=torch.long),) * 3, {}, "`q` must be a floating-point tensor"),
    ((torch.randn(1, 2, 8, 4),) * 3, {"scale": torch.tensor(0.5)}, "`scale` must be a Python number"),
    ((torch.randn(1, 2, 0, 4),) * 3, {}, "`q` must not be empty"),
])
def test_bad_input_raises(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        channel_attention(*args, **kwargs)


@pytest.mark.parametrize("t,match", [
    (torch.randn(1, 1, 4, 160), "triton backend supports a head dim hd <= 128"),
    (torch.randn(1, 1, 4, 8, dtype=torch.float64), "triton backend takes float16, bfloat16 or float32"),
])
def test_triton_backend_rejects_unsupported(t, match):
    with use_backend("triton"), pytest.raises(ValueError, match=f"channel_attention: the {match}"):
        channel_attention(t, t, t)
