"""rollout_step: the fused Triton path (under the interpreter on CPU) against the explicit-softmax reference, the
reference against the attention matrix timm's formula gives, the argument checks and the dispatcher's choice."""
from __future__ import annotations

import pytest
import torch

from attnzoo.kernels import rollout_step, trace, use_backend
from attnzoo.kernels._triton import SM80, SM90, use_target
from attnzoo.kernels.rollout.fused import launch_config
from attnzoo.kernels.rollout.reference import rollout_step_reference
from tests.kernels._util import assert_within_precision, past_int32_batch


@pytest.fixture(params=[SM90, SM80], ids=lambda t: t.name)
def target(request):
    """The interpreter launches exactly what this GPU target would."""
    with use_target(request.param):
        yield request.param


def _inputs(B, H, N, D, per_head=False, seed=0, transposed=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k = (2 * torch.randn(B, H, N, D, generator=gen) for _ in range(2))  # peaked rows, as trained maps are
    if transposed:  # the model's qkv split gives [B, N, H, D] memory viewed as [B, H, N, D]
        q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    r = torch.rand(*((B, H, N) if per_head else (B, N)), generator=gen)
    return q.to(dtype), k.to(dtype), r


def _fused(q, k, r, scale=None):
    with torch.no_grad(), use_backend("triton"), trace() as calls:
        out = rollout_step(q, k, r, scale)
    assert calls == [("rollout_step", "triton")]
    return out


@pytest.mark.parametrize("shape,per_head,transposed", [
    ((2, 3, 50, 24), False, True),   # ragged N, head dim 24, a non-contiguous view
    ((1, 2, 197, 64), True, False),  # DeiT's 197 tokens, B = 1, one r per head
])
def test_triton_matches_reference_fp32(shape, per_head, transposed, target):
    q, k, r = _inputs(*shape, per_head=per_head, transposed=transposed)
    want = rollout_step_reference(q, k, r if per_head else r[:, None].expand(-1, shape[1], -1), 0.3)
    got = _fused(q, k, r, 0.3)
    assert got.shape == want.shape == shape[:3] and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_reference_is_the_transposed_attention_matrix_times_r():
    """Against the definition: P = softmax(scale q kᵀ) as timm's eager attention forms it, then Pᵀr."""
    q, k, r = _inputs(2, 2, 17, 8, per_head=True)
    p = ((q * 8 ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    want = torch.einsum("bhij,bhi->bhj", p, r)
    torch.testing.assert_close(rollout_step(q, k, r), want, rtol=1e-6, atol=1e-6)
    # P is row-stochastic, so the step keeps the mass of r: Σ_j out_j = Σ_i r_i
    torch.testing.assert_close(want.sum(-1), r.sum(-1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(2, 2, 50, 32), (1, 2, 197, 64)])  # one block; DeiT's 197 tokens, 4 x 4 blocks
def test_triton_matches_reference_fp16(shape, target):
    """FlashAttention's rule: no further from the fp64 result than twice the same computation done in fp16.
    bf16 launches the same tiles as fp16 (asserted here); the interpreter's bf16 `tl.dot` is wrong, so the bf16
    tiling is checked with fp16 data."""
    B, H, N, D = shape
    assert {**launch_config(N, D, torch.bfloat16, target), "FP32": False} == launch_config(N, D, torch.float16,
                                                                                          target)
    q, k, r = _inputs(B, H, N, D, seed=3)
    exact = rollout_step_reference(q.double(), k.double(), r.double()[:, None].expand(-1, H, -1), D ** -0.5)
    q16, k16, r16 = q.half(), k.half(), r.half()
    p16 = ((q16 * D ** -0.5) @ k16.transpose(-2, -1)).softmax(-1)
    same_dtype = (r16[:, None, None, :] @ p16).squeeze(-2)
    got = _fused(q16, k16, r16)
    assert got.dtype == torch.float32
    assert_within_precision("rollout_step", got, same_dtype, exact, torch.float16)


@pytest.mark.parametrize("shape,dim", [((3, 2, 40, 16), 0), ((1, 2, 3, 16), 2)], ids=["image", "token"])
def test_offsets_past_int32(shape, dim):
    """q and k views whose image 2 (or token 2) starts past 2**31 elements: the kernels' b · stride and
    token · stride offsets are int64."""
    q, k = (past_int32_batch(shape, torch.float16, seed, dim) for seed in (0, 1))
    r = torch.rand(shape[:3], generator=torch.Generator().manual_seed(2))
    want = rollout_step_reference(q, k, r, 0.25)
    torch.testing.assert_close(_fused(q, k, r, 0.25), want, atol=2e-3, rtol=2e-3)


def test_cpu_takes_the_torch_path_and_forced_reference_agrees():
    q, k, r = _inputs(1, 2, 20, 16)
    with torch.no_grad(), trace() as calls:
        auto = rollout_step(q, k, r)
        with use_backend("reference"):
            ref = rollout_step(q, k, r)
    assert calls == [("rollout_step", "torch"), ("rollout_step", "reference")]
    torch.testing.assert_close(auto, ref)


@pytest.mark.parametrize("make,match", [
    (lambda q, k, r: (q[0], k, r), r"`q` must be 4-D \[B, H, N, D\]"),
    (lambda q, k, r: (q, k[:, :, :5], r), r"`k` must have the shape of `q` \[1, 2, 6, 16\]"),
    (lambda q, k, r: (q, k.double(), r), "`k` has dtype torch.float64 but `q` has torch.float32"),
    (lambda q, k, r: (q, k, r[:, :4]), r"`r` must be \[B, N\] = \[1, 6\] or \[B, H, N\] = \[1, 2, 6\], got \[1, 4\]"),
    (lambda q, k, r: (q, k, r.long()), "`r` must be a floating-point tensor"),
    (lambda q, k, r: (q.requires_grad_(), k, r), "has no backward; call it under torch.no_grad"),
])
def test_bad_arguments_name_the_argument(make, match):
    q, k, r = _inputs(1, 2, 6, 16)
    with pytest.raises(ValueError, match=match):
        rollout_step(*make(q, k, r))


def test_forced_triton_rejects_a_head_dim_it_cannot_take():
    q, k, r = _inputs(1, 1, 4, 160)
    with torch.no_grad(), use_backend("triton"), pytest.raises(ValueError, match="D <= 128, got `q` with D=160"):
        rollout_step(q, k, r)
