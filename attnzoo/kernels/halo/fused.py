"""Fused Triton halo attention, forward and backward.

Layout of the work. One program takes one query block of one (image, head): its bq² queries (Q_PAD rows) and
the win² keys of its neighbourhood (K_PAD rows, win = b + 2h ≤ 16), gathered straight from the key/value maps
with masked loads: keys outside the image read as zero, as timm's zero padding, and no unfolded copy is ever
written. The whole row of logits fits one tile, so the softmax is exact in registers.

Relative logits. R_h = q·height_relᵀ is one [Q_PAD, R_PAD] product per program; the logit of query i and key j
takes column ky_j − y_i + win − 1 of it, a `tl.gather` along the row (likewise R_w with kx). The backward runs
this backwards: the logit gradient dS is summed over each window row with a one-hot product
(dS·E_h, E_h[j, r] = [ky_j = r]) and shifted back per query with the same gather, giving dR_h, from which
dq += dR_h·height_rel and d height_rel += dR_hᵀ q.

Backward recomputes P from q and k rather than storing it (as FlashAttention does), then
    dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − rowsum(P ∘ dP)),  dQ = scale·dS K (+ relative terms),
    dK = scale·dSᵀ Q.
Each query belongs to one block, so dQ is written directly; keys in a halo belong to several neighbourhoods
and the relative tables to every program, so dK, dV and the tables' gradients are accumulated with fp32
atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import dot, fp32_dot

MAX_WIN, MAX_D = 16, 128  # win² ≤ 256 keys and bq² ≤ b² ≤ 256 queries fit one tile
LOG2E = 1.4426950408889634


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


@triton.jit
def _tile(
    q_ptr, k_ptr, v_ptr, hr_ptr, wr_ptr, bi, bj, b, n,
    sq_b, sq_n, sq_h, sq_w, sq_d, sk_b, sk_n, sk_h, sk_w, sk_d, sv_b, sv_n, sv_h, sv_w, sv_d,
    s_hr_r, s_hr_d, s_wr_r, s_wr_d, H, W, DQK, DV, scale_qk, scale_pos,
    BLOCK: tl.constexpr, HALO: tl.constexpr, BQ: tl.constexpr, WIN: tl.constexpr,
    Q_PAD: tl.constexpr, K_PAD: tl.constexpr, R_PAD: tl.constexpr,
    DQK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    FP32: tl.constexpr,
):
    """Query block (bi, bj) of image b, head n, and its neighbourhood: the loaded tiles and the softmax P."""
    qi = tl.arange(0, Q_PAD)
    qy, qx = qi // BQ, qi % BQ  # place in the query block
    q_ok = qi < BQ * BQ
    kj = tl.arange(0, K_PAD)
    ky, kx = kj // WIN, kj % WIN  # place in the window
    k_ok = kj < WIN * WIN
    iy, ix = bi * BLOCK - HALO + ky, bj * BLOCK - HALO + kx  # place in the image
    k_in = k_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)  # outside: timm's zero padding
    dqk, dv = tl.arange(0, DQK_PAD), tl.arange(0, DV_PAD)
    r = tl.arange(0, R_PAD)

    q_rows = q_ptr + b * sq_b + n * sq_n + (bi * BQ + qy) * sq_h + (bj * BQ + qx) * sq_w
    q = tl.load(q_rows[:, None] + dqk[None, :] * sq_d, mask=q_ok[:, None] & (dqk < DQK)[None, :], other=0.0)
    k_rows = k_ptr + b * sk_b + n * sk_n + iy * sk_h + ix * sk_w
    k = tl.load(k_rows[:, None] + dqk[None, :] * sk_d, mask=k_in[:, None] & (dqk < DQK)[None, :], other=0.0)
    v_rows = v_ptr + b * sv_b + n * sv_n + iy * sv_h + ix * sv_w
    v = tl.load(v_rows[:, None] + dv[None, :] * sv_d, mask=k_in[:, None] & (dv < DV)[None, :], other=0.0)
    rel_ok = (r < 2 * WIN - 1)[:, None] & (dqk < DQK)[None, :]
    hr = tl.load(hr_ptr + r[:, None] * s_hr_r + dqk[None, :] * s_hr_d, mask=rel_ok, other=0.0)
    wr = tl.load(wr_ptr + r[:, None] * s_wr_r + dqk[None, :] * s_wr_d, mask=rel_ok, other=0.0)

    # relative logits: column ky − y + win − 1 of q·height_relᵀ plus column kx − x + win − 1 of q·width_relᵀ
    # (clamped only for the padding rows and columns, whose logits are discarded)
    rel_h = dot(q, tl.trans(hr), FP32)  # [Q_PAD, R_PAD]
    rel_w = dot(q, tl.trans(wr), FP32)
    col_h = tl.minimum(tl.maximum(ky[None, :] - qy[:, None] + WIN - 1, 0), R_PAD - 1)
    col_w = tl.minimum(tl.maximum(kx[None, :] - qx[:, None] + WIN - 1, 0), R_PAD - 1)
    pos = tl.gather(rel_h, col_h, 1) + tl.gather(rel_w, col_w, 1)  # [Q_PAD, K_PAD]

    # base-2 logits log2(e)·(scale·q kᵀ + pos_scale·pos); the whole row is in the tile, so softmax is exact
    s = dot(q, tl.trans(k), FP32) * scale_qk + pos * scale_pos
    s = tl.where(k_ok[None, :], s, float("-inf"))
    lse = tl.max(s, 1)
    p = tl.exp2(s - lse[:, None])
    lse += tl.log2(tl.sum(p, 1))
    p = tl.exp2(s - lse[:, None])
    return lse, q, k, v, hr, wr, p, qy, qx, q_ok, ky, kx, k_ok, k_in, iy, ix, dqk, dv, r


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, hr_ptr, wr_ptr, o_ptr, lse_ptr,
    sq_b, sq_n, sq_h, sq_w, sq_d, sk_b, sk_n, sk_h, sk_w, sk_d, sv_b, sv_n, sv_h, sv_w, sv_d,
    s_hr_r, s_hr_d, s_wr_r, s_wr_d, so_b, so_n, so_h, so_w, so_d,
    NHEADS, H, W, DQK, DV, scale_qk, scale_pos,
    BLOCK: tl.constexpr, HALO: tl.constexpr, BQ: tl.constexpr, WIN: tl.constexpr,
    Q_PAD: tl.constexpr, K_PAD: tl.constexpr, R_PAD: tl.constexpr,
    DQK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    FP32: tl.constexpr,
):
    nw = W // BLOCK
    bi, bj = tl.program_id(0) // nw, tl.program_id(0) % nw
    b, n = tl.program_id(1) // NHEADS, tl.program_id(1) % NHEADS
    lse, q, k, v, hr, wr, p, qy, qx, q_ok, ky, kx, k_ok, k_in, iy, ix, dqk, dv, r = _tile(
        q_ptr, k_ptr, v_ptr, hr_ptr, wr_ptr, bi, bj, b, n,
        sq_b, sq_n, sq_h, sq_w, sq_d, sk_b, sk_n, sk_h, sk_w, sk_d, sv_b, sv_n, sv_h, sv_w, sv_d,
        s_hr_r, s_hr_d, s_wr_r, s_wr_d, H, W, DQK, DV, scale_qk, scale_pos,
        BLOCK, HALO, BQ, WIN, Q_PAD, K_PAD, R_PAD, DQK_PAD, DV_PAD, FP32)
    out = dot(p.to(v.dtype), v, FP32)
    o_rows = o_ptr + b * so_b + n * so_n + (bi * BQ + qy) * so_h + (bj * BQ + qx) * so_w
    tl.store(o_rows[:, None] + dv[None, :] * so_d, out.to(o_ptr.dtype.element_ty),
             mask=q_ok[:, None] & (dv < DV)[None, :])
    q_idx = (bi * BQ + qy) * (W // BLOCK * BQ) + bj * BQ + qx
    tl.store(lse_ptr + tl.program_id(1) * (H // BLOCK * BQ) * (W // BLOCK * BQ) + q_idx, lse, mask=q_ok)


@triton.jit
def _bwd_kernel(
    q_ptr, k_ptr, v_ptr, hr_ptr, wr_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, dhr_ptr, dwr_ptr,
    sq_b, sq_n, sq_h, sq_w, sq_d, sk_b, sk_n, sk_h, sk_w, sk_d, sv_b, sv_n, sv_h, sv_w, sv_d,
    s_hr_r, s_hr_d, s_wr_r, s_wr_d, sdo_b, sdo_n, sdo_h, sdo_w, sdo_d, sdq_b, sdq_n, sdq_h, sdq_w, sdq_d,
    NHEADS, H, W, DQK, DV, scale_qk, scale_pos, scale, pos_scale,
    BLOCK: tl.constexpr, HALO: tl.constexpr, BQ: tl.constexpr, WIN: tl.constexpr,
    Q_PAD: tl.constexpr, K_PAD: tl.constexpr, R_PAD: tl.constexpr,
    DQK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    WIN_PAD: tl.constexpr, FP32: tl.constexpr,
):
    """dq is written in place (each query has one block); dk, dv, dhr, dwr are contiguous fp32 buffers that
    take atomic adds (a halo key sits in several neighbourhoods, the tables serve every program)."""
    nw = W // BLOCK
    bi, bj = tl.program_id(0) // nw, tl.program_id(0) % nw
    b, n = tl.program_id(1) // NHEADS, tl.program_id(1) % NHEADS
    lse, q, k, v, hr, wr, p, qy, qx, q_ok, ky, kx, k_ok, k_in, iy, ix, dqk, dv, r = _tile(
        q_ptr, k_ptr, v_ptr, hr_ptr, wr_ptr, bi, bj, b, n,
        sq_b, sq_n, sq_h, sq_w, sq_d, sk_b, sk_n, sk_h, sk_w, sk_d, sv_b, sv_n, sv_h, sv_w, sv_d,
        s_hr_r, s_hr_d, s_wr_r, s_wr_d, H, W, DQK, DV, scale_qk, scale_pos,
        BLOCK, HALO, BQ, WIN, Q_PAD, K_PAD, R_PAD, DQK_PAD, DV_PAD, FP32)
    q_cols = (bi * BQ + qy) * sdo_h + (bj * BQ + qx) * sdo_w
    do = tl.load(do_ptr + b * sdo_b + n * sdo_n + q_cols[:, None] + dv[None, :] * sdo_d,
                 mask=q_ok[:, None] & (dv < DV)[None, :], other=0.0)
    key = ((b * NHEADS + n) * H + iy) * W + ix  # this tile's keys in the contiguous accumulators

    d_v = dot(tl.trans(p.to(do.dtype)), do, FP32)  # [K_PAD, DV_PAD]
    tl.atomic_add(dv_ptr + key[:, None] * DV + dv[None, :], d_v, mask=k_in[:, None] & (dv < DV)[None, :])
    dp = dot(do, tl.trans(v), FP32)
    ds = p * (dp - tl.sum(p * dp, 1)[:, None])  # gradient of the natural-unit logits
    ds = tl.where(q_ok[:, None], ds, 0.0)
    d_k = dot(tl.trans(ds.to(q.dtype)), q, FP32) * scale
    tl.atomic_add(dk_ptr + key[:, None] * DQK + dqk[None, :], d_k, mask=k_in[:, None] & (dqk < DQK)[None, :])
    d_q = dot(ds.to(k.dtype), k, FP32) * scale

    # relative logits backwards: sum dpos over each window row (column) with a one-hot product, then shift
    # each query's sums to relative indices: table row r meets window row r − win + 1 + y
    dpos = ds * pos_scale
    c = tl.arange(0, WIN_PAD)
    row_sum = dot(dpos, ((ky[:, None] == c[None, :]) & k_ok[:, None]).to(tl.float32), FP32)
    col_sum = dot(dpos, ((kx[:, None] == c[None, :]) & k_ok[:, None]).to(tl.float32), FP32)
    src_h = r[None, :] - WIN + 1 + qy[:, None]
    src_w = r[None, :] - WIN + 1 + qx[:, None]
    d_rel_h = tl.gather(row_sum, tl.minimum(tl.maximum(src_h, 0), WIN_PAD - 1), 1)
    d_rel_w = tl.gather(col_sum, tl.minimum(tl.maximum(src_w, 0), WIN_PAD - 1), 1)
    d_rel_h = tl.where((src_h >= 0) & (src_h < WIN), d_rel_h, 0.0)  # [Q_PAD, R_PAD]
    d_rel_w = tl.where((src_w >= 0) & (src_w < WIN), d_rel_w, 0.0)
    d_q += dot(d_rel_h.to(hr.dtype), hr, FP32)
    d_q += dot(d_rel_w.to(wr.dtype), wr, FP32)
    dq_rows = dq_ptr + b * sdq_b + n * sdq_n + (bi * BQ + qy) * sdq_h + (bj * BQ + qx) * sdq_w
    tl.store(dq_rows[:, None] + dqk[None, :] * sdq_d, d_q.to(dq_ptr.dtype.element_ty),
             mask=q_ok[:, None] & (dqk < DQK)[None, :])

    rel_ok = (r < 2 * WIN - 1)[:, None] & (dqk < DQK)[None, :]
    tl.atomic_add(dhr_ptr + r[:, None] * DQK + dqk[None, :],
                  dot(tl.trans(d_rel_h.to(q.dtype)), q, FP32), mask=rel_ok)
    tl.atomic_add(dwr_ptr + r[:, None] * DQK + dqk[None, :],
                  dot(tl.trans(d_rel_w.to(q.dtype)), q, FP32), mask=rel_ok)


def _launch_args(q, k, v, height_rel, width_rel, block: int, halo: int, scale: float, scale_pos_embed: bool):
    """Grid, runtime scalars and compile-time constants shared by both kernels."""
    B, N, H, W, DQK = k.shape
    win, bq = block + 2 * halo, q.shape[2] // (H // block)
    pos_scale = scale if scale_pos_embed else 1.0
    grid = ((H // block) * (W // block), B * N)
    scalars = (N, H, W, DQK, v.shape[-1], scale * LOG2E, pos_scale * LOG2E)
    const = dict(
        BLOCK=block, HALO=halo, BQ=bq, WIN=win, Q_PAD=_pad(bq * bq), K_PAD=_pad(win * win),
        R_PAD=_pad(2 * win - 1), DQK_PAD=_pad(DQK), DV_PAD=_pad(v.shape[-1]),
        FP32=fp32_dot(q.dtype),
        num_warps=8,
    )
    return grid, scalars, const, pos_scale


def _forward(q, k, v, height_rel, width_rel, block: int, halo: int, scale: float, scale_pos_embed: bool):
    """The forward launch: (out [B, N, Hq, Wq, Dv] in q's dtype, lse [B, N, Hq, Wq] fp32, the base-2
    log-sum-exp of each query's logits, which the backward takes to recompute P)."""
    grid, scalars, const, _ = _launch_args(q, k, v, height_rel, width_rel, block, halo, scale, scale_pos_embed)
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
    grid, scalars, const, pos_scale = _launch_args(
        q, k, v, height_rel, width_rel, block, halo, scale, scale_pos_embed)
    dq = torch.empty_like(q)
    acc = dict(dtype=torch.float32, device=q.device)
    dk, dv = torch.zeros(k.shape, **acc), torch.zeros(v.shape, **acc)
    dhr, dwr = torch.zeros(height_rel.shape, **acc), torch.zeros(width_rel.shape, **acc)
    _bwd_kernel[grid](q, k, v, height_rel, width_rel, do, dq, dk, dv, dhr, dwr,
                      *q.stride(), *k.stride(), *v.stride(), *height_rel.stride(), *width_rel.stride(),
                      *do.stride(), *dq.stride(), *scalars, scale, pos_scale,
                      WIN_PAD=_pad(const["WIN"]), **const)
    return dq, dk.to(k.dtype), dv.to(v.dtype), dhr.to(height_rel.dtype), dwr.to(width_rel.dtype)


class _HaloAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, height_rel, width_rel, block, halo, scale, scale_pos_embed):
        out, lse = _forward(q, k, v, height_rel, width_rel, block, halo, scale, scale_pos_embed)
        ctx.save_for_backward(q, k, v, height_rel, width_rel, out, lse)
        ctx.args = (block, halo, scale, scale_pos_embed)
        return out

    @staticmethod
    def backward(ctx, do):
        return (*_backward(do, *ctx.saved_tensors, *ctx.args), None, None, None, None)


def halo_attention_fused(q, k, v, height_rel, width_rel, block: int, halo: int, scale: float,
                         scale_pos_embed: bool) -> torch.Tensor:
    """The fused path; arguments validated by ``attnzoo.kernels.halo.halo_attention``."""
    return _HaloAttention.apply(q, k, v, height_rel, width_rel, block, halo, scale, scale_pos_embed)
