"""Fused Triton window attention, forward and backward.

Layout of the work. A window of N ≤ 256 tokens fits one tile: its logits S = scale·q kᵀ + bias are computed,
soft-maxed and multiplied by v in registers, never written to memory. N and D are padded up to powers of two
(N_PAD, D_PAD, at least 16) by masked loads, which read no extra memory. Short windows are packed: one program
takes BLOCK_W windows as a [BLOCK_W, N_PAD, D_PAD] block and runs batched `tl.dot`s on it, so a 49-token window
shares its program (and its bias tile) with its neighbours instead of occupying a program of its own.

Windows that share a bias (b ≡ j mod G) go to the same programs: program (i, j, h) handles the windows
b = (i·BLOCK_W + w)·G + j for head h, so the bias tile is loaded once per program.

Forward stores the output and the base-2 log-sum-exp of each row (fp32, [B, H, N]). Backward recomputes P from
q, k and the log-sum-exp, as FlashAttention does, with the standard identities (Dao et al. 2022, Alg. 2):
    dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − rowsum(dO ∘ O)),  dQ = scale·dS K,  dK = scale·dSᵀ Q,  dBias = Σ_b dS.
Each backward program loops over a chunk of windows and sums dS for its bias in registers; the per-chunk
partial sums are added in PyTorch, so the bias gradient is deterministic (no atomics).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._triton import dot, fp32_dot, unsupported_input

MAX_N, MAX_D = 256, 128
# The automatic choice takes the fused kernel up to this window size; larger windows (12×12 = 144 at 384 px)
# are padded to a 256-token tile, where SDPA is the safer default until the kernel tiles keys.
AUTO_MAX_N = 128
LOG2E = 1.4426950408889634


def unsupported(q: torch.Tensor) -> str | None:
    """Why the fused kernel cannot take `q` (None if it can)."""
    reason = unsupported_input(q, "q", MAX_D, "a head dim", "D")
    if reason is None and q.shape[-2] > MAX_N:
        reason = f"supports windows of N <= {MAX_N} tokens, got `q` with N={q.shape[-2]}"
    return reason


def preferred(q: torch.Tensor) -> bool:
    """Whether the automatic backend choice should take the fused kernel for `q`."""
    return unsupported(q) is None and q.shape[-2] <= AUTO_MAX_N


@triton.jit
def _window_logits(
    q, k, bias_ptr, mask_ptr, j, h, b, win_ok, N, Gm, scale_log2,
    s_bias_g, s_bias_h, s_bias_n, s_bias_m, s_mask_g, s_mask_n,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
    FP32: tl.constexpr,
):
    """Base-2 logits log2(e)·(scale·q kᵀ + bias) of BLOCK_W windows, -inf for keys that take no part."""
    s = dot(q, tl.trans(k, 0, 2, 1), FP32) * scale_log2  # [W, N, N]
    rows = tl.arange(0, BLOCK_N)
    key_ok = (rows < N)[None, None, :]
    if HAS_BIAS:
        tile = (rows[:, None] < N) & (rows[None, :] < N)
        bias = tl.load(bias_ptr + j * s_bias_g + h * s_bias_h + rows[:, None] * s_bias_n + rows[None, :] * s_bias_m,
                       mask=tile, other=0.0)
        s += bias.to(tl.float32)[None, :, :] * 1.4426950408889634
    if HAS_MASK:
        keep = tl.load(mask_ptr + (b % Gm)[:, None] * s_mask_g + rows[None, :] * s_mask_n,
                       mask=win_ok[:, None] & (rows < N)[None, :], other=0)
        key_ok = key_ok & (keep != 0)[:, None, :]
    return tl.where(key_ok, s, float("-inf"))


@triton.jit
def _window_fwd_kernel(
    Q, K, V, BIAS, MASK, O, LSE,
    s_q_b, s_q_h, s_q_n, s_q_d,
    s_k_b, s_k_h, s_k_n, s_k_d,
    s_v_b, s_v_h, s_v_n, s_v_d,
    s_o_b, s_o_h, s_o_n, s_o_d,
    s_bias_g, s_bias_h, s_bias_n, s_bias_m,
    s_mask_g, s_mask_n,
    M, G, Gm, H, N, D, scale_log2,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32: tl.constexpr,
):
    i = tl.program_id(0)
    j = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    m = i * BLOCK_W + tl.arange(0, BLOCK_W)
    win_ok = m < M
    b = m.to(tl.int64) * G + j  # the windows of this program, all meeting bias j
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    b3, n3, d3 = b[:, None, None], n[None, :, None], d[None, None, :]
    ok = win_ok[:, None, None] & (n3 < N) & (d3 < D)

    q = tl.load(Q + b3 * s_q_b + h * s_q_h + n3 * s_q_n + d3 * s_q_d, mask=ok, other=0.0)
    k = tl.load(K + b3 * s_k_b + h * s_k_h + n3 * s_k_n + d3 * s_k_d, mask=ok, other=0.0)
    v = tl.load(V + b3 * s_v_b + h * s_v_h + n3 * s_v_n + d3 * s_v_d, mask=ok, other=0.0)
    s = _window_logits(q, k, BIAS, MASK, j, h, b, win_ok, N, Gm, scale_log2,
                       s_bias_g, s_bias_h, s_bias_n, s_bias_m, s_mask_g, s_mask_n,
                       HAS_BIAS, HAS_MASK, BLOCK_N, FP32)

    row_max = tl.max(s, 2)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # a row with no key left
    p = tl.exp2(s - row_max[:, :, None])
    l = tl.sum(p, 2)
    has_key = l > 0.0
    o = dot(p.to(v.dtype), v, FP32) * (1.0 / tl.where(has_key, l, 1.0))[:, :, None]
    tl.store(O + b3 * s_o_b + h * s_o_h + n3 * s_o_n + d3 * s_o_d, o.to(O.dtype.element_ty), mask=ok)
    # +inf for a row with no key: backward's P = exp2(S - lse) is then 0 everywhere in it
    lse = tl.where(has_key, row_max + tl.log2(tl.where(has_key, l, 1.0)), float("inf"))
    tl.store(LSE + (b[:, None] * H + h) * N + n[None, :], lse, mask=win_ok[:, None] & (n[None, :] < N))


@triton.jit
def _window_bwd_kernel(
    Q, K, V, BIAS, MASK, O, DO, LSE, DQ, DK, DV, DBIAS,
    s_q_b, s_q_h, s_q_n, s_q_d,
    s_k_b, s_k_h, s_k_n, s_k_d,
    s_v_b, s_v_h, s_v_n, s_v_d,
    s_o_b, s_o_h, s_o_n, s_o_d,
    s_do_b, s_do_h, s_do_n, s_do_d,
    s_bias_g, s_bias_h, s_bias_n, s_bias_m,
    s_mask_g, s_mask_n,
    M, G, Gm, H, N, D, scale, scale_log2, windows_per_program,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BIAS_GRAD: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32: tl.constexpr,
):
    i = tl.program_id(0)
    j = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    n3, d3 = n[None, :, None], d[None, None, :]
    dbias = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)

    first = i * windows_per_program
    last = tl.minimum(first + windows_per_program, M)
    for m0 in range(first, last, BLOCK_W):
        m = m0 + tl.arange(0, BLOCK_W)
        win_ok = m < last
        b = m.to(tl.int64) * G + j
        b3 = b[:, None, None]
        ok = win_ok[:, None, None] & (n3 < N) & (d3 < D)
        row_ok = win_ok[:, None] & (n[None, :] < N)

        q = tl.load(Q + b3 * s_q_b + h * s_q_h + n3 * s_q_n + d3 * s_q_d, mask=ok, other=0.0)
        k = tl.load(K + b3 * s_k_b + h * s_k_h + n3 * s_k_n + d3 * s_k_d, mask=ok, other=0.0)
        v = tl.load(V + b3 * s_v_b + h * s_v_h + n3 * s_v_n + d3 * s_v_d, mask=ok, other=0.0)
        o = tl.load(O + b3 * s_o_b + h * s_o_h + n3 * s_o_n + d3 * s_o_d, mask=ok, other=0.0)
        do = tl.load(DO + b3 * s_do_b + h * s_do_h + n3 * s_do_n + d3 * s_do_d, mask=ok, other=0.0)
        lse = tl.load(LSE + (b[:, None] * H + h) * N + n[None, :], mask=row_ok, other=float("inf"))

        s = _window_logits(q, k, BIAS, MASK, j, h, b, win_ok, N, Gm, scale_log2,
                           s_bias_g, s_bias_h, s_bias_n, s_bias_m, s_mask_g, s_mask_n,
                           HAS_BIAS, HAS_MASK, BLOCK_N, FP32)
        p = tl.exp2(s - lse[:, :, None])  # [W, N, N], exactly forward's softmax
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 2)  # rowsum(dO ∘ O)
        dv = dot(tl.trans(p, 0, 2, 1).to(do.dtype), do, FP32)
        dp = dot(do, tl.trans(v, 0, 2, 1), FP32)
        ds = p * (dp - delta[:, :, None])  # gradient of the natural-log logits
        dq = dot(ds.to(k.dtype), k, FP32) * scale
        dk = dot(tl.trans(ds, 0, 2, 1).to(q.dtype), q, FP32) * scale

        # dq, dk, dv are contiguous [B, H, N, D]
        offs = ((b3 * H + h) * N + n3) * D + d3
        tl.store(DQ + offs, dq.to(DQ.dtype.element_ty), mask=ok)
        tl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=ok)
        tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=ok)
        if BIAS_GRAD:
            dbias += tl.sum(ds, 0)

    if BIAS_GRAD:
        # this program's partial sum, [num_programs_0, G, H, N, N]
        base = ((i * G + j) * H + h) * N * N
        tile = (n[:, None] < N) & (n[None, :] < N)
        tl.store(DBIAS + base + n[:, None] * N + n[None, :], dbias, mask=tile)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_config(q: torch.Tensor) -> dict:
    N, D = q.shape[-2:]
    block_n = max(16, triton.next_power_of_2(N))
    return dict(
        BLOCK_W=max(1, 128 // block_n),  # ~128 query rows per program
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        FP32=fp32_dot(q.dtype),
    )


def _bias_mask_args(bias, mask):
    if bias is None:
        bias_args = (None, 0, 0, 0, 0)
    else:
        bias_args = (bias, bias.stride(0), bias.stride(1) if bias.shape[1] > 1 else 0, bias.stride(2), bias.stride(3))
    if mask is None:
        mask_args, Gm = (None, 0, 0), 1
    else:
        mask = mask.to(torch.int8)
        mask_args, Gm = (mask, mask.stride(0), mask.stride(1)), mask.shape[0]
    return bias_args, mask_args, Gm


def _groups(bias) -> int:
    return 1 if bias is None else bias.shape[0]


def _forward(q, k, v, bias, mask, scale):
    B, H, N, D = q.shape
    G = _groups(bias)
    M = B // G
    cfg = _launch_config(q)
    o = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    (bias_t, *s_bias), (mask_t, *s_mask), Gm = _bias_mask_args(bias, mask)
    grid = (triton.cdiv(M, cfg["BLOCK_W"]), G, H)
    _window_fwd_kernel[grid](
        q, k, v, bias_t, mask_t, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *s_bias, *s_mask,
        M, G, Gm, H, N, D, scale * LOG2E,
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
        num_warps=8 if cfg["BLOCK_N"] >= 128 else 4, **cfg,
    )
    return o, lse


def _backward(do, q, k, v, bias, mask, o, lse, scale, bias_grad):
    B, H, N, D = q.shape
    G = _groups(bias)
    M = B // G
    cfg = _launch_config(q)
    dq, dk, dv = (torch.empty((B, H, N, D), dtype=q.dtype, device=q.device) for _ in range(3))
    blocks = triton.cdiv(M, cfg["BLOCK_W"])
    if bias_grad:
        # enough programs to fill the GPU, few enough that the partial bias sums stay small
        target = 4 * _num_sms(q.device.index or 0) if q.is_cuda else 1
        programs = max(1, min(blocks, triton.cdiv(target, G * H)))
    else:
        programs = blocks
    windows_per_program = triton.cdiv(blocks, programs) * cfg["BLOCK_W"]
    programs = triton.cdiv(M, windows_per_program)
    dbias = torch.empty((programs, G, H, N, N), dtype=torch.float32, device=q.device) if bias_grad else None
    (bias_t, *s_bias), (mask_t, *s_mask), Gm = _bias_mask_args(bias, mask)
    _window_bwd_kernel[(programs, G, H)](
        q, k, v, bias_t, mask_t, o, do, lse, dq, dk, dv, dbias,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *s_bias, *s_mask,
        M, G, Gm, H, N, D, scale, scale * LOG2E, windows_per_program,
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None, BIAS_GRAD=bias_grad,
        num_warps=8 if cfg["BLOCK_N"] >= 128 else 4, **cfg,
    )
    if bias_grad:
        dbias = dbias.sum(0)
        if bias.shape[1] == 1:  # one bias shared by all heads
            dbias = dbias.sum(1, keepdim=True)
        dbias = dbias.to(bias.dtype)
    return dq, dk, dv, dbias
