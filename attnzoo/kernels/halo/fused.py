"""Fused Triton halo attention, forward and backward.

Layout of the work. One program takes up to 64 queries of one query block of one (image, head), warps over the
query rows (16 each), and loops over the win² keys of the block's neighbourhood (win = b + 2h) in chunks of
BLOCK_N with an online softmax, as FlashAttention does, so every product is a 2-D ``tl.dot`` on tensor cores
and a 144- or 196-key window costs 160 or 224 keys of work in the forward (144 or 208 in the backward), not
256. Each chunk is gathered straight from the key/value maps with masked loads: keys outside the image read as
zero, as timm's zero padding, and no unfolded copy is ever written. :func:`launch_config` is the one rule for
the tile sizes.

Relative logits. q·[height_rel; width_rel]ᵀ is one [BLOCK_M, 2·R] product per program; a gather along each row
turns it from relative to absolute columns, S_h[i, c] = q_i·height_rel[c − y_i + win − 1] for window row c
(likewise S_w with window columns), once per program. A key's relative logit is then S_h[i, ky_j] + S_w[i, kx_j],
which for a chunk of keys is one product [S_h | S_w] · E with the one-hot E[c, j] = [ky_j = c] (stacked with
[kx_j = c]); in fp16/bf16 S goes in as a high and a low half, so the logits keep fp32 precision.

Backward. P is recomputed from the forward's log-sum-exp (stored per query, base 2), then per chunk
    dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − Δ),  Δ = rowsum(dO ∘ O),  dQ += scale·dS K,  dK = scale·dSᵀ Q,
in two launches of the same program (``KEYS``): the first accumulates dQ and the one-hot product dS·Eᵀ, which
sums dS over each window row and column (shifted back to relative columns with the same gather, it gives dq's
relative terms and, per query, the gradient of q·tableᵀ, which one matmul with q outside the kernel reduces to
the tables' gradients); the second writes dK and dV. Split so, neither holds more than a forward's registers:
one pass holding all of it spills on sm_80. dV and dK are computed transposed (dOᵀ P, Qᵀ dS) so the
loop-invariant dO and Q are the products' first operands, split over the warps. Each query belongs to one
block, so dQ is written directly. A key in a halo belongs to up to four neighbourhoods: each program writes its
window's dK and dV rows (fp32) to a buffer of its own, and :func:`_fold_kernel` sums, per key, the windows
that hold it in a fixed order, so the gradients are deterministic (no atomics). All offsets a program id meets
are int64.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .._triton import LOG2E, Target, dot, fp32_dot, target_of

MAX_WIN, MAX_D = 16, 128  # the [BLOCK_M, 2·pad(2·win − 1)] relative tile and a head-dim tile stay in registers
# exact fp32 products are summed over 16-wide slices of their inner dimension (:func:`dot`'s K_CHUNK), so each
# holds a few registers per thread, not (rows + columns)·64: unsliced, the fp32 backward spills at head dim 64
K_SLICE = tl.constexpr(16)


def unsupported(q: torch.Tensor, v: torch.Tensor, block: int, halo: int) -> str | None:
    """Why the fused kernel cannot take these arguments (None if it can)."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"takes float16, bfloat16 or float32 `q`, got {q.dtype}"
    if max(q.shape[-1], v.shape[-1]) > MAX_D:
        return f"supports head dims <= {MAX_D}, got Dqk={q.shape[-1]}, Dv={v.shape[-1]}"
    if block + 2 * halo > MAX_WIN:
        return f"supports windows block_size + 2·halo_size <= {MAX_WIN}, got {block + 2 * halo}"
    return None


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot takes tiles of at least 16


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_m: int    # queries per program
    block_n: int    # keys per step of the loop over the window
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    fwd: Tiles
    bwd: Tiles      # both backward passes (dq, then dk/dv)


def launch_config(bq: int, win: int, dqk: int, dv: int, dtype: torch.dtype, target: Target) -> LaunchConfig:
    """The tiles of the attention kernels for query blocks of bq×bq, windows of win×win keys, head dims dqk/dv,
    inputs of ``dtype``, on ``target`` (``target_of(q)``; the same rule under the interpreter).

    - BLOCK_M: the query block padded to a power of two, 16 to 64 (a larger block takes several programs).
    - fp16/bf16: one warp per 16 query rows, so a 64-row program is one warpgroup (``wgmma`` on sm_90a,
      ``mma`` on sm_80), and at least two (one warp alone holds whole [keys, D] operands and spills at D = 64);
      the forward takes 32 keys a step, the backward 16 (at 32 the sm_80 backward spills for Dv = 108).
    - fp32 (exact products on the FMA units, each thread holding its rows and columns of the operands, sliced
      along the inner dimension: ``K_SLICE``): twice the warps, so a 16-row block takes 4 (on 2, the backward
      at D = 64 spills), and 16 keys a step.
    - Two pipeline stages: the next chunk's keys load while this one computes.
    Checked by compiling for sm_80 and sm_90a at every configuration the halo models launch; the rule does not
    depend on the target today (every configuration fits sm_80's shared memory) nor on the head dims ≤ MAX_D.
    """
    del dqk, dv, target
    block_m = min(64, _pad(bq * bq))
    warps = max(2, block_m // 16)
    if dtype == torch.float32:
        tiles = Tiles(block_m=block_m, block_n=16, num_warps=2 * warps, num_stages=2)
        return LaunchConfig(fwd=tiles, bwd=tiles)
    return LaunchConfig(fwd=Tiles(block_m, 32, warps, 2), bwd=Tiles(block_m, 16, warps, 2))


@triton.jit
def _query_rows(m0, BQ: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows m0 … m0 + BLOCK_M of a query block: their place (y, x) in it, and which are real queries."""
    i = m0 + tl.arange(0, BLOCK_M)
    return i // BQ, i % BQ, i < BQ * BQ


@triton.jit
def _tables(hr_ptr, wr_ptr, s_hr_r, s_hr_d, s_wr_r, s_wr_d, DQK,
            WIN: tl.constexpr, R_PAD: tl.constexpr, DQK_PAD: tl.constexpr):
    """The two relative tables stacked, [2·R_PAD, DQK_PAD]: rows r and R_PAD + r hold height_rel[r] and
    width_rel[r]."""
    t = tl.arange(0, 2 * R_PAD)
    t_w = t >= R_PAD
    r = tl.where(t_w, t - R_PAD, t)
    d = tl.arange(0, DQK_PAD)
    rows = tl.where(t_w[:, None], wr_ptr + r[:, None] * s_wr_r + d[None, :] * s_wr_d,
                    hr_ptr + r[:, None] * s_hr_r + d[None, :] * s_hr_d)
    return tl.load(rows, mask=(r < 2 * WIN - 1)[:, None] & (d < DQK)[None, :], other=0.0)


@triton.jit
def _absolute_rel(
    q, hr_ptr, wr_ptr, s_hr_r, s_hr_d, s_wr_r, s_wr_d, qy, qx, DQK,
    WIN: tl.constexpr, R_PAD: tl.constexpr, C_PAD: tl.constexpr, DQK_PAD: tl.constexpr, FP32: tl.constexpr,
):
    """The absolute relative logits S [BLOCK_M, 2·C_PAD]: S[i, c] = q_i·height_rel[c − y_i + WIN − 1] and
    S[i, C_PAD + c] = q_i·width_rel[c − x_i + WIN − 1] for window row / column c (columns c ≥ WIN unused)."""
    tables = _tables(hr_ptr, wr_ptr, s_hr_r, s_hr_d, s_wr_r, s_wr_d, DQK, WIN, R_PAD, DQK_PAD)
    rel = dot(q, tl.trans(tables), FP32, K_CHUNK=K_SLICE)  # [BLOCK_M, 2·R_PAD]
    c = tl.arange(0, 2 * C_PAD)
    c_w = c >= C_PAD
    src = tl.where(c_w[None, :], R_PAD + (c - C_PAD)[None, :] - qx[:, None], c[None, :] - qy[:, None]) + WIN - 1
    # (clamped only for padding rows and columns, whose values are never used)
    return tl.gather(rel, tl.minimum(tl.maximum(src, 0), 2 * R_PAD - 1), 1)


@triton.jit
def _chunk(
    q, s_hi, s_lo, k_ptr, v_ptr, k_base, v_base, sk_h, sk_w, sk_d, sv_h, sv_w, sv_d,
    top, left, start, H, W, DQK, DV, scale_qk, scale_pos,
    WIN: tl.constexpr, BLOCK_N: tl.constexpr, C_PAD: tl.constexpr, DQK_PAD: tl.constexpr,
    DV_PAD: tl.constexpr, SPLIT: tl.constexpr, FP32: tl.constexpr,
):
    """Keys start … start + BLOCK_N of the window whose top-left pixel is (top, left): their k and v rows
    [BLOCK_N, D_PAD], the one-hot E [2·C_PAD, BLOCK_N] of their window row and column, and the base-2 logits
    [BLOCK_M, BLOCK_N] (−inf past the window's last key)."""
    j = start + tl.arange(0, BLOCK_N)
    ky, kx = j // WIN, j % WIN
    k_ok = j < WIN * WIN
    iy, ix = top + ky, left + kx
    k_in = k_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)  # outside the image: timm's zero padding
    dqk, dv = tl.arange(0, DQK_PAD), tl.arange(0, DV_PAD)
    k = tl.load(k_ptr + k_base + (iy.to(tl.int64) * sk_h + ix.to(tl.int64) * sk_w)[:, None] + dqk[None, :] * sk_d,
                mask=k_in[:, None] & (dqk < DQK)[None, :], other=0.0)
    v = tl.load(v_ptr + v_base + (iy.to(tl.int64) * sv_h + ix.to(tl.int64) * sv_w)[:, None] + dv[None, :] * sv_d,
                mask=k_in[:, None] & (dv < DV)[None, :], other=0.0)
    c = tl.arange(0, 2 * C_PAD)
    e = tl.where((c >= C_PAD)[:, None], kx[None, :] == (c - C_PAD)[:, None], ky[None, :] == c[:, None])
    e = tl.where(e, 1.0, 0.0).to(k.dtype)  # (not a bool cast: the interpreter's bool → bf16 is wrong)
    pos = dot(s_hi, e, FP32, K_CHUNK=K_SLICE)
    if SPLIT:
        pos += dot(s_lo, e, FP32, K_CHUNK=K_SLICE)
    s = dot(q, tl.trans(k), FP32, K_CHUNK=K_SLICE) * scale_qk + pos * scale_pos
    return k, v, e, tl.where(k_ok[None, :], s, float("-inf")), k_in


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, hr_ptr, wr_ptr, o_ptr, lse_ptr,
    sq_b, sq_n, sq_h, sq_w, sq_d, sk_b, sk_n, sk_h, sk_w, sk_d, sv_b, sv_n, sv_h, sv_w, sv_d,
    s_hr_r, s_hr_d, s_wr_r, s_wr_d, so_b, so_n, so_h, so_w, so_d,
    H, W, DQK, DV, scale_qk, scale_pos,
    BLOCK: tl.constexpr, HALO: tl.constexpr, BQ: tl.constexpr, WIN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, C_PAD: tl.constexpr,
    DQK_PAD: tl.constexpr, DV_PAD: tl.constexpr, SPLIT: tl.constexpr, FP32: tl.constexpr,
):
    """Program (query block · row slice, head n, image b): out = softmax(logits) v and the base-2 lse."""
    M_SPLIT: tl.constexpr = (BQ * BQ + BLOCK_M - 1) // BLOCK_M
    blk, m0 = tl.program_id(0) // M_SPLIT, tl.program_id(0) % M_SPLIT * BLOCK_M
    bi, bj = blk // (W // BLOCK), blk % (W // BLOCK)
    n, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    qy, qx, q_ok = _query_rows(m0, BQ, BLOCK_M)
    qh, qw = (bi * BQ + qy).to(tl.int64), (bj * BQ + qx).to(tl.int64)  # place in the query map
    dqk, dv = tl.arange(0, DQK_PAD), tl.arange(0, DV_PAD)
    q = tl.load(q_ptr + (b * sq_b + n * sq_n + qh * sq_h + qw * sq_w)[:, None] + dqk[None, :] * sq_d,
                mask=q_ok[:, None] & (dqk < DQK)[None, :], other=0.0)
    s_abs = _absolute_rel(q, hr_ptr, wr_ptr, s_hr_r, s_hr_d, s_wr_r, s_wr_d, qy, qx, DQK,
                                  WIN, R_PAD, C_PAD, DQK_PAD, FP32)
    s_hi = s_abs.to(q.dtype)
    s_lo = (s_abs - s_hi.to(tl.float32)).to(q.dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    for start in range(0, WIN * WIN, BLOCK_N):
        k, v, e, s, k_in = _chunk(
            q, s_hi, s_lo, k_ptr, v_ptr, b * sk_b + n * sk_n, b * sv_b + n * sv_n, sk_h, sk_w, sk_d,
            sv_h, sv_w, sv_d, bi * BLOCK - HALO, bj * BLOCK - HALO, start, H, W, DQK, DV, scale_qk, scale_pos,
            WIN, BLOCK_N, C_PAD, DQK_PAD, DV_PAD, SPLIT, FP32)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, FP32, K_CHUNK=K_SLICE)
        m_i = m_new

    out = acc / l_i[:, None]
    o_rows = o_ptr + b * so_b + n * so_n + qh * so_h + qw * so_w
    tl.store(o_rows[:, None] + dv[None, :] * so_d, out.to(o_ptr.dtype.element_ty),
             mask=q_ok[:, None] & (dv < DV)[None, :])
    Hq, Wq = H // BLOCK * BQ, W // BLOCK * BQ
    tl.store(lse_ptr + ((b * tl.num_programs(1) + n) * Hq + qh) * Wq + qw, m_i + tl.log2(l_i), mask=q_ok)


@triton.jit
def _bwd_kernel(
    q_ptr, k_ptr, v_ptr, hr_ptr, wr_ptr, o_ptr, lse_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, drel_ptr,
    sq_b, sq_n, sq_h, sq_w, sq_d, sk_b, sk_n, sk_h, sk_w, sk_d, sv_b, sv_n, sv_h, sv_w, sv_d,
    s_hr_r, s_hr_d, s_wr_r, s_wr_d, so_b, so_n, so_h, so_w, so_d, sdo_b, sdo_n, sdo_h, sdo_w, sdo_d,
    sdq_b, sdq_n, sdq_h, sdq_w, sdq_d,
    H, W, DQK, DV, scale_qk, scale_pos, scale, pos_scale,
    BLOCK: tl.constexpr, HALO: tl.constexpr, BQ: tl.constexpr, WIN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, C_PAD: tl.constexpr,
    DQK_PAD: tl.constexpr, DV_PAD: tl.constexpr, SPLIT: tl.constexpr, FP32: tl.constexpr, KEYS: tl.constexpr,
):
    """The forward's program, backwards. KEYS=False: dq is written in place and each query's gradient of
    q·tableᵀ to drel [B, N, Hq, Wq, 2, 2·win − 1] (fp32). KEYS=True: the window's dk and dv rows go to this
    program's slots of the fp32 buffers [B, N, programs(0), win², D] (for :func:`_fold_kernel`)."""
    M_SPLIT: tl.constexpr = (BQ * BQ + BLOCK_M - 1) // BLOCK_M
    blk, m0 = tl.program_id(0) // M_SPLIT, tl.program_id(0) % M_SPLIT * BLOCK_M
    bi, bj = blk // (W // BLOCK), blk % (W // BLOCK)
    n, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    qy, qx, q_ok = _query_rows(m0, BQ, BLOCK_M)
    qh, qw = (bi * BQ + qy).to(tl.int64), (bj * BQ + qx).to(tl.int64)
    dqk, dv = tl.arange(0, DQK_PAD), tl.arange(0, DV_PAD)
    qk_mask, v_mask = q_ok[:, None] & (dqk < DQK)[None, :], q_ok[:, None] & (dv < DV)[None, :]
    q = tl.load(q_ptr + (b * sq_b + n * sq_n + qh * sq_h + qw * sq_w)[:, None] + dqk[None, :] * sq_d,
                mask=qk_mask, other=0.0)
    do = tl.load(do_ptr + (b * sdo_b + n * sdo_n + qh * sdo_h + qw * sdo_w)[:, None] + dv[None, :] * sdo_d,
                 mask=v_mask, other=0.0)
    o = tl.load(o_ptr + (b * so_b + n * so_n + qh * so_h + qw * so_w)[:, None] + dv[None, :] * so_d,
                mask=v_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # rowsum(P ∘ dP)
    Hq, Wq = H // BLOCK * BQ, W // BLOCK * BQ
    q_idx = (b * tl.num_programs(1) + n) * Hq * Wq + qh * Wq + qw  # this program's queries in lse and drel
    lse = tl.load(lse_ptr + q_idx, mask=q_ok, other=float("inf"))  # padding rows: P = 0
    s_abs = _absolute_rel(q, hr_ptr, wr_ptr, s_hr_r, s_hr_d, s_wr_r, s_wr_d, qy, qx, DQK,
                                  WIN, R_PAD, C_PAD, DQK_PAD, FP32)
    s_hi = s_abs.to(q.dtype)
    s_lo = (s_abs - s_hi.to(tl.float32)).to(q.dtype)

    win_base = ((b * tl.num_programs(1) + n) * tl.num_programs(0) + tl.program_id(0)) * (WIN * WIN)
    d_q = tl.zeros([BLOCK_M, DQK_PAD], tl.float32)
    d_abs = tl.zeros([BLOCK_M, 2 * C_PAD], tl.float32)  # dS summed over each window row, then column
    for start in range(0, WIN * WIN, BLOCK_N):
        k, v, e, s, k_in = _chunk(
            q, s_hi, s_lo, k_ptr, v_ptr, b * sk_b + n * sk_n, b * sv_b + n * sv_n, sk_h, sk_w, sk_d,
            sv_h, sv_w, sv_d, bi * BLOCK - HALO, bj * BLOCK - HALO, start, H, W, DQK, DV, scale_qk, scale_pos,
            WIN, BLOCK_N, C_PAD, DQK_PAD, DV_PAD, SPLIT, FP32)
        p = tl.exp2(s - lse[:, None])
        key = win_base + start + tl.arange(0, BLOCK_N)  # this chunk's rows in the dk / dv buffers
        # dV and dK transposed, [D_PAD, BLOCK_N], so the loop-invariant do and q are the first operands of the
        # products (split over the warps) rather than the second (held whole by every warp on sm_80)
        if KEYS:
            d_v = dot(tl.trans(do), p.to(do.dtype), FP32, K_CHUNK=K_SLICE)
            tl.store(dv_ptr + key[None, :] * DV + dv[:, None], d_v, mask=k_in[None, :] & (dv < DV)[:, None])
        dp = dot(do, tl.trans(v), FP32, K_CHUNK=K_SLICE)
        ds = p * (dp - delta[:, None])  # gradient of the natural-unit logits
        ds = ds.to(q.dtype)
        if KEYS:
            d_k = dot(tl.trans(q), ds, FP32, K_CHUNK=K_SLICE) * scale
            tl.store(dk_ptr + key[None, :] * DQK + dqk[:, None], d_k, mask=k_in[None, :] & (dqk < DQK)[:, None])
        else:
            d_q += dot(ds, k, FP32, K_CHUNK=K_SLICE)
            d_abs += dot(ds, tl.trans(e), FP32, K_CHUNK=K_SLICE)
    if KEYS:
        return
    d_q *= scale

    # relative logits backwards: table row r of height_rel met window row r − WIN + 1 + y (likewise width)
    t = tl.arange(0, 2 * R_PAD)
    t_w = t >= R_PAD
    r = tl.where(t_w, t - R_PAD, t)
    src = r[None, :] - WIN + 1 + tl.where(t_w[None, :], qx[:, None], qy[:, None])  # window row / column
    src_ok = (src >= 0) & (src < WIN) & (r < 2 * WIN - 1)[None, :]
    src = tl.minimum(tl.maximum(src, 0), C_PAD - 1) + tl.where(t_w, C_PAD, 0)[None, :]
    d_rel = tl.where(src_ok, tl.gather(d_abs, src, 1), 0.0) * pos_scale  # [BLOCK_M, 2·R_PAD]
    tables = _tables(hr_ptr, wr_ptr, s_hr_r, s_hr_d, s_wr_r, s_wr_d, DQK, WIN, R_PAD, DQK_PAD)
    d_q += dot(d_rel.to(tables.dtype), tables, FP32, K_CHUNK=K_SLICE)
    dq_rows = dq_ptr + b * sdq_b + n * sdq_n + qh * sdq_h + qw * sdq_w
    tl.store(dq_rows[:, None] + dqk[None, :] * sdq_d, d_q.to(dq_ptr.dtype.element_ty), mask=qk_mask)
    R: tl.constexpr = 2 * WIN - 1
    tl.store(drel_ptr + q_idx[:, None] * (2 * R) + (r + tl.where(t_w, R, 0))[None, :], d_rel,
             mask=q_ok[:, None] & (r < R)[None, :])


@triton.jit
def _fold_kernel(
    part_ptr, out_ptr, so_b, so_n, so_h, so_w, so_d, H, W, D,
    BLOCK: tl.constexpr, HALO: tl.constexpr, WIN: tl.constexpr, REACH: tl.constexpr, M_SPLIT: tl.constexpr,
    BLOCK_K: tl.constexpr, D_PAD: tl.constexpr,
):
    """Key block (program 0) of head n, image b: each key's gradient, the sum of its rows in the windows of the
    (2·REACH + 1)² blocks around (those that reach it; M_SPLIT programs each), in a fixed order, written in
    the key map's dtype."""
    nw = W // BLOCK
    bi, bj = tl.program_id(0) // nw, tl.program_id(0) % nw
    n, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    t = tl.arange(0, BLOCK_K)
    y, x = t // BLOCK, t % BLOCK
    d = tl.arange(0, D_PAD)
    acc = tl.zeros([BLOCK_K, D_PAD], tl.float32)
    SIDE: tl.constexpr = 2 * REACH + 1
    for w in range(SIDE * SIDE * M_SPLIT):  # a loop, not unrolled: one masked load per window and program
        di, dj, m = w // M_SPLIT // SIDE - REACH, w // M_SPLIT % SIDE - REACH, w % M_SPLIT
        # the key's place in the window of block (bi + di, bj + dj), whose top-left is that block's − HALO
        ky, kx = y - di * BLOCK + HALO, x - dj * BLOCK + HALO
        ok = (t < BLOCK * BLOCK) & (ky >= 0) & (ky < WIN) & (kx >= 0) & (kx < WIN)
        ok &= (bi + di >= 0) & (bi + di < H // BLOCK) & (bj + dj >= 0) & (bj + dj < nw)
        prog = (((b * tl.num_programs(1) + n) * (H // BLOCK) + bi + di) * nw + bj + dj) * M_SPLIT + m
        rows = (prog * (WIN * WIN) + ky * WIN + kx) * D
        acc += tl.load(part_ptr + rows[:, None] + d[None, :], mask=ok[:, None] & (d < D)[None, :], other=0.0)
    iy, ix = (bi * BLOCK + y).to(tl.int64), (bj * BLOCK + x).to(tl.int64)
    tl.store(out_ptr + (b * so_b + n * so_n + iy * so_h + ix * so_w)[:, None] + d[None, :] * so_d,
             acc.to(out_ptr.dtype.element_ty), mask=(t < BLOCK * BLOCK)[:, None] & (d < D)[None, :])


def _launch_args(q, k, v, block: int, halo: int, scale: float, scale_pos_embed: bool, backward: bool):
    """Grid, runtime scalars and compile-time constants of the forward or the backward kernel."""
    B, N, H, W, DQK = k.shape
    win, bq = block + 2 * halo, q.shape[2] // (H // block)
    config = launch_config(bq, win, DQK, v.shape[-1], q.dtype, target_of(q))
    cfg = config.bwd if backward else config.fwd
    pos_scale = scale if scale_pos_embed else 1.0
    grid = ((H // block) * (W // block) * triton.cdiv(bq * bq, cfg.block_m), N, B)
    scalars = (H, W, DQK, v.shape[-1], scale * LOG2E, pos_scale * LOG2E)
    const = dict(
        BLOCK=block, HALO=halo, BQ=bq, WIN=win, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        R_PAD=_pad(2 * win - 1), C_PAD=_pad(win), DQK_PAD=_pad(DQK), DV_PAD=_pad(v.shape[-1]),
        SPLIT=q.dtype != torch.float32, FP32=fp32_dot(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return grid, scalars, const, pos_scale


def _fold(part: torch.Tensor, like: torch.Tensor, block: int, halo: int) -> torch.Tensor:
    """The gradient of the key (or value) map ``like`` from the rows ``part`` [B, N, programs, win², D] that the
    backward's programs wrote for their windows (blocks × M_SPLIT programs)."""
    B, N, H, W, D = like.shape
    out = torch.empty_like(like)
    _fold_kernel[((H // block) * (W // block), N, B)](
        part, out, *out.stride(), H, W, D, BLOCK=block, HALO=halo, WIN=block + 2 * halo,
        REACH=triton.cdiv(halo, block), M_SPLIT=part.shape[2] // ((H // block) * (W // block)),
        BLOCK_K=triton.next_power_of_2(block * block), D_PAD=triton.next_power_of_2(D), num_warps=4)
    return out


def _forward(q, k, v, height_rel, width_rel, block: int, halo: int, scale: float, scale_pos_embed: bool):
    """The forward launch: (out [B, N, Hq, Wq, Dv] in q's dtype, lse [B, N, Hq, Wq] fp32, the base-2
    log-sum-exp of each query's logits, which the backward takes to recompute P)."""
    grid, scalars, const, _ = _launch_args(q, k, v, block, halo, scale, scale_pos_embed, backward=False)
    B, N, Hq, Wq, _ = q.shape
    # stored [B, N, Dv, Hq, Wq], so folding the heads back into channels is a free view
    out = torch.empty(B, N, v.shape[-1], Hq, Wq, dtype=q.dtype, device=q.device).permute(0, 1, 3, 4, 2)
    lse = torch.empty(B, N, Hq, Wq, dtype=torch.float32, device=q.device)
    _fwd_kernel[grid](q, k, v, height_rel, width_rel, out, lse, *q.stride(), *k.stride(), *v.stride(),
                      *height_rel.stride(), *width_rel.stride(), *out.stride(), *scalars, **const)
    return out, lse


def _backward(do, q, k, v, height_rel, width_rel, out, lse, block: int, halo: int, scale: float,
              scale_pos_embed: bool):
    """The backward launch: the gradients of q, k, v, height_rel, width_rel, given the output gradient `do`
    and the forward's `out` and `lse`."""
    grid, scalars, const, pos_scale = _launch_args(q, k, v, block, halo, scale, scale_pos_embed, backward=True)
    B, N, H, W, _ = k.shape
    win = block + 2 * halo
    windows = (B, N, grid[0], win * win)
    acc = dict(dtype=torch.float32, device=q.device)
    dq = torch.empty_like(q)
    dk_win, dv_win = torch.empty(*windows, k.shape[-1], **acc), torch.empty(*windows, v.shape[-1], **acc)
    drel = torch.empty(*q.shape[:4], 2, 2 * win - 1, **acc)
    for keys in (False, True):
        _bwd_kernel[grid](q, k, v, height_rel, width_rel, out, lse, do, dq, dk_win, dv_win, drel,
                          *q.stride(), *k.stride(), *v.stride(), *height_rel.stride(), *width_rel.stride(),
                          *out.stride(), *do.stride(), *dq.stride(), *scalars, scale, pos_scale, KEYS=keys, **const)
    d_tables = torch.einsum("bnyxtr,bnyxd->trd", drel, q.float())
    # one tensor each (the registered backward op may not return views of one another)
    d_height, d_width = (d_tables[i].to(height_rel.dtype, copy=True) for i in range(2))
    return dq, _fold(dk_win, k, block, halo), _fold(dv_win, v, block, halo), d_height, d_width
