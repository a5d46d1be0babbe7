"""Fused Triton sparse attention, forward and backward, on the tensor cores.

Each query keeps its own K of the N keys, so the kept pairs form no tile a matrix unit can multiply. The kernels
therefore run FlashAttention over [BLOCK_M, BLOCK_N] tiles of the dense logits with `tl.dot` (mma.sync on sm_80,
wgmma on sm_90a) and mask the pairs a query did not keep:

1. ``_mask_kernel`` packs ``index`` [B, H, M, K] into a bit mask [B·H, M, ⌈N/32⌉] of int32 words (bit j % 32
   of word j // 32 set when the query keeps key j; 1/8 of a byte per pair, so 4096² tokens cost 2 MiB per
   head), by atomic ORs, so a repeated index counts once, as in the reference.
2. ``_fwd_kernel``: a program takes BLOCK_M queries of one (image, head), streams over the key blocks with the
   online softmax in fp32 and base 2, S = scale·log2(e)·q kᵀ, the dropped pairs at −∞; it stores the output
   and each row's base-2 log-sum-exp (fp32, [B·H, M]).
3. The backward recomputes P = 2^(S − lse) (Dao et al. 2022, Alg. 2, the dropped pairs at 0), with
   Δ = rowsum(dO ∘ O): ``_bwd_dkdv_kernel`` owns BLOCK_N keys and streams over the queries,
   dV = Pᵀ dO, dK = scale · dSᵀ q with dS = P ∘ (dO vᵀ − Δ); ``_bwd_dq_kernel`` owns BLOCK_M queries and
   streams over the keys, dQ = scale · dS k. Every gradient block is written by one program: no atomics,
   deterministic.

The work is that of dense attention whatever K is (a tile is skipped by no test): on tensor cores a dense tile
costs less than gathering the kept rows one query at a time, which the old CUDA-core kernel did. What the index
saves is the dense mask the SDPA path builds ([M, N] booleans per head).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import LOG2E, Target, dot, fp32_dot, load_rows, target_of, unsupported_input

MAX_D = 128


def unsupported(q: torch.Tensor) -> str | None:
    """Why the fused kernels cannot take ``q`` (a phrase for an error message), or None when they can."""
    return unsupported_input(q, "q", MAX_D, "a head dim", "D")


@triton.jit
def _mask_kernel(idx_ptr, bits_ptr, H, M, K, W, sib, sih, sim, sik,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """bits[bh, m, j // 32] |= 1 << (j % 32) for every kept key j = index[b, h, m, :]."""
    pid_m = tl.program_id(0).to(tl.int64)  # int64: offs_m · (a row stride) passes 2**31 in large views
    bh = tl.program_id(1).to(tl.int64)  # int64: b * sib and bh * M * W pass 2**31 on large inputs
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    idx_ptr += (bh // H) * sib + (bh % H) * sih
    bits_ptr += bh * M * W
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        kept = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        j = tl.load(idx_ptr + offs_m[:, None] * sim + offs_k[None, :] * sik, mask=kept, other=0).to(tl.int32)
        bit = tl.full((BLOCK_M, BLOCK_K), 1, tl.int32) << (j % 32)
        tl.atomic_or(bits_ptr + offs_m[:, None] * W + j // 32, bit, mask=kept, sem="relaxed")


@triton.jit
def _kept(bits_ptr, offs_m, offs_n, M, N, W, BLOCK_N: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """True where query m keeps key n (False past M or N): [len(offs_m), BLOCK_N], or its transpose with
    KEYS_FIRST. The key block starts at a multiple of 32, so it spans BLOCK_N / 32 words per query, each loaded
    as a vector over the queries (a [BLOCK_M, BLOCK_N] gather of words would hold a 64-bit address per pair)."""
    first_word = (tl.min(offs_n) // 32).to(tl.int64)
    if KEYS_FIRST:
        hit = tl.zeros((BLOCK_N, offs_m.shape[0]), dtype=tl.int1)
    else:
        hit = tl.zeros((offs_m.shape[0], BLOCK_N), dtype=tl.int1)
    for i in tl.static_range(BLOCK_N // 32):
        word = tl.load(bits_ptr + offs_m * W + first_word + i, mask=(offs_m < M) & (first_word + i < W), other=0)
        bit = offs_n % 32
        here = (offs_n // 32 == first_word + i) & (offs_n < N)
        if KEYS_FIRST:
            hit |= here[:, None] & (((word[None, :] >> bit[:, None]) & 1) != 0)
        else:
            hit |= here[None, :] & (((word[:, None] >> bit[None, :]) & 1) != 0)
    return hit


@triton.jit
def _load_cols(ptr, offs, offs_d, L, D, s_row, s_d):
    """The same rows as a transposed [BLOCK_D, len(offs)] tile."""
    return tl.load(ptr + offs.to(tl.int64)[None, :] * s_row + offs_d[:, None] * s_d,
                   mask=(offs < L)[None, :] & (offs_d < D)[:, None], other=0.0)


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, bits_ptr, o_ptr, lse_ptr,
    H, M, N, D, W, qk_scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)  # int64: offs_m · (a row stride) passes 2**31 in large views
    bh = tl.program_id(1).to(tl.int64)  # int64: b * sqb, bh * M * W pass 2**31 on large inputs
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(q_ptr + b * sqb + h * sqh, offs_m, offs_d, M, D, sqm, sqd)
    k_ptr += b * skb + h * skh
    v_ptr += b * svb + h * svh
    bits_ptr += bh * M * W

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kt = _load_cols(k_ptr, offs_n, offs_d, N, D, skn, skd)
        s = dot(q, kt, FP32) * qk_scale
        s = tl.where(_kept(bits_ptr, offs_m, offs_n, M, N, W, BLOCK_N, False), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has kept no key so far
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = load_rows(v_ptr, offs_n, offs_d, N, D, svn, svd)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, FP32)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows past M
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_d < D)[None, :])
    tl.store(lse_ptr + bh * M + offs_m, m_i + tl.log2(l_i), mask=offs_m < M)


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, bits_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    H, M, N, D, W, scale, qk_scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr,
):
    """dK and dV of BLOCK_N keys, into contiguous [B, H, N, D] tensors of k's dtype."""
    pid_n = tl.program_id(0)  # int32: the key rows widen in load_rows; offs_n · D stays within dk's (b, h) slice
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_rows(k_ptr + b * skb + h * skh, offs_n, offs_d, N, D, skn, skd)
    v = load_rows(v_ptr + b * svb + h * svh, offs_n, offs_d, N, D, svn, svd)
    q_ptr += b * sqb + h * sqh
    do_ptr += b * sdb + h * sdh
    bits_ptr += bh * M * W

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        qt = _load_cols(q_ptr, offs_m, offs_d, M, D, sqm, sqd)
        lse = tl.load(lse_ptr + bh * M + offs_m, mask=offs_m < M, other=0.0)
        kept_t = _kept(bits_ptr, offs_m, offs_n, M, N, W, BLOCK_N, True)
        pt = tl.where(kept_t, tl.exp2(dot(k, qt, FP32) * qk_scale - lse[None, :]), 0.0)  # Pᵀ [BLOCK_N, BLOCK_M]
        do = load_rows(do_ptr, offs_m, offs_d, M, D, sdm, sdd)
        dv += dot(pt.to(do.dtype), do, FP32)
        delta = tl.load(delta_ptr + bh * M + offs_m, mask=offs_m < M, other=0.0)
        dst = pt * (dot(v, tl.trans(do), FP32) - delta[None, :])
        dk += dot(dst.to(qt.dtype), tl.trans(qt), FP32)
    grads = bh * N * D + offs_n[:, None] * D + offs_d[None, :]
    inside = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    tl.store(dk_ptr + grads, (dk * scale).to(dk_ptr.dtype.element_ty), mask=inside)
    tl.store(dv_ptr + grads, dv.to(dv_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, bits_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    H, M, N, D, W, scale, qk_scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr,
):
    """dQ of BLOCK_M queries, into a contiguous [B, H, M, D] tensor of q's dtype."""
    pid_m = tl.program_id(0).to(tl.int64)  # int64: offs_m · (a row stride) passes 2**31 in large views
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(q_ptr + b * sqb + h * sqh, offs_m, offs_d, M, D, sqm, sqd)
    do = load_rows(do_ptr + b * sdb + h * sdh, offs_m, offs_d, M, D, sdm, sdd)
    lse = tl.load(lse_ptr + bh * M + offs_m, mask=offs_m < M, other=0.0)
    delta = tl.load(delta_ptr + bh * M + offs_m, mask=offs_m < M, other=0.0)
    k_ptr += b * skb + h * skh
    v_ptr += b * svb + h * svh
    bits_ptr += bh * M * W

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kt = _load_cols(k_ptr, offs_n, offs_d, N, D, skn, skd)
        kept = _kept(bits_ptr, offs_m, offs_n, M, N, W, BLOCK_N, False)
        p = tl.where(kept, tl.exp2(dot(q, kt, FP32) * qk_scale - lse[:, None]), 0.0)
        vt = _load_cols(v_ptr, offs_n, offs_d, N, D, svn, svd)
        ds = p * (dot(do, vt, FP32) - delta[:, None])
        dq += dot(ds.to(kt.dtype), tl.trans(kt), FP32)
    tl.store(dq_ptr + bh * M * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_d < D)[None, :])


def launch_config(M: int, N: int, D: int, dtype: torch.dtype, target: Target) -> dict:
    """Block sizes and warps of the attention kernels for q [B, H, M, D], k and v [B, H, N, D] of ``dtype`` on
    ``target``.

    fp16/bf16 multiply 64 x 64 tiles on the tensor cores, 4 warps, Triton's default pipelining. fp32 gets 32 x 32
    tiles two stages deep: its exact products run on the FMA units, where a thread holds a larger share of each
    tile (3 stages spill in the dK/dV kernel on sm_80). The tiles depend on the dtype only, never on the
    interpreter (whose bf16 runs the exact fp32 dot, FP32=True, on bf16's tiles). The same on both targets: the
    ahead-of-time compile for sm_80 and sm_90a finds no spill at D = 64, the models' head dim, for 197 and 4096
    tokens; a head dim over 64 halves the key block.
    """
    del M, N, target
    block_d = max(16, triton.next_power_of_2(D))
    exact = dtype == torch.float32
    block = 32 if exact else 64
    return dict(BLOCK_M=block, BLOCK_N=block if block_d <= 64 else block // 2, BLOCK_D=block_d,
                FP32=fp32_dot(dtype), num_warps=4, **(dict(num_stages=2) if exact else {}))


class _Launch:
    """The launch of one sparse_attention call: the shapes, the bit mask's width and the block sizes."""

    MASK_BLOCKS = dict(BLOCK_M=16, BLOCK_K=64, num_warps=4)  # the index packing: elementwise, 1024 per step

    def __init__(self, q: torch.Tensor, index: torch.Tensor):
        B, H, M, D = q.shape
        self.B, self.H, self.M, self.K, self.D = B, H, M, index.shape[-1], D
        self.blocks = launch_config(M, None, D, q.dtype, target_of(q))

    def key_bits(self, index: torch.Tensor, N: int) -> torch.Tensor:
        """The int32 bit mask [B·H, M, ⌈N/32⌉] of the kept keys."""
        W = triton.cdiv(N, 32)
        bits = torch.zeros(self.B * self.H, self.M, W, device=index.device, dtype=torch.int32)
        _mask_kernel[(triton.cdiv(self.M, self.MASK_BLOCKS["BLOCK_M"]), self.B * self.H)](
            index, bits, self.H, self.M, self.K, W, *index.stride(), **self.MASK_BLOCKS)
        return bits


def _forward(q, k, v, index, scale: float, launch: _Launch):
    """(out, lse): the output [B, H, M, D] in q's dtype and the base-2 log-sum-exp [B·H, M] in fp32."""
    N = k.shape[2]
    bits = launch.key_bits(index, N)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(launch.B * launch.H, launch.M, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(launch.M, launch.blocks["BLOCK_M"]), launch.B * launch.H)
    _fwd_kernel[grid](
        q, k, v, bits, out, lse, launch.H, launch.M, N, launch.D, bits.shape[-1], scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), **launch.blocks)
    return out, lse


def _backward(q, k, v, index, out, lse, d_out, scale: float, launch: _Launch):
    """(dq, dk, dv), contiguous, in the dtypes of q, k and v."""
    N = k.shape[2]
    bits = launch.key_bits(index, N)  # recomputed: cheaper than keeping it from the forward
    delta = (d_out.float() * out.float()).sum(-1).reshape(launch.B * launch.H, launch.M)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    args = (launch.H, launch.M, N, launch.D, bits.shape[-1], scale, scale * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *d_out.stride())
    BH = launch.B * launch.H
    _bwd_dkdv_kernel[(triton.cdiv(N, launch.blocks["BLOCK_N"]), BH)](
        q, k, v, bits, d_out, lse, delta, dk, dv, *args, **launch.blocks)
    _bwd_dq_kernel[(triton.cdiv(launch.M, launch.blocks["BLOCK_M"]), BH)](
        q, k, v, bits, d_out, lse, delta, dq, *args, **launch.blocks)
    return dq, dk, dv
