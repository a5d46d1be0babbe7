"""Fused Triton linear attention, forward and backward.

Notation per (image, head): Q = φ(q), K = φ(k), α the key weights (≡ 1 without RALA's reweighting),
K' = α ⊙ K, ρ the RoPE rotation (identity without it), S = Σ_m ρ(K'_m)ᵀ v_m (D × D), z = Σ_m K'_m,
den_n = max(Q_n · z + N·eps, clamp_min), out_n = ρ(Q_n) S / den_n.

Forward, two kernels:
    ``_state_kernel``   one program per (image, head) streams the tokens: mean Q and the softmax statistics
                        of α's logits (only with reweighting), then S and z, in fp32.
    ``_output_kernel``  one program per block of queries: out = ρ(Q) S / den.
φ(k), α and K' live only in registers. Saved for the backward: S, z, mean Q and the softmax max and sum.

Backward, three kernels (g = ∂L/∂out, ρᵀ the transposed rotation):
    ``_bwd_state_kernel``  dS = Σ_n ρ(Q_n)ᵀ g_n / den_n,  dz = Σ_n dden_n Q_n,
                           dden_n = −(g_n · out_n) / den_n where the clamp is not active, else 0.
    ``_bwd_key_kernel``    dK' = ρᵀ(v dSᵀ) + dz,  dv = ρ(K') dS,  dα_m = K_m · dK'_m,
                           dℓ = α ⊙ (dα − mean_m α_m dα_m)  (softmax backward, α = N·softmax(ℓ)),
                           dK = α dK' + s dℓ Q̄,  dQ̄ = s Σ_m dℓ_m K_m,  dk = dK ⊙ φ'(k).
    ``_bwd_query_kernel``  dQ = ρᵀ(g Sᵀ / den) + dden z + dQ̄ / N,  dq = dQ ⊙ φ'(q).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import dot, fp32_dot, unsupported_input
from ..dispatch import interpreting

MAX_D = 128


def unsupported(q: torch.Tensor) -> str | None:
    """Why the fused kernels cannot take ``q`` (a phrase for an error message), or None when they can."""
    return unsupported_input(q, "q", MAX_D, "a head dim", "D")


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr, DTYPE: tl.constexpr):
    # the operands meet in the inputs' dtype (the state and gradients are accumulated in fp32)
    return dot(a.to(DTYPE), b.to(DTYPE), FP32_DOT)


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    """φ: 0 = ReLU, 1 = ELU + 1."""
    if FEATURE == 0:
        return tl.maximum(x, 0.0)
    return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))


@triton.jit
def _dphi(x, FEATURE: tl.constexpr):
    """φ'(x)."""
    if FEATURE == 0:
        return tl.where(x > 0, 1.0, 0.0)
    return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))


@triton.jit
def _swap_pairs(x, BLOCK_D: tl.constexpr):
    """(x₀, x₁, x₂, x₃, …) → (x₁, x₀, x₃, x₂, …) as an exact product with a permutation matrix."""
    offs = tl.arange(0, BLOCK_D)
    perm = tl.where((offs[:, None] ^ 1) == offs[None, :], 1.0, 0.0)
    return tl.dot(x, perm, input_precision="ieee")


@triton.jit
def _rope(x, cos, sin, BLOCK_D: tl.constexpr):
    """ρ(x) = x·cos + (−x₁, x₀, −x₃, x₂, …)·sin."""
    sign = tl.where(tl.arange(0, BLOCK_D) % 2 == 0, -1.0, 1.0)
    return x * cos + sign[None, :] * _swap_pairs(x, BLOCK_D) * sin


@triton.jit
def _rope_t(g, cos, sin, BLOCK_D: tl.constexpr):
    """ρᵀ(g) = g·cos − rot(g·sin): the rotation's transpose, for gradients."""
    sign = tl.where(tl.arange(0, BLOCK_D) % 2 == 0, -1.0, 1.0)
    return g * cos - sign[None, :] * _swap_pairs(g * sin, BLOCK_D)


@triton.jit
def _load_rows(ptr, offs_n, offs_d, sn, sd, N, D):
    """A [BLOCK_N, BLOCK_D] tile in fp32, zero outside the tensor."""
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    return tl.load(ptr + offs_n[:, None] * sn + offs_d[None, :] * sd, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _features(ptr, offs_n, offs_d, sn, sd, N, D, FEATURE: tl.constexpr):
    """(raw x, φ(x)) tiles, φ(x) zero outside the tensor (φ(0) = 1 for ELU + 1)."""
    x = _load_rows(ptr, offs_n, offs_d, sn, sd, N, D)
    valid = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    return x, tl.where(valid, _phi(x, FEATURE), 0.0)


@triton.jit
def _key_weights(phi_k, offs_n, N, q_mean, row_max, row_sum, reweight_scale):
    """α_n = N · softmax_n(s · Q̄ · K_n), from the max and sum of the logits; 0 outside the tensor."""
    logits = tl.sum(phi_k * q_mean[None, :], axis=1) * reweight_scale
    return tl.where(offs_n < N, N * tl.exp(logits - row_max) / row_sum, 0.0)


@triton.jit
def _state_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, state_ptr, ksum_ptr, qmean_ptr, stats_ptr,
    H, N, D, reweight_scale,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    FEATURE: tl.constexpr, REWEIGHT: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
):
    bh = tl.program_id(0)
    q_ptr += (bh // H) * sqb + (bh % H) * sqh
    k_ptr += (bh // H) * skb + (bh % H) * skh
    v_ptr += (bh // H) * svb + (bh % H) * svh
    DTYPE = v_ptr.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_N)

    q_mean = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row_max = 0.0
    row_sum = 1.0
    if REWEIGHT:
        for start in range(0, N, BLOCK_N):
            _, phi_q = _features(q_ptr, start + rows, offs_d, sqn, sqd, N, D, FEATURE)
            q_mean += tl.sum(phi_q, axis=0)
        q_mean = q_mean / N
        # online softmax statistics of the logits, kept per lane and merged at the end
        lane_max = tl.full((BLOCK_N,), -1e30, dtype=tl.float32)
        lane_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            _, phi_k = _features(k_ptr, start + rows, offs_d, skn, skd, N, D, FEATURE)
            logits = tl.where(start + rows < N, tl.sum(phi_k * q_mean[None, :], axis=1) * reweight_scale,
                              float("-inf"))
            new_max = tl.maximum(lane_max, logits)
            lane_sum = lane_sum * tl.exp(lane_max - new_max) + tl.exp(logits - new_max)
            lane_max = new_max
        row_max = tl.max(lane_max, axis=0)
        row_sum = tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0)
        tl.store(qmean_ptr + bh * BLOCK_D + offs_d, q_mean)
        tl.store(stats_ptr + bh * 2, row_max)
        tl.store(stats_ptr + bh * 2 + 1, row_sum)

    state = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    k_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + rows
        _, phi_k = _features(k_ptr, offs_n, offs_d, skn, skd, N, D, FEATURE)
        if REWEIGHT:
            phi_k *= _key_weights(phi_k, offs_n, N, q_mean, row_max, row_sum, reweight_scale)[:, None]
        k_sum += tl.sum(phi_k, axis=0)
        if ROPE:
            phi_k = _rope(phi_k, _load_rows(cos_ptr, offs_n, offs_d, D, 1, N, D),
                          _load_rows(sin_ptr, offs_n, offs_d, D, 1, N, D), BLOCK_D)
        v = _load_rows(v_ptr, offs_n, offs_d, svn, svd, N, D)
        state += _dot(tl.trans(phi_k), v, FP32_DOT, DTYPE)
    tl.store(state_ptr + bh * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :], state)
    tl.store(ksum_ptr + bh * BLOCK_D + offs_d, k_sum)


@triton.jit
def _query_terms(q_ptr, cos_ptr, sin_ptr, state, k_sum, offs_n, offs_d, sqn, sqd, N, D, eps, clamp_min,
                 FEATURE: tl.constexpr, ROPE: tl.constexpr, CLAMP: tl.constexpr, BLOCK_D: tl.constexpr,
                 FP32_DOT: tl.constexpr, DTYPE: tl.constexpr):
    """For a block of queries: raw q, φ(q), ρ(φ(q)), den, whether den is unclamped, and the numerator ρ(Q) S."""
    q, phi_q = _features(q_ptr, offs_n, offs_d, sqn, sqd, N, D, FEATURE)
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
        rot_q = _rope(phi_q, cos, sin, BLOCK_D)
    num = _dot(rot_q, state, FP32_DOT, DTYPE)
    return q, phi_q, rot_q, cos, sin, den, free, num


@triton.jit
def _output_kernel(
    q_ptr, cos_ptr, sin_ptr, state_ptr, ksum_ptr, o_ptr,
    H, N, D, eps, clamp_min,
    sqb, sqh, sqn, sqd, sob, soh, son, sod,
    FEATURE: tl.constexpr, ROPE: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
):
    bh = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    DTYPE = o_ptr.dtype.element_ty
    state = tl.load(state_ptr + bh * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :])
    k_sum = tl.load(ksum_ptr + bh * BLOCK_D + offs_d)
    q_ptr += (bh // H) * sqb + (bh % H) * sqh
    _, _, _, _, _, den, _, num = _query_terms(q_ptr, cos_ptr, sin_ptr, state, k_sum, offs_n, offs_d, sqn, sqd,
                                              N, D, eps, clamp_min, FEATURE, ROPE, CLAMP, BLOCK_D, FP32_DOT, DTYPE)
    out = num / den[:, None]
    tl.store(o_ptr + (bh // H) * sob + (bh % H) * soh + offs_n[:, None] * son + offs_d[None, :] * sod,
             out.to(DTYPE), mask=(offs_n[:, None] < N) & (offs_d[None, :] < D))


@triton.jit
def _bwd_state_kernel(
    q_ptr, do_ptr, cos_ptr, sin_ptr, state_ptr, ksum_ptr, dstate_ptr, dksum_ptr,
    H, N, D, eps, clamp_min,
    sqb, sqh, sqn, sqd, sgb, sgh, sgn, sgd,
    FEATURE: tl.constexpr, ROPE: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
):
    bh = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_N)
    DTYPE = q_ptr.dtype.element_ty
    tile = offs_d[:, None] * BLOCK_D + offs_d[None, :]
    state = tl.load(state_ptr + bh * BLOCK_D * BLOCK_D + tile)
    k_sum = tl.load(ksum_ptr + bh * BLOCK_D + offs_d)
    q_ptr += (bh // H) * sqb + (bh % H) * sqh
    do_ptr += (bh // H) * sgb + (bh % H) * sgh
    d_state = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    d_ksum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + rows
        _, phi_q, rot_q, _, _, den, free, num = _query_terms(
            q_ptr, cos_ptr, sin_ptr, state, k_sum, offs_n, offs_d, sqn, sqd, N, D, eps, clamp_min,
            FEATURE, ROPE, CLAMP, BLOCK_D, FP32_DOT, DTYPE)
        g = _load_rows(do_ptr, offs_n, offs_d, sgn, sgd, N, D) / den[:, None]
        d_den = tl.where(free, -tl.sum(g * num, axis=1) / den, 0.0)
        d_ksum += tl.sum(d_den[:, None] * phi_q, axis=0)
        d_state += _dot(tl.trans(rot_q), g, FP32_DOT, DTYPE)
    tl.store(dstate_ptr + bh * BLOCK_D * BLOCK_D + tile, d_state)
    tl.store(dksum_ptr + bh * BLOCK_D + offs_d, d_ksum)


@triton.jit
def _key_grads(k_ptr, v_ptr, cos_ptr, sin_ptr, d_state, d_ksum, q_mean, row_max, row_sum, reweight_scale,
               offs_n, offs_d, skn, skd, svn, svd, N, D,
               FEATURE: tl.constexpr, REWEIGHT: tl.constexpr, ROPE: tl.constexpr, BLOCK_D: tl.constexpr,
               FP32_DOT: tl.constexpr, DTYPE: tl.constexpr):
    """For a block of keys: raw k, φ(k), α, dK' and dv."""
    k, phi_k = _features(k_ptr, offs_n, offs_d, skn, skd, N, D, FEATURE)
    alpha = tl.where(offs_n < N, 1.0, 0.0)
    if REWEIGHT:
        alpha = _key_weights(phi_k, offs_n, N, q_mean, row_max, row_sum, reweight_scale)
    v = _load_rows(v_ptr, offs_n, offs_d, svn, svd, N, D)
    d_rot = _dot(v, tl.trans(d_state), FP32_DOT, DTYPE)  # ∂L/∂ρ(K')
    rot_k = phi_k
    if ROPE:
        cos = _load_rows(cos_ptr, offs_n, offs_d, D, 1, N, D)
        sin = _load_rows(sin_ptr, offs_n, offs_d, D, 1, N, D)
        rot_k = _rope(phi_k, cos, sin, BLOCK_D)
        d_rot = _rope_t(d_rot, cos, sin, BLOCK_D)
    d_kw = d_rot + d_ksum[None, :]  # ∂L/∂K'
    d_v = _dot(rot_k * alpha[:, None], d_state, FP32_DOT, DTYPE)
    return k, phi_k, alpha, d_kw, d_v


@triton.jit
def _bwd_key_kernel(
    k_ptr, v_ptr, cos_ptr, sin_ptr, dstate_ptr, dksum_ptr, qmean_ptr, stats_ptr, dk_ptr, dv_ptr, dqmean_ptr,
    H, N, D, reweight_scale,
    skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd,
    FEATURE: tl.constexpr, REWEIGHT: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """dk and dv share the strides sg*."""
    bh = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_N)
    DTYPE = v_ptr.dtype.element_ty
    d_state = tl.load(dstate_ptr + bh * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :])
    d_ksum = tl.load(dksum_ptr + bh * BLOCK_D + offs_d)
    k_ptr += (bh // H) * skb + (bh % H) * skh
    v_ptr += (bh // H) * svb + (bh % H) * svh
    grads = (bh // H) * sgb + (bh % H) * sgh
    q_mean = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row_max = 0.0
    row_sum = 1.0
    mean_adw = tl.sum(tl.zeros((BLOCK_N,), dtype=tl.float32), axis=0)
    if REWEIGHT:  # the softmax backward needs mean_m α_m dα_m first
        q_mean = tl.load(qmean_ptr + bh * BLOCK_D + offs_d)
        row_max = tl.load(stats_ptr + bh * 2)
        row_sum = tl.load(stats_ptr + bh * 2 + 1)
        for start in range(0, N, BLOCK_N):
            _, phi_k, alpha, d_kw, _ = _key_grads(
                k_ptr, v_ptr, cos_ptr, sin_ptr, d_state, d_ksum, q_mean, row_max, row_sum, reweight_scale,
                start + rows, offs_d, skn, skd, svn, svd, N, D, FEATURE, REWEIGHT, ROPE, BLOCK_D, FP32_DOT, DTYPE)
            mean_adw += tl.sum(alpha * tl.sum(phi_k * d_kw, axis=1), axis=0)
        mean_adw = mean_adw / N
    d_qmean = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + rows
        k, phi_k, alpha, d_kw, d_v = _key_grads(
            k_ptr, v_ptr, cos_ptr, sin_ptr, d_state, d_ksum, q_mean, row_max, row_sum, reweight_scale,
            offs_n, offs_d, skn, skd, svn, svd, N, D, FEATURE, REWEIGHT, ROPE, BLOCK_D, FP32_DOT, DTYPE)
        d_phi = alpha[:, None] * d_kw
        if REWEIGHT:
            d_logit = alpha * (tl.sum(phi_k * d_kw, axis=1) - mean_adw) * reweight_scale
            d_phi += d_logit[:, None] * q_mean[None, :]
            d_qmean += tl.sum(d_logit[:, None] * phi_k, axis=0)
        mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
        offs = grads + offs_n[:, None] * sgn + offs_d[None, :] * sgd
        tl.store(dk_ptr + offs, (d_phi * _dphi(k, FEATURE)).to(DTYPE), mask=mask)
        tl.store(dv_ptr + offs, d_v.to(DTYPE), mask=mask)
    if REWEIGHT:
        tl.store(dqmean_ptr + bh * BLOCK_D + offs_d, d_qmean)


@triton.jit
def _bwd_query_kernel(
    q_ptr, do_ptr, cos_ptr, sin_ptr, state_ptr, ksum_ptr, dqmean_ptr, dq_ptr,
    H, N, D, eps, clamp_min,
    sqb, sqh, sqn, sqd, sgb, sgh, sgn, sgd, sdb, sdh, sdn, sdd,
    FEATURE: tl.constexpr, REWEIGHT: tl.constexpr, ROPE: tl.constexpr, CLAMP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
):
    bh = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    DTYPE = q_ptr.dtype.element_ty
    state = tl.load(state_ptr + bh * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :])
    k_sum = tl.load(ksum_ptr + bh * BLOCK_D + offs_d)
    q_ptr += (bh // H) * sqb + (bh % H) * sqh
    q, _, _, cos, sin, den, free, num = _query_terms(
        q_ptr, cos_ptr, sin_ptr, state, k_sum, offs_n, offs_d, sqn, sqd, N, D, eps, clamp_min,
        FEATURE, ROPE, CLAMP, BLOCK_D, FP32_DOT, DTYPE)
    g = _load_rows(do_ptr + (bh // H) * sgb + (bh % H) * sgh, offs_n, offs_d, sgn, sgd, N, D) / den[:, None]
    d_den = tl.where(free, -tl.sum(g * num, axis=1) / den, 0.0)
    d_phi = _dot(g, tl.trans(state), FP32_DOT, DTYPE)  # ∂L/∂ρ(Q)
    if ROPE:
        d_phi = _rope_t(d_phi, cos, sin, BLOCK_D)
    d_phi += d_den[:, None] * k_sum[None, :]
    if REWEIGHT:
        d_phi += tl.load(dqmean_ptr + bh * BLOCK_D + offs_d)[None, :] / N
    tl.store(dq_ptr + (bh // H) * sdb + (bh % H) * sdh + offs_n[:, None] * sdn + offs_d[None, :] * sdd,
             (d_phi * _dphi(q, FEATURE)).to(DTYPE), mask=(offs_n[:, None] < N) & (offs_d[None, :] < D))


class _Launch:
    """Block sizes, flags and the fp32 buffers of one [B, H, N, D] problem."""

    def __init__(self, q, feature_map, reweight_scale, cos, clamp_min, eps):
        B, H, N, D = q.shape
        self.BH, self.H, self.N, self.D = B * H, H, N, D
        self.BLOCK_D = max(16, triton.next_power_of_2(D))
        # the interpreter's cost grows with the program count: few, large blocks there
        self.BLOCK_N = min(256, max(16, triton.next_power_of_2(N))) if interpreting() else (
            64 if self.BLOCK_D <= 64 else 32)
        self.n_blocks = triton.cdiv(N, self.BLOCK_N)
        self.flags = dict(FEATURE=0 if feature_map == "relu" else 1, ROPE=cos is not None,
                          BLOCK_N=self.BLOCK_N, BLOCK_D=self.BLOCK_D,
                          FP32_DOT=fp32_dot(q.dtype),
                          num_warps=4 if self.BLOCK_D <= 64 else 8)
        self.reweight = reweight_scale is not None
        self.reweight_scale = reweight_scale or 0.0
        self.clamp = clamp_min is not None
        self.clamp_min = clamp_min if self.clamp else 0.0
        self.eps = eps

    def buffers(self, device, *shapes):
        return [torch.zeros(self.BH, *shape, device=device, dtype=torch.float32) for shape in shapes]


def _forward(q, k, v, feature_map, reweight_scale, cos, sin, clamp_min, eps):
    """The forward launches; arguments as ``linear_attention_reference``. Returns out and what the backward
    takes: the fp32 state, k_sum, q_mean and softmax stats."""
    lc = _Launch(q, feature_map, reweight_scale, cos, clamp_min, eps)
    cos, sin = _rope_tables(q, cos, sin)
    D = lc.BLOCK_D
    state, k_sum, q_mean, stats = lc.buffers(q.device, (D, D), (D,), (D,), (2,))
    _state_kernel[(lc.BH,)](
        q, k, v, cos, sin, state, k_sum, q_mean, stats, lc.H, lc.N, lc.D, lc.reweight_scale,
        *q.stride(), *k.stride(), *v.stride(), REWEIGHT=lc.reweight, **lc.flags)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    _output_kernel[(lc.BH, lc.n_blocks)](
        q, cos, sin, state, k_sum, out, lc.H, lc.N, lc.D, lc.eps, lc.clamp_min, *q.stride(), *out.stride(),
        CLAMP=lc.clamp, **lc.flags)
    return out, state, k_sum, q_mean, stats


def _backward(d_out, q, k, v, feature_map, reweight_scale, cos, sin, clamp_min, eps, state, k_sum, q_mean, stats):
    """The backward launches: dq, dk, dv from d_out, the forward's arguments and what ``_forward`` returned."""
    lc = _Launch(q, feature_map, reweight_scale, cos, clamp_min, eps)
    cos, sin = _rope_tables(q, cos, sin)
    D = lc.BLOCK_D
    d_state, d_ksum, d_qmean = lc.buffers(q.device, (D, D), (D,), (D,))
    _bwd_state_kernel[(lc.BH,)](
        q, d_out, cos, sin, state, k_sum, d_state, d_ksum, lc.H, lc.N, lc.D, lc.eps, lc.clamp_min,
        *q.stride(), *d_out.stride(), CLAMP=lc.clamp, **lc.flags)
    dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    _bwd_key_kernel[(lc.BH,)](
        k, v, cos, sin, d_state, d_ksum, q_mean, stats, dk, dv, d_qmean, lc.H, lc.N, lc.D, lc.reweight_scale,
        *k.stride(), *v.stride(), *dk.stride(), REWEIGHT=lc.reweight, **lc.flags)
    _bwd_query_kernel[(lc.BH, lc.n_blocks)](
        q, d_out, cos, sin, state, k_sum, d_qmean, dq, lc.H, lc.N, lc.D, lc.eps, lc.clamp_min,
        *q.stride(), *d_out.stride(), *dq.stride(), REWEIGHT=lc.reweight, CLAMP=lc.clamp, **lc.flags)
    return dq, dk, dv


def _rope_tables(q, cos, sin):
    """The RoPE tables as the kernels read them (fp32, [N, D] contiguous), or q twice as unused pointers."""
    if cos is None:
        return q, q
    return cos.float().contiguous(), sin.float().contiguous()


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, feature_map, reweight_scale, cos, sin, clamp_min, eps):
        out, *saved = _forward(q, k, v, feature_map, reweight_scale, cos, sin, clamp_min, eps)
        ctx.save_for_backward(q, k, v, cos, sin, *saved)
        ctx.args = (feature_map, reweight_scale, clamp_min, eps)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, cos, sin, *saved = ctx.saved_tensors
        feature_map, reweight_scale, clamp_min, eps = ctx.args
        dq, dk, dv = _backward(d_out, q, k, v, feature_map, reweight_scale, cos, sin, clamp_min, eps, *saved)
        return dq, dk, dv, None, None, None, None, None, None


def linear_attention_fused(q, k, v, feature_map: str, reweight_scale: float | None, cos, sin,
                           clamp_min: float | None, eps: float) -> torch.Tensor:
    """The fused forward and backward; arguments as ``linear_attention_reference``."""
    return _LinearAttention.apply(q, k, v, feature_map, reweight_scale, cos, sin, clamp_min, eps)
