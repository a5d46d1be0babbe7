"""Fused Triton sparse attention, forward and backward: each query reads only its K kept keys.

Layout of the work. A program takes BLOCK_M queries of one (image, head). Their key indices arrive as a
[BLOCK_M, BLOCK_K] tile per step; the kernel gathers the rows k[index] and v[index] as [BLOCK_M, BLOCK_K, D]
blocks straight from memory (no dense key tile, no dense logits), so reads and FLOPs scale with K, not N.
Every query has its own keys, so the products are broadcast multiply-and-sum rather than `tl.dot`; the
softmax runs online over the K-steps in fp32, as in FlashAttention.

Forward stores the output and the natural log-sum-exp of each row (fp32, [B·H, M]). Backward recomputes
P = exp(S − lse) from the gathered keys (Dao et al. 2022, Alg. 2, restricted to the kept pairs):
    dP = dO · v[index]ᵀ,  dS = P ∘ (dP − rowsum(dO ∘ O)),  dQ = scale · dS k[index],
    dK[index] += scale · dS q,  dV[index] += P dO.
A key kept by several queries of several programs receives their contributions by fp32 atomic adds (into
fp32 buffers, cast to the input dtype at the end), so dK and dV are not bitwise deterministic on the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import unsupported_input
from ..dispatch import interpreting

MAX_D = 128


def unsupported(q: torch.Tensor) -> str | None:
    """Why the fused kernels cannot take ``q`` (a phrase for an error message), or None when they can."""
    return unsupported_input(q, "q", MAX_D, "a head dim", "D")


@triton.jit
def _gather_logits(q, k_ptr, idx_ptr, offs_m, offs_k, offs_d, M, K, D, skn, skd, sim, sik):
    """The kept keys' indices [BLOCK_M, BLOCK_K], the rows k[index] [BLOCK_M, BLOCK_K, BLOCK_D] and the logits
    q·k[index] (q pre-scaled, fp32), -inf where the step runs past K."""
    kept = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    idx = tl.load(idx_ptr + offs_m[:, None] * sim + offs_k[None, :] * sik, mask=kept, other=0)
    rows = kept[:, :, None] & (offs_d < D)[None, None, :]
    key_off = idx[:, :, None] * skn + offs_d[None, None, :] * skd
    kg = tl.load(k_ptr + key_off, mask=rows, other=0.0).to(tl.float32)
    s = tl.sum(q[:, None, :] * kg, axis=2)
    return idx, kept, rows, kg, tl.where(kept, s, float("-inf"))


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, lse_ptr,
    H, M, K, D, scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sib, sih, sim, sik, sob, soh, som, sod,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_md = (offs_m < M)[:, None] & (offs_d < D)[None, :]
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=in_md, other=0.0)
    q = q.to(tl.float32) * scale
    k_ptr += b * skb + h * skh
    v_ptr += b * svb + h * svh
    idx_ptr += b * sib + h * sih

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        idx, kept, rows, kg, s = _gather_logits(q, k_ptr, idx_ptr, offs_m, offs_k, offs_d, M, K, D, skn, skd,
                                                sim, sik)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past M see no key
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        vg = tl.load(v_ptr + idx[:, :, None] * svn + offs_d[None, None, :] * svd, mask=rows, other=0.0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vg.to(tl.float32), axis=1)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=in_md)
    tl.store(lse_ptr + bh * M + offs_m, m_i + tl.log(l_i), mask=offs_m < M)


@triton.jit
def _bwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
    H, M, N, K, D, scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sib, sih, sim, sik, sdb, sdh, sdm, sdd,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq for BLOCK_M queries (stored; shares q's shape, contiguous), dk and dv scattered by atomic adds into
    contiguous fp32 [B·H, N, D] buffers."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_md = (offs_m < M)[:, None] & (offs_d < D)[None, :]
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=in_md, other=0.0)
    q = q.to(tl.float32) * scale
    do = tl.load(do_ptr + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=in_md,
                 other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + bh * M + offs_m, mask=offs_m < M, other=0.0)
    delta = tl.load(delta_ptr + bh * M + offs_m, mask=offs_m < M, other=0.0)
    k_ptr += b * skb + h * skh
    v_ptr += b * svb + h * svh
    idx_ptr += b * sib + h * sih
    dk_ptr += bh * N * D
    dv_ptr += bh * N * D

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        idx, kept, rows, kg, s = _gather_logits(q, k_ptr, idx_ptr, offs_m, offs_k, offs_d, M, K, D, skn, skd,
                                                sim, sik)
        p = tl.where(kept, tl.exp(s - lse[:, None]), 0.0)
        vg = tl.load(v_ptr + idx[:, :, None] * svn + offs_d[None, None, :] * svd, mask=rows, other=0.0)
        dp = tl.sum(do[:, None, :] * vg.to(tl.float32), axis=2)
        ds = p * (dp - delta[:, None])
        dq += tl.sum(ds[:, :, None] * kg, axis=1)
        grad_off = idx[:, :, None] * D + offs_d[None, None, :]
        tl.atomic_add(dk_ptr + grad_off, ds[:, :, None] * q[:, None, :], mask=rows)  # q is scaled already
        tl.atomic_add(dv_ptr + grad_off, p[:, :, None] * do[:, None, :], mask=rows)
    tl.store(dq_ptr + bh * M * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=in_md)


class _Launch:
    def __init__(self, q: torch.Tensor, index: torch.Tensor):
        B, H, M, D = q.shape
        K = index.shape[-1]
        self.grid_bh, self.M, self.K, self.D = B * H, M, K, D
        self.BLOCK_D = max(16, triton.next_power_of_2(D))
        if interpreting():  # the interpreter's cost grows with the program and step counts: few, large blocks
            self.BLOCK_M = min(64, max(16, triton.next_power_of_2(M)))
            self.BLOCK_K = min(64, max(16, triton.next_power_of_2(K)))
        else:  # the gathered [BLOCK_M, BLOCK_K, BLOCK_D] blocks live in registers
            self.BLOCK_M, self.BLOCK_K = 16, 16 if self.BLOCK_D <= 64 else 8
        self.grid = (triton.cdiv(M, self.BLOCK_M), B * H)
        self.num_warps = 4

    def blocks(self) -> dict:
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_K=self.BLOCK_K, BLOCK_D=self.BLOCK_D, num_warps=self.num_warps)


def _forward(q, k, v, index, scale: float, launch: _Launch):
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(launch.grid_bh, launch.M, device=q.device, dtype=torch.float32)
    _fwd_kernel[launch.grid](
        q, k, v, index, out, lse, q.shape[1], launch.M, launch.K, launch.D, scale,
        *q.stride(), *k.stride(), *v.stride(), *index.stride(), *out.stride(), **launch.blocks())
    return out, lse


def _backward(q, k, v, index, out, lse, d_out, scale: float, launch: _Launch):
    delta = (d_out.float() * out.float()).sum(-1).reshape(launch.grid_bh, launch.M)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    _bwd_kernel[launch.grid](
        q, k, v, index, d_out, lse, delta, dq, dk, dv, q.shape[1], launch.M, k.shape[2], launch.K, launch.D, scale,
        *q.stride(), *k.stride(), *v.stride(), *index.stride(), *d_out.stride(), **launch.blocks())
    return dq, dk.to(k.dtype), dv.to(v.dtype)
