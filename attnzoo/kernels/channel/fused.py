"""Fused Triton channel attention, forward and backward.

Per (image, group) the op is three small steps around one hd × hd state:

    forward    S = kᵀ v (split-N, fp32)       A = softmax(scale · S)           out = q Aᵀ
    backward   dA = doutᵀ q (split-N, fp32)   dS = A ⊙ (dA − rowsum(dA ⊙ A))   dq = dout A,
                                                                  dk = scale · v dSᵀ,  dv = scale · k dS

The two sums over all N tokens run as ``_outer_sum_kernel``: each program reduces a run of N-blocks into a
fp32 partial state, written to its own slot so the sum is deterministic (no atomics). The ``_apply`` kernels
then sum those few partials, do the softmax (or its backward) on the hd × hd state in registers, and stream
the tokens once. Only A (hd × hd per group, fp32) is kept for the backward; everything else is recomputed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import Target, dot, fp32_dot, target_of, unsupported_input

MAX_D = 128


def unsupported(q: torch.Tensor) -> str | None:
    """Why the fused kernels cannot take ``q`` (a phrase for an error message), or None when they can."""
    return unsupported_input(q, "q", MAX_D, "a head dim", "hd")


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    # b is the fp32 hd × hd state or its gradient: it meets a in a's dtype
    return dot(a, b.to(a.dtype), FP32_DOT)


@triton.jit
def _outer_sum_kernel(
    x_ptr, y_ptr, part_ptr,
    G, N, D, blocks_per_split,
    sxb, sxg, sxn, sxd, syb, syg, syn, syd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FOLD: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """part[bg, s] = Σ_n x[n, :]ᵀ y[n, :] over the N-blocks of split s, as a fp32 [BLOCK_D, BLOCK_D] tile.

    The state is hd × hd, too few rows for sm_90a's wgmma (64 per warpgroup) when hd < 64. So each block of
    BLOCK_N tokens is folded into FOLD runs of BLOCK_N / FOLD tokens stacked along the rows: the product of the
    [FOLD·BLOCK_D, BLOCK_N / FOLD] and [BLOCK_N / FOLD, FOLD·BLOCK_D] tiles holds the FOLD partial states on its
    diagonal blocks, summed at the end (the off-diagonal ones, products across runs, are discarded: FOLD× the
    flops of a memory-bound sum)."""
    bg = tl.program_id(0).to(tl.int64)  # int64: (bg // G) * sxb passes 2**31 on large batches
    split = tl.program_id(1).to(tl.int64)  # int64: a token · sxn passes 2**31 in large views
    x_ptr += (bg // G) * sxb + (bg % G) * sxg
    y_ptr += (bg // G) * syb + (bg % G) * syg
    RUN: tl.constexpr = BLOCK_N // FOLD
    rows = tl.arange(0, FOLD * BLOCK_D)  # (fold, dim) pairs
    fold, dim = rows // BLOCK_D, rows % BLOCK_D
    offs_t = tl.arange(0, RUN)
    acc = tl.zeros((FOLD * BLOCK_D, FOLD * BLOCK_D), dtype=tl.float32)
    for i in range(blocks_per_split):
        start = (split * blocks_per_split + i) * BLOCK_N
        tok_t = start + fold[:, None] * RUN + offs_t[None, :]  # [FOLD·BLOCK_D, RUN]: token of (row, column)
        xt = tl.load(x_ptr + dim[:, None] * sxd + tok_t * sxn, mask=(dim[:, None] < D) & (tok_t < N), other=0.0)
        tok = start + offs_t[:, None] + fold[None, :] * RUN  # [RUN, FOLD·BLOCK_D]
        y = tl.load(y_ptr + tok * syn + dim[None, :] * syd, mask=(tok < N) & (dim[None, :] < D), other=0.0)
        acc += _dot(xt, y, FP32_DOT)
    acc = tl.where(fold[:, None] == fold[None, :], acc, 0.0)  # the FOLD diagonal blocks, summed:
    state = tl.sum(tl.sum(tl.reshape(acc, (FOLD, BLOCK_D, FOLD, BLOCK_D)), axis=2), axis=0)
    offs_d = tl.arange(0, BLOCK_D)
    tile = (bg * tl.num_programs(1) + split) * BLOCK_D * BLOCK_D
    tl.store(part_ptr + tile + offs_d[:, None] * BLOCK_D + offs_d[None, :], state)


@triton.jit
def _sum_partials(part_ptr, bg, num_splits, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    tile = part_ptr + bg * num_splits * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :]
    total = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for s in range(num_splits):
        total += tl.load(tile + s * BLOCK_D * BLOCK_D)
    return total


@triton.jit
def _fwd_apply_kernel(
    q_ptr, part_ptr, attn_ptr, o_ptr,
    G, N, D, num_splits, scale,
    sqb, sqg, sqn, sqd, sob, sog, son, sod,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """A = softmax(scale · Σ partials) over its last dim, out = q Aᵀ for one block of tokens; block 0 saves A.
    """
    bg = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = (offs_d[:, None] < D) & (offs_d[None, :] < D)

    logits = _sum_partials(part_ptr, bg, num_splits, BLOCK_D) * scale
    logits = tl.where(offs_d[None, :] < D, logits, float("-inf"))  # padded columns take no weight
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    attn = p / tl.sum(p, axis=1)[:, None]
    if block == 0:
        tl.store(attn_ptr + bg * D * D + offs_d[:, None] * D + offs_d[None, :], attn, mask=in_d)

    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    in_nd = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    tok = offs_n.to(tl.int64)[:, None]  # int64: a token · sqn passes 2**31 in large views
    q = tl.load(q_ptr + (bg // G) * sqb + (bg % G) * sqg + tok * sqn + offs_d[None, :] * sqd,
                mask=in_nd, other=0.0)
    out = _dot(q, tl.trans(attn), FP32_DOT)
    # the block's first token as an int64 scalar, the rest in int32 (a 64-bit address per element spills on sm_80)
    o_ptr += (bg // G) * sob + (bg % G) * sog + (block * BLOCK_N).to(tl.int64) * son
    tl.store(o_ptr + tl.arange(0, BLOCK_N)[:, None] * son + offs_d[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=in_nd)


@triton.jit
def _bwd_apply_kernel(
    k_ptr, v_ptr, do_ptr, attn_ptr, part_ptr, dq_ptr, dk_ptr, dv_ptr,
    G, N, D, num_splits, scale,
    skb, skg, skn, skd, svb, svg, svn, svd, sdb, sdg, sdn, sdd, sgb, sgg, sgn, sgd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """dq = dout A, dk = v dSᵀ, dv = k dS for one block of tokens, dS = scale · A ⊙ (dA − rowsum(dA ⊙ A)).
    dq, dk, dv share the strides sg*."""
    bg = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    b = bg // G
    g = bg % G
    offs_d = tl.arange(0, BLOCK_D)
    attn = tl.load(attn_ptr + bg * D * D + offs_d[:, None] * D + offs_d[None, :],
                   mask=(offs_d[:, None] < D) & (offs_d[None, :] < D), other=0.0)
    d_attn = _sum_partials(part_ptr, bg, num_splits, BLOCK_D)
    d_state = attn * (d_attn - tl.sum(d_attn * attn, axis=1)[:, None]) * scale  # softmax backward, × scale

    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    in_nd = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    tok = offs_n.to(tl.int64)[:, None]
    dim = offs_d[None, :]
    do = tl.load(do_ptr + b * sdb + g * sdg + tok * sdn + dim * sdd, mask=in_nd, other=0.0)
    v = tl.load(v_ptr + b * svb + g * svg + tok * svn + dim * svd, mask=in_nd, other=0.0)
    k = tl.load(k_ptr + b * skb + g * skg + tok * skn + dim * skd, mask=in_nd, other=0.0)
    grads = b * sgb + g * sgg + tok * sgn + dim * sgd
    tl.store(dq_ptr + grads, _dot(do, attn, FP32_DOT).to(dq_ptr.dtype.element_ty), mask=in_nd)
    tl.store(dk_ptr + grads, _dot(v, tl.trans(d_state), FP32_DOT).to(dk_ptr.dtype.element_ty), mask=in_nd)
    tl.store(dv_ptr + grads, _dot(k, d_state, FP32_DOT).to(dv_ptr.dtype.element_ty), mask=in_nd)


def launch_config(B: int, G: int, N: int, D: int, dtype: torch.dtype, target: Target) -> dict:
    """Tokens per block, splits of the N-reduction and warps for q, k, v [B, G, N, hd] of ``dtype`` on ``target``.

    fp16/bf16 stream 128-token blocks through the tensor cores (mma.sync on sm_80, wgmma on sm_90a); fp32 takes
    64 (its exact products run on the FMA units, where 128 spills the kᵀv reduction on sm_80). The reductions
    fold a block into FOLD runs so that their tiles have the 64 rows wgmma needs (see _outer_sum_kernel). Each
    apply program sums all `splits` partials of its group: the split trades that re-read for reduction
    parallelism. The reduction is
    split until B·G·splits programs fill the target 4 times over (DaViT's few groups per image would otherwise
    leave SMs idle at 800 x 1333). A head dim over 64 doubles the warps. Never depends on the interpreter, so
    the CPU tests run what a GPU runs.
    """
    block_d = max(16, triton.next_power_of_2(D))
    block_n = 64 if dtype == torch.float32 else 128
    if block_d > 64:
        block_n //= 2
    return dict(BLOCK_N=block_n, BLOCK_D=block_d, FOLD=max(1, 64 // block_d),
                splits=max(1, triton.cdiv(4 * target.num_sms, B * G)), num_warps=4 if block_d <= 64 else 8)


class _Launch:
    """Block sizes and the split of the N-reduction for one [B, G, N, hd] problem: :func:`launch_config`,
    ``block_n`` and ``splits`` overriding its choice (tests)."""

    def __init__(self, q: torch.Tensor, block_n: int | None = None, splits: int | None = None):
        B, G, N, D = q.shape
        config = launch_config(B, G, N, D, q.dtype, target_of(q))
        self.BG, self.N, self.D = B * G, N, D
        self.BLOCK_D = config["BLOCK_D"]
        self.BLOCK_N = config["BLOCK_N"] if block_n is None else block_n
        self.n_blocks = triton.cdiv(N, self.BLOCK_N)
        splits = config["splits"] if splits is None else splits
        self.blocks_per_split = triton.cdiv(self.n_blocks, min(splits, self.n_blocks))
        self.splits = triton.cdiv(self.n_blocks, self.blocks_per_split)
        self.fold = config["FOLD"] if self.BLOCK_N >= 16 * config["FOLD"] else 1  # a run: >= 16 tokens (dot's K)
        self.fp32_dot = fp32_dot(q.dtype)
        self.num_warps = config["num_warps"]

    def outer_sum(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B·G, splits, BLOCK_D, BLOCK_D] fp32 partials of xᵀ y."""
        part = torch.empty(self.BG, self.splits, self.BLOCK_D, self.BLOCK_D, device=x.device,
                           dtype=torch.float32)
        _outer_sum_kernel[(self.BG, self.splits)](
            x, y, part, x.shape[1], self.N, self.D, self.blocks_per_split, *x.stride(), *y.stride(),
            BLOCK_N=self.BLOCK_N, BLOCK_D=self.BLOCK_D, FOLD=self.fold, FP32_DOT=self.fp32_dot,
            num_warps=self.num_warps)
        return part


def _forward(q, k, v, scale: float, launch: _Launch):
    part = launch.outer_sum(k, v)
    attn = torch.empty(launch.BG, launch.D, launch.D, device=q.device, dtype=torch.float32)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    _fwd_apply_kernel[(launch.BG, launch.n_blocks)](
        q, part, attn, out, q.shape[1], launch.N, launch.D, launch.splits, scale, *q.stride(), *out.stride(),
        BLOCK_N=launch.BLOCK_N, BLOCK_D=launch.BLOCK_D, FP32_DOT=launch.fp32_dot, num_warps=launch.num_warps)
    return out, attn


def _backward(q, k, v, attn, d_out, scale: float, launch: _Launch):
    part = launch.outer_sum(d_out, q)
    dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    _bwd_apply_kernel[(launch.BG, launch.n_blocks)](
        k, v, d_out, attn, part, dq, dk, dv, q.shape[1], launch.N, launch.D, launch.splits, scale,
        *k.stride(), *v.stride(), *d_out.stride(), *dq.stride(),
        BLOCK_N=launch.BLOCK_N, BLOCK_D=launch.BLOCK_D, FP32_DOT=launch.fp32_dot, num_warps=launch.num_warps)
    return dq, dk, dv
