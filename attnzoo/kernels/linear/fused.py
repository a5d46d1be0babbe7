"""Fused Triton linear attention, forward and backward.

Notation per (image, head): Q = φ(q), K = φ(k), α the key weights (≡ 1 without RALA's reweighting),
K' = α ⊙ K, ρ the RoPE rotation (identity without it), S = Σ_m ρ(K'_m)ᵀ v_m (D × D), z = Σ_m K'_m,
den_n = max(Q_n · z + N·eps, clamp_min), out_n = ρ(Q_n) S / den_n.

Layout of the work. Tokens are read in [BLOCK_N, BLOCK_D] tiles (D padded to a power of two). The sums over all
N tokens of an (image, head) — S, z, mean Q, dS, dz — are split into chunks of ``chunk`` tokens, one program per
(image·head, chunk), each writing its partial sum in fp32; torch adds the partials up (``split`` of them per
image and head, chosen so the grid fills the GPU, see :func:`launch_config`). Everything else is one program per
(image·head, block of BLOCK_N tokens), which reads the [D, D] state and writes its tokens' rows. φ(k), α and K'
live only in registers.

Forward:
    ``_qmean_kernel``   (with reweighting) partial Σ_n Q_n, for Q̄ = mean Q.
    ``_state_kernel``   partial S and z; with reweighting the softmax of α's logits ℓ_m = s·Q̄·K_m runs online:
                        each chunk keeps its running max and sum and rescales its partials, and the partials are
                        merged as FlashAttention merges blocks, α = N·softmax(ℓ).
    ``_output_kernel``  out = ρ(Q) S / den for a block of queries.
Saved for the backward: S, z, Q̄ and the softmax max and sum.

Backward (g = ∂L/∂out, ρᵀ the transposed rotation):
    ``_output_kernel``     with GRAD: dden_n = −(g_n · out_n) / den_n where the clamp is not active, else 0,
                           out recomputed. A pass of its own, so that no kernel chains two dots: Triton then lays
                           both over the rows with every warp, and on sm_80 each warp would hold a whole [D, D]
                           operand in registers.
    ``_bwd_state_kernel``  partial dS = Σ_n ρ(Q_n)ᵀ g_n / den_n,  dz = Σ_n dden_n Q_n.
    ``_bwd_key_kernel``    per block of keys: dK' = ρᵀ(v dSᵀ) + dz,  dv = ρ(K') dS,  dα_m = K_m · dK'_m,
                           dℓ = s α ⊙ (dα − mean_m α_m dα_m)  (softmax backward, α = N·softmax(ℓ)),
                           dK = α dK' + dℓ Q̄, partial dQ̄ = Σ_m dℓ_m K_m,  dk = dK ⊙ φ'(k).
                           mean_m α_m dα_m = (⟨S, dS⟩ + z · dz) / N needs no pass over the keys (ρ is orthogonal).
    ``_bwd_query_kernel``  dQ = ρᵀ(g Sᵀ / den) + dden z + dQ̄ / N,  dq = dQ ⊙ φ'(q).

Dots multiply fp16/bf16 operands on tensor cores, fp32 ones as tf32x3 (see ``_dot``). Offsets are int64: every
program id is widened before it meets a stride.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .._triton import Target, dot, fp32_dot, target_of, unsupported_input

MAX_D = 128


def unsupported(q: torch.Tensor) -> str | None:
    """Why the fused kernels cannot take ``q`` (a phrase for an error message), or None when they can."""
    return unsupported_input(q, "q", MAX_D, "a head dim", "D")


@dataclasses.dataclass(frozen=True)
class Config:
    """The launch configuration of one [B, H, N, D] problem (see :func:`launch_config`)."""

    BLOCK_N: int    # tokens per tile
    BLOCK_D: int    # the head dim padded to a power of two
    num_warps: int
    n_blocks: int   # tiles of BLOCK_N tokens per (image, head): the programs per (image, head) of the others
    split: int      # programs per (image, head) in the kernels that sum over all tokens
    chunk: int      # tokens per such program, a multiple of BLOCK_N


PROGRAMS_PER_SM = 4       # the sums over tokens are split until the grid holds this many programs per SM …
MIN_BLOCKS_PER_CHUNK = 4  # … but a program sums at least this many tiles (each partial [D, D] costs a write)


def launch_config(B: int, H: int, N: int, D: int, dtype: torch.dtype, target: Target) -> Config:
    """The one rule for every kernel of this file, the same under the interpreter as on a GPU.

    A tile is BLOCK_N tokens × BLOCK_D channels: 32 tokens, 16 where a tile row takes 256 bytes or more (D = 128
    in fp16/bf16, D ≥ 64 in fp32, whose tf32x3 operands take twice the registers), with 4 warps, 8 for
    BLOCK_D = 128: at most 16 fp32 values per thread per tile, of which the kernels hold about eight at once.
    (Larger tiles spill: 64 × 64 with 4 warps in the backward, and ptxas trims even the small state kernel to 64
    registers with a spill at 64 × 32.) On sm_90a, fp16/bf16 with BLOCK_D = 64 (RAVLT) take 64 × 64 tiles with 8
    warps instead: 64 rows per warpgroup is what Hopper's wgmma needs, and it fits. The token sums are split into
    ``split`` chunks per (image, head) so that B·H·split reaches PROGRAMS_PER_SM programs per SM of ``target``,
    with at least MIN_BLOCKS_PER_CHUNK tiles per chunk.
    """
    block_d = max(16, triton.next_power_of_2(D))
    block_n = 16 if block_d * dtype.itemsize >= 256 else 32
    num_warps = 8 if block_d > 64 else 4
    if target.arch >= 90 and dtype.itemsize == 2 and block_d == 64:
        block_n, num_warps = 64, 8
    n_blocks = triton.cdiv(N, block_n)
    wanted = triton.cdiv(PROGRAMS_PER_SM * target.num_sms, B * H)
    split = max(1, min(wanted, n_blocks // MIN_BLOCKS_PER_CHUNK))
    blocks_per_chunk = triton.cdiv(n_blocks, split)
    split = triton.cdiv(n_blocks, blocks_per_chunk)  # no empty chunk
    return Config(BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, n_blocks=n_blocks,
                  split=split, chunk=blocks_per_chunk * block_n)


def residual_width(q: torch.Tensor) -> int:
    """The padded head dim (BLOCK_D) of the fp32 state and sums ``_forward`` returns for ``q``."""
    B, H, N, D = q.shape
    return launch_config(B, H, N, D, q.dtype, target_of(q)).BLOCK_D


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr, DTYPE: tl.constexpr):
    """a @ b accumulated in fp32, the operands in the inputs' dtype DTYPE. Exact fp32 inputs (FP32_DOT) take
    three tf32 tensor-core products (tf32x3, about fp32's accuracy) instead of ieee FMAs: an FMA dot holds whole
    [·, D] rows of both operands in every thread and spills from D = 64 on."""
    if FP32_DOT and DTYPE == tl.float32:
        return tl.dot(a, b, input_precision="tf32x3")
    return dot(a.to(DTYPE), b.to(DTYPE), FP32_DOT)


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    """φ: 0 = ReLU, 1 = ELU + 1."""
    if FEATURE == 0:
        return tl.maximum(x, 0.0)
    return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))


@triton.jit
def _dphi(phi, FEATURE: tl.constexpr):
    """φ'(x) from φ(x): ReLU's is 1 where φ > 0; ELU + 1's is φ = exp(x) where φ ≤ 1, else 1."""
    if FEATURE == 0:
        return tl.where(phi > 0, 1.0, 0.0)
    return tl.minimum(phi, 1.0)


@triton.jit
def _rotate(x, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(x₀, x₁, x₂, x₃, …) → (−x₁, x₀, −x₃, x₂, …), within registers."""
    even, odd = tl.split(tl.reshape(x, (BLOCK_N, BLOCK_D // 2, 2)))
    return tl.reshape(tl.join(-odd, even), (BLOCK_N, BLOCK_D))


@triton.jit
def _rope(x, cos, sin, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """ρ(x) = x·cos + rotate(x)·sin."""
    return x * cos + _rotate(x, BLOCK_N, BLOCK_D) * sin


@triton.jit
def _rope_t(g, cos, sin, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """ρᵀ(g) = g·cos − rotate(g·sin): the rotation's transpose (rotateᵀ = −rotate), for gradients."""
    return g * cos - _rotate(g * sin, BLOCK_N, BLOCK_D)


@triton.jit
def _load_rows(ptr, offs_n, offs_d, sn, sd, N, D):
    """A [BLOCK_N, BLOCK_D] tile in fp32, zero outside the tensor."""
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    offs = offs_n.to(tl.int64)[:, None] * sn + offs_d[None, :] * sd
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _features(ptr, offs_n, offs_d, sn, sd, N, D, FEATURE: tl.constexpr):
    """The φ(x) tile, zero outside the tensor (φ(0) = 1 for ELU + 1)."""
    x = _load_rows(ptr, offs_n, offs_d, sn, sd, N, D)
    valid = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    return tl.where(valid, _phi(x, FEATURE), 0.0)


@triton.jit
def _square(ptr, offs_d, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """The [BLOCK_D, BLOCK_D] fp32 matrix at ptr (a state or its gradient, row-major), or its transpose, as a DTYPE
    dot operand. (Loading the transpose keeps it out of registers: `tl.trans` of a loaded tile would be a
    register transpose replicated in every warp.)"""
    if TRANSPOSED:
        return tl.load(ptr + offs_d[:, None] + offs_d[None, :] * BLOCK_D).to(DTYPE)
    return tl.load(ptr + offs_d[:, None] * BLOCK_D + offs_d[None, :]).to(DTYPE)


@triton.jit
def _head(bh, H, sb, sh):
    """The offset of (image, head) = divmod(bh, H) in a tensor of batch and head strides sb, sh (bh is int64)."""
    return (bh // H) * sb + (bh % H) * sh


@triton.jit
def _qmean_kernel(
    q_ptr, part_ptr, H, N, D, CHUNK,
    sqb, sqh, sqn, sqd,
    FEATURE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """part[bh, c] = Σ φ(q_n) over chunk c."""
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    q_ptr += _head(bh, H, sqb, sqh)
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, N), BLOCK_N):
        phi_q = _features(q_ptr, start + rows, offs_d, sqn, sqd, N, D, FEATURE)
        acc += phi_q
    tl.store(part_ptr + (bh * tl.num_programs(1) + c) * BLOCK_D + offs_d, tl.sum(acc, axis=0))


@triton.jit
def _state_kernel(
    k_ptr, v_ptr, cos_ptr, sin_ptr, qmean_ptr, state_ptr, ksum_ptr, stats_ptr,
    H, N, D, CHUNK, reweight_scale,
    skb, skh, skn, skd, svb, svh, svn, svd,
    FEATURE: tl.constexpr, REWEIGHT: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Chunk c's partial S and z; with REWEIGHT the keys are weighted by exp(ℓ − m) for the chunk's running max m
    of the logits ℓ, and stats[bh, c] = (m, Σ exp(ℓ − m)) lets the caller merge the chunks."""
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    k_ptr += _head(bh, H, skb, skh)
    v_ptr += _head(bh, H, svb, svh)
    DTYPE = v_ptr.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_N)
    q_mean = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if REWEIGHT:
        q_mean = tl.load(qmean_ptr + bh * BLOCK_D + offs_d)
    run_max = -float("inf")
    run_sum = 0.0
    state = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    k_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, N), BLOCK_N):
        offs_n = start + rows
        phi_k = _features(k_ptr, offs_n, offs_d, skn, skd, N, D, FEATURE)
        if REWEIGHT:
            logits = tl.sum(phi_k * q_mean[None, :], axis=1) * reweight_scale
            logits = tl.where(offs_n < N, logits, -float("inf"))
            new_max = tl.maximum(run_max, tl.max(logits, axis=0))
            rescale = tl.exp(run_max - new_max)
            weight = tl.exp(logits - new_max)
            run_sum = run_sum * rescale + tl.sum(weight, axis=0)
            run_max = new_max
            state *= rescale
            k_sum *= rescale
            phi_k *= weight[:, None]
        k_sum += tl.sum(phi_k, axis=0)
        if ROPE:
            phi_k = _rope(phi_k, _load_rows(cos_ptr, offs_n, offs_d, D, 1, N, D),
                          _load_rows(sin_ptr, offs_n, offs_d, D, 1, N, D), BLOCK_N, BLOCK_D)
        v = _load_rows(v_ptr, offs_n, offs_d, svn, svd, N, D)
        state += _dot(tl.trans(phi_k), v, FP32_DOT, DTYPE)
    part = bh * tl.num_programs(1) + c
    tl.store(state_ptr + part * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :], state)
    tl.store(ksum_ptr + part * BLOCK_D + offs_d, k_sum)
    if REWEIGHT:
        tl.store(stats_ptr + part * 2, run_max)
        tl.store(stats_ptr + part * 2 + 1, run_sum)


@triton.jit
def _query_terms(q_ptr, cos_ptr, sin_ptr, k_sum, offs_n, offs_d, sqn, sqd, N, D, eps, clamp_min,
                 FEATURE: tl.constexpr, ROPE: tl.constexpr, CLAMP: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """For a block of queries: φ(q), ρ(φ(q)), cos, sin, den and whether den is unclamped."""
    phi_q = _features(q_ptr, offs_n, offs_d, sqn, sqd, N, D, FEATURE)
    den = tl.sum(phi_q * k_sum[None, :], axis=1) + N * eps
    free = den > clamp_min if CLAMP else den == den
    if CLAMP:
        den = tl.maximum(den, clamp_min)
    den = tl.where(offs_n < N, den, 1.0)  # rows past the end divide nothing
    rot_q = phi_q
    cos = phi_q
    sin = phi_q
    if ROPE:
        cos = _load_rows(cos_ptr, offs_n, offs_d, D, 1, N, D)
        sin = _load_rows(sin_ptr, offs_n, offs_d, D, 1, N, D)
        rot_q = _rope(phi_q, cos, sin, BLOCK_N, BLOCK_D)
    return phi_q, rot_q, cos, sin, den, free


@triton.jit
def _output_kernel(
    q_ptr, cos_ptr, sin_ptr, state_ptr, ksum_ptr, o_ptr, do_ptr, dden_ptr,
    H, N, D, eps, clamp_min,
    sqb, sqh, sqn, sqd, sob, soh, son, sod,
    FEATURE: tl.constexpr, ROPE: tl.constexpr, CLAMP: tl.constexpr, GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """out = ρ(Q) S / den for a block of queries; with GRAD instead dden = −(g · out) / den (0 where the clamp
    binds) for the gradient g at do_ptr (strides so*)."""
    bh = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    DTYPE = q_ptr.dtype.element_ty
    k_sum = tl.load(ksum_ptr + bh * BLOCK_D + offs_d)
    _, rot_q, _, _, den, free = _query_terms(
        q_ptr + _head(bh, H, sqb, sqh), cos_ptr, sin_ptr, k_sum, offs_n, offs_d, sqn, sqd, N, D, eps, clamp_min,
        FEATURE, ROPE, CLAMP, BLOCK_N, BLOCK_D)
    out = _dot(rot_q, _square(state_ptr + bh * BLOCK_D * BLOCK_D, offs_d, BLOCK_D, DTYPE), FP32_DOT,
               DTYPE) / den[:, None]
    if GRAD:
        g = _load_rows(do_ptr + _head(bh, H, sob, soh), offs_n, offs_d, son, sod, N, D)
        d_den = tl.where(free, -tl.sum(g * out, axis=1) / den, 0.0)
        tl.store(dden_ptr + bh * N + offs_n, d_den, mask=offs_n < N)
    else:
        mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
        o_ptr += _head(bh, H, sob, soh) + offs_n.to(tl.int64)[:, None] * son + offs_d[None, :] * sod
        tl.store(o_ptr, out.to(DTYPE), mask=mask)


@triton.jit
def _bwd_state_kernel(
    q_ptr, do_ptr, cos_ptr, sin_ptr, ksum_ptr, dden_ptr, dstate_ptr, dksum_ptr,
    H, N, D, CHUNK, eps, clamp_min,
    sqb, sqh, sqn, sqd, sgb, sgh, sgn, sgd,
    FEATURE: tl.constexpr, ROPE: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """Chunk c's partial dS and dz."""
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_N)
    DTYPE = q_ptr.dtype.element_ty
    k_sum = tl.load(ksum_ptr + bh * BLOCK_D + offs_d)
    q_ptr += _head(bh, H, sqb, sqh)
    do_ptr += _head(bh, H, sgb, sgh)
    d_state = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    d_ksum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, N), BLOCK_N):
        offs_n = start + rows
        phi_q, rot_q, _, _, den, _ = _query_terms(
            q_ptr, cos_ptr, sin_ptr, k_sum, offs_n, offs_d, sqn, sqd, N, D, eps, clamp_min,
            FEATURE, ROPE, CLAMP, BLOCK_N, BLOCK_D)
        d_den = tl.load(dden_ptr + bh * N + offs_n, mask=offs_n < N, other=0.0)
        d_ksum += tl.sum(d_den[:, None] * phi_q, axis=0)
        g = _load_rows(do_ptr, offs_n, offs_d, sgn, sgd, N, D) / den[:, None]
        d_state += _dot(tl.trans(rot_q), g, FP32_DOT, DTYPE)
    part = bh * tl.num_programs(1) + c
    tl.store(dstate_ptr + part * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :], d_state)
    tl.store(dksum_ptr + part * BLOCK_D + offs_d, d_ksum)


@triton.jit
def _bwd_key_kernel(
    k_ptr, v_ptr, cos_ptr, sin_ptr, dstate_ptr, dksum_ptr, qmean_ptr, stats_ptr, dalpha_ptr, dk_ptr, dv_ptr,
    dqmean_ptr, H, N, D, reweight_scale,
    skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd,
    FEATURE: tl.constexpr, REWEIGHT: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """dk and dv (sharing the strides sg*) of a block of keys; with REWEIGHT its partial dQ̄, from stats[bh] =
    (max, sum) of α's softmax and dalpha[bh] = mean_m α_m dα_m."""
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    DTYPE = v_ptr.dtype.element_ty
    phi_k = _features(k_ptr + _head(bh, H, skb, skh), offs_n, offs_d, skn, skd, N, D, FEATURE)
    v = _load_rows(v_ptr + _head(bh, H, svb, svh), offs_n, offs_d, svn, svd, N, D)
    d_state_ptr = dstate_ptr + bh * BLOCK_D * BLOCK_D
    d_rot = _dot(v, _square(d_state_ptr, offs_d, BLOCK_D, DTYPE, True), FP32_DOT, DTYPE)  # ∂L/∂ρ(K')
    alpha = tl.where(offs_n < N, 1.0, 0.0)
    q_mean = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if REWEIGHT:
        q_mean = tl.load(qmean_ptr + bh * BLOCK_D + offs_d)
        logits = tl.sum(phi_k * q_mean[None, :], axis=1) * reweight_scale
        alpha = N * tl.exp(logits - tl.load(stats_ptr + bh * 2)) / tl.load(stats_ptr + bh * 2 + 1)
        alpha = tl.where(offs_n < N, alpha, 0.0)
    rot_k = phi_k
    if ROPE:
        cos = _load_rows(cos_ptr, offs_n, offs_d, D, 1, N, D)
        sin = _load_rows(sin_ptr, offs_n, offs_d, D, 1, N, D)
        rot_k = _rope(phi_k, cos, sin, BLOCK_N, BLOCK_D)
        d_rot = _rope_t(d_rot, cos, sin, BLOCK_N, BLOCK_D)
    d_kw = d_rot + tl.load(dksum_ptr + bh * BLOCK_D + offs_d)[None, :]  # ∂L/∂K'
    d_v = _dot(rot_k * alpha[:, None], _square(d_state_ptr, offs_d, BLOCK_D, DTYPE), FP32_DOT, DTYPE)
    d_phi = alpha[:, None] * d_kw
    if REWEIGHT:
        d_logit = alpha * (tl.sum(phi_k * d_kw, axis=1) - tl.load(dalpha_ptr + bh)) * reweight_scale
        d_phi += d_logit[:, None] * q_mean[None, :]
        tl.store(dqmean_ptr + (bh * tl.num_programs(1) + blk) * BLOCK_D + offs_d,
                 tl.sum(d_logit[:, None] * phi_k, axis=0))
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    offs = _head(bh, H, sgb, sgh) + offs_n.to(tl.int64)[:, None] * sgn + offs_d[None, :] * sgd
    tl.store(dk_ptr + offs, (d_phi * _dphi(phi_k, FEATURE)).to(DTYPE), mask=mask)
    tl.store(dv_ptr + offs, d_v.to(DTYPE), mask=mask)


@triton.jit
def _bwd_query_kernel(
    q_ptr, do_ptr, cos_ptr, sin_ptr, state_ptr, ksum_ptr, dden_ptr, dqmean_ptr, dq_ptr,
    H, N, D, eps, clamp_min,
    sqb, sqh, sqn, sqd, sgb, sgh, sgn, sgd, sdb, sdh, sdn, sdd,
    FEATURE: tl.constexpr, REWEIGHT: tl.constexpr, ROPE: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    DTYPE = q_ptr.dtype.element_ty
    k_sum = tl.load(ksum_ptr + bh * BLOCK_D + offs_d)
    phi_q, _, cos, sin, den, _ = _query_terms(
        q_ptr + _head(bh, H, sqb, sqh), cos_ptr, sin_ptr, k_sum, offs_n, offs_d, sqn, sqd, N, D, eps, clamp_min,
        FEATURE, ROPE, CLAMP, BLOCK_N, BLOCK_D)
    g = _load_rows(do_ptr + _head(bh, H, sgb, sgh), offs_n, offs_d, sgn, sgd, N, D) / den[:, None]
    state_t = _square(state_ptr + bh * BLOCK_D * BLOCK_D, offs_d, BLOCK_D, DTYPE, True)
    d_phi = _dot(g, state_t, FP32_DOT, DTYPE)  # ∂L/∂ρ(Q)
    if ROPE:
        d_phi = _rope_t(d_phi, cos, sin, BLOCK_N, BLOCK_D)
    d_den = tl.load(dden_ptr + bh * N + offs_n, mask=offs_n < N, other=0.0)
    d_phi += d_den[:, None] * k_sum[None, :]
    if REWEIGHT:
        d_phi += tl.load(dqmean_ptr + bh * BLOCK_D + offs_d)[None, :] / N
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    dq_ptr += _head(bh, H, sdb, sdh) + offs_n.to(tl.int64)[:, None] * sdn + offs_d[None, :] * sdd
    tl.store(dq_ptr, (d_phi * _dphi(phi_q, FEATURE)).to(DTYPE), mask=mask)


def _setup(q, feature_map, cos, sin):
    """The launch configuration, the constexpr flags every kernel shares, and the RoPE tables as the kernels read
    them (fp32, [N, D] contiguous; q twice as unused pointers without RoPE)."""
    B, H, N, D = q.shape
    cfg = launch_config(B, H, N, D, q.dtype, target_of(q))
    flags = dict(FEATURE=0 if feature_map == "relu" else 1, ROPE=cos is not None, BLOCK_N=cfg.BLOCK_N,
                 BLOCK_D=cfg.BLOCK_D, num_warps=cfg.num_warps)
    rope = (q, q) if cos is None else (cos.float().contiguous(), sin.float().contiguous())
    return cfg, flags, rope


def _fp32(q, *shape):
    return torch.empty(*shape, device=q.device, dtype=torch.float32)


def _forward(q, k, v, feature_map, reweight_scale, cos, sin, clamp_min, eps):
    """The forward launches; arguments as ``linear_attention_reference``. Returns out and what the backward
    takes: S [B·H, BLOCK_D, BLOCK_D], z and Q̄ [B·H, BLOCK_D] and α's softmax max and sum [B·H, 2], fp32 (Q̄ and
    the statistics zero without reweighting)."""
    cfg, flags, rope = _setup(q, feature_map, cos, sin)
    B, H, N, D = q.shape
    BH, BD, split = B * H, cfg.BLOCK_D, cfg.split
    reweight = reweight_scale is not None
    q_mean, stats = q.new_zeros(BH, BD, dtype=torch.float32), q.new_zeros(BH, 2, dtype=torch.float32)
    if reweight:
        q_part = _fp32(q, BH, split, BD)
        _qmean_kernel[(BH, split)](q, q_part, H, N, D, cfg.chunk, *q.stride(), FEATURE=flags["FEATURE"],
                                   BLOCK_N=cfg.BLOCK_N, BLOCK_D=BD, num_warps=cfg.num_warps)
        q_mean = q_part.sum(1) / N
    state_part, ksum_part, stats_part = _fp32(q, BH, split, BD, BD), _fp32(q, BH, split, BD), _fp32(q, BH, split, 2)
    _state_kernel[(BH, split)](
        k, v, *rope, q_mean, state_part, ksum_part, stats_part, H, N, D, cfg.chunk, reweight_scale or 0.0,
        *k.stride(), *v.stride(), REWEIGHT=reweight, FP32_DOT=fp32_dot(q.dtype), **flags)
    if reweight:  # merge the chunks' softmax statistics: α = N·exp(ℓ − max) / sum
        run_max, run_sum = stats_part.unbind(-1)
        stats[:, 0] = run_max.amax(1)
        rescale = torch.exp(run_max - stats[:, :1])
        stats[:, 1] = (run_sum * rescale).sum(1)
        weight = N * rescale / stats[:, 1:2]
        state, k_sum = (state_part * weight[..., None, None]).sum(1), (ksum_part * weight[..., None]).sum(1)
    else:
        state, k_sum = state_part.sum(1), ksum_part.sum(1)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    _output_kernel[(BH, cfg.n_blocks)](
        q, *rope, state, k_sum, out, out, k_sum, H, N, D, eps, clamp_min or 0.0, *q.stride(), *out.stride(),
        CLAMP=clamp_min is not None, GRAD=False, FP32_DOT=fp32_dot(q.dtype), **flags)
    return out, state, k_sum, q_mean, stats


def _backward(d_out, q, k, v, feature_map, reweight_scale, cos, sin, clamp_min, eps, state, k_sum, q_mean, stats):
    """The backward launches: dq, dk, dv from d_out, the forward's arguments and what ``_forward`` returned."""
    cfg, flags, rope = _setup(q, feature_map, cos, sin)
    B, H, N, D = q.shape
    BH, BD, split = B * H, cfg.BLOCK_D, cfg.split
    reweight = reweight_scale is not None
    clamp = dict(CLAMP=clamp_min is not None, FP32_DOT=fp32_dot(q.dtype))
    d_den = _fp32(q, BH, N)
    _output_kernel[(BH, cfg.n_blocks)](
        q, *rope, state, k_sum, d_out, d_out, d_den, H, N, D, eps, clamp_min or 0.0, *q.stride(), *d_out.stride(),
        GRAD=True, **clamp, **flags)
    dstate_part, dksum_part = _fp32(q, BH, split, BD, BD), _fp32(q, BH, split, BD)
    _bwd_state_kernel[(BH, split)](
        q, d_out, *rope, k_sum, d_den, dstate_part, dksum_part, H, N, D, cfg.chunk, eps, clamp_min or 0.0,
        *q.stride(), *d_out.stride(), **clamp, **flags)
    d_state, d_ksum = dstate_part.sum(1), dksum_part.sum(1)
    # mean_m α_m dα_m = (⟨S, dS⟩ + z · dz) / N
    d_alpha = ((state * d_state).sum((1, 2)) + (k_sum * d_ksum).sum(1)) / N if reweight else k_sum
    dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    dqmean_part = _fp32(q, BH, cfg.n_blocks, BD)
    _bwd_key_kernel[(BH, cfg.n_blocks)](
        k, v, *rope, d_state, d_ksum, q_mean, stats, d_alpha, dk, dv, dqmean_part, H, N, D, reweight_scale or 0.0,
        *k.stride(), *v.stride(), *dk.stride(), REWEIGHT=reweight, FP32_DOT=clamp["FP32_DOT"], **flags)
    d_qmean = dqmean_part.sum(1) if reweight else q_mean
    _bwd_query_kernel[(BH, cfg.n_blocks)](
        q, d_out, *rope, state, k_sum, d_den, d_qmean, dq, H, N, D, eps, clamp_min or 0.0,
        *q.stride(), *d_out.stride(), *dq.stride(), REWEIGHT=reweight, **clamp, **flags)
    return dq, dk, dv
