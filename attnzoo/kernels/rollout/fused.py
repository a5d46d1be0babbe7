"""Fused Triton rollout step: out = Pᵀr per head, P = softmax(scale · q kᵀ), never materialising P.

Two passes, as FlashAttention's backward (Dao et al. 2022, Alg. 2) has the forward's log-sum-exp at hand:

1. ``_lse_kernel``: a program takes BLOCK_M query rows of one (image, head), streams over the keys with the
   online max/sum and stores each row's natural log-sum-exp, lse_i = log Σ_j exp(s_ij), in fp32.
2. ``_rollout_kernel``: a program owns BLOCK_N keys, streams over the query blocks, recomputes
   P_ij = exp(s_ij − lse_i) and accumulates Σ_i r_i P_ij in fp32: the dV = Pᵀ dO reduction with a one-column
   dO = r. Each key block is written by one program: no atomics, deterministic.

Memory is O(N) per (image, head) beyond the inputs; the work is two q kᵀ products, the cost of one attention
forward without the P V product.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import Target, dot, fp32_dot, target_of, unsupported_input

MAX_D = 128


def unsupported(q: torch.Tensor) -> str | None:
    """Why the fused kernels cannot take ``q`` (a phrase for an error message), or None when they can."""
    return unsupported_input(q, "q", MAX_D, "a head dim", "D")


@triton.jit
def _logits(q, k_ptr, offs_n, offs_d, N, D, skn, skd, scale, FP32: tl.constexpr):
    """scale · q kᵀ for one key block [BLOCK_M, BLOCK_N] in fp32, -inf past the N keys."""
    k = tl.load(k_ptr + offs_n.to(tl.int64)[:, None] * skn + offs_d[None, :] * skd,
                mask=(offs_n < N)[:, None] & (offs_d < D)[None, :], other=0.0)
    s = dot(q, tl.trans(k), FP32) * scale
    return tl.where((offs_n < N)[None, :], s, float("-inf"))


@triton.jit
def _load_q(q_ptr, offs_m, offs_d, N, D, sqm, sqd):
    return tl.load(q_ptr + offs_m.to(tl.int64)[:, None] * sqm + offs_d[None, :] * sqd,
                   mask=(offs_m < N)[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr, lse_ptr, H, N, D, scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)  # int64: offs_m · sqm passes 2**31 in large views
    bh = tl.program_id(1).to(tl.int64)  # int64: bh * N and b * sqb pass 2**31 on large batches
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_q(q_ptr + b * sqb + h * sqh, offs_m, offs_d, N, D, sqm, sqd)
    k_ptr += b * skb + h * skh
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        s = _logits(q, k_ptr, start + tl.arange(0, BLOCK_N), offs_d, N, D, skn, skd, scale, FP32)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block holds at least one real key
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + bh * N + offs_m, m_i + tl.log(l_i), mask=offs_m < N)


@triton.jit
def _rollout_kernel(
    q_ptr, k_ptr, r_ptr, lse_ptr, out_ptr, H, N, D, scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, srb, srh, srn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptr += b * sqb + h * sqh
    k_ptr += b * skb + h * skh
    r_ptr += b * srb + h * srh
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q = _load_q(q_ptr, offs_m, offs_d, N, D, sqm, sqd)
        s = _logits(q, k_ptr, offs_n, offs_d, N, D, skn, skd, scale, FP32)
        # rows past N: lse = +inf makes their P row 0 (and r is 0 there too)
        lse = tl.load(lse_ptr + bh * N + offs_m, mask=offs_m < N, other=float("inf"))
        r = tl.load(r_ptr + offs_m.to(tl.int64) * srn, mask=offs_m < N, other=0.0).to(tl.float32)
        p = tl.exp(s - lse[:, None])
        acc += tl.sum(r[:, None] * p, axis=0)
    tl.store(out_ptr + bh * N + offs_n, acc, mask=offs_n < N)


def launch_config(N: int, D: int, dtype: torch.dtype, target: Target) -> dict:
    """Block sizes and warps of both passes for q, k [B, H, N, D] of ``dtype`` on ``target``.

    fp16/bf16 multiply 64 x 64 tiles on the tensor cores (mma.sync on sm_80, wgmma on sm_90a). fp32 gets 32 x 32:
    its exact products run on the FMA units, where a thread holds a larger share of each tile (64 x 64 spills).
    A head dim over 64 halves the key block. The tiles depend on the dtype only, never on the interpreter (whose
    bf16 runs the exact fp32 dot, FP32=True, on bf16's tiles). The same on both targets (the ahead-of-time
    compile for sm_80 and sm_90a finds no spill); ``target`` is part of the rule for a target-specific choice.
    """
    del N, target
    block_d = max(16, triton.next_power_of_2(D))
    block = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_M=block, BLOCK_N=block if block_d <= 64 else block // 2, BLOCK_D=block_d,
                FP32=fp32_dot(dtype), num_warps=4)


def _forward(q: torch.Tensor, k: torch.Tensor, r: torch.Tensor, scale: float) -> torch.Tensor:
    """The two passes (arguments validated by :func:`attnzoo.kernels.rollout_step`; r is [B, H, N])."""
    B, H, N, D = q.shape
    blocks = launch_config(N, D, q.dtype, target_of(q))
    lse = torch.empty(B * H, N, device=q.device, dtype=torch.float32)
    _lse_kernel[(triton.cdiv(N, blocks["BLOCK_M"]), B * H)](
        q, k, lse, H, N, D, scale, *q.stride(), *k.stride(), **blocks)
    out = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    _rollout_kernel[(triton.cdiv(N, blocks["BLOCK_N"]), B * H)](
        q, k, r, lse, out, H, N, D, scale, *q.stride(), *k.stride(), *r.stride(), **blocks)
    return out


def rollout_step_fused(q: torch.Tensor, k: torch.Tensor, r: torch.Tensor, scale: float) -> torch.Tensor:
    """The fused rollout step (arguments validated by :func:`attnzoo.kernels.rollout_step`; r is [B, H, N])."""
    return _forward(q, k, r, scale)
