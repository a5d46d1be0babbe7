"""Fused Triton window attention, forward and backward.

Layout of the work (FlashAttention-2's, per window). A program takes one window b and one head h: its queries
in blocks of BLOCK_M rows (one block per program), its keys in a loop over blocks of BLOCK_N, each step a 2-D
[BLOCK_M, BLOCK_N] logits tile S = scale·q kᵀ + bias whose rows the warps split, so both `tl.dot`s of the
step run on tensor cores (`mma` on sm_80, `wgmma` on sm_90a). An online softmax (running row max and sum)
carries the output across key blocks, so a window of any N costs ⌈N/BLOCK_N⌉ steps: 144 tokens are 3 blocks
of 64 with a masked tail, not a 256-wide tile. N and D are padded to the blocks by masked loads, which read no
extra memory. Window b meets bias b mod G and key mask b mod Gm.

Forward stores the output and the base-2 log-sum-exp of each row (fp32, [B, H, N], +inf for a row with no
key). Backward recomputes P = exp2(S·log2 e − lse) tile by tile, as FlashAttention does, with the identities
(Dao et al. 2022, Alg. 2; Dao 2023, Alg. 2):
    dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − delta),  dQ = scale·dS K,  dK = scale·dSᵀ Q,  dBias = Σ_b dS,
with delta = rowsum(dO ∘ O) computed first by its own small kernel. The dK/dV kernel gives a program one
key block of one (window, head) and loops over the query blocks; when every key fits one block it also
writes dQ (each query row then meets exactly one program), otherwise a dQ kernel loops over the key blocks
of one query block. With a bias gradient the dK/dV programs take a chunk of windows of one bias slice each
and add their dS tiles into a partial sum [chunks, G, H, N, N] (fp32) that no other program touches —
carried in registers when the queries are one block, else added tile by tile with atomics — and PyTorch sums
the chunks, so the bias gradient is deterministic.

Launch configuration: :func:`_launch_config`, one function of (N, D, dtype, target).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import LOG2E, Target, dot, fp32_dot, load_rows, target_of, unsupported_input

MAX_D = 128
# The automatic choice takes the fused kernel up to this window size (MaxViT's 12×12 = 144 at 384 px
# included); longer sequences are SDPA's (FlashAttention's) ground.
AUTO_MAX_N = 256
_LOG2E = tl.constexpr(LOG2E)


def unsupported(q: torch.Tensor) -> str | None:
    """Why the fused kernel cannot take `q` (None if it can): any N (the keys are looped), D <= MAX_D."""
    return unsupported_input(q, "q", MAX_D, "a head dim", "D")


def preferred(q: torch.Tensor) -> bool:
    """Whether the automatic backend choice should take the fused kernel for `q`."""
    return unsupported(q) is None and q.shape[-2] <= AUTO_MAX_N


def _launch_config(N: int, D: int, dtype: torch.dtype, target: Target) -> dict:
    """Block sizes and warps of every window kernel, for windows of N tokens of head dim D.

    The rule: D is padded to a power of two (at least 16, the tensor-core k). Query and key blocks are square,
    the window's power of two up to 64 for 16-bit inputs (a 49-token window is one 64×64 tile, 144 tokens
    are 3×3 tiles) and up to 32 for fp32 inputs, whose exact products run on FMA units and hold their operands
    in registers. 4 warps split the query rows (a 64-row tile is then one warpgroup, the unit of sm_90a's
    `wgmma`), 8 for fp32. No software pipelining (num_stages=1): a window's key loop is a few steps (1 for 49
    tokens, 3 for 144), too short to hide a load behind, and the prefetched tiles cost registers (ptxas spills
    with 2 stages). The same on sm_80 and sm_90a; the target enters through the bias gradient's program count.
    """
    del target  # one tiling for both targets; see _bias_grad_chunks
    cap = 32 if dtype == torch.float32 else 64
    block = min(cap, max(16, triton.next_power_of_2(N)))
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, triton.next_power_of_2(D)),
                num_warps=8 if dtype == torch.float32 else 4, num_stages=1)


def _bias_grad_chunks(M: int, G: int, H: int, key_blocks: int, target: Target) -> int:
    """Windows per dK/dV program under a bias gradient: as many as leave ~4 programs per SM, so the partial
    bias sums (one [N, N] slice per program) stay few."""
    programs = max(1, min(M, triton.cdiv(4 * target.num_sms, G * H * key_blocks)))
    return triton.cdiv(M, programs)


@triton.jit
def _slice(ptr, offset, PRESENT: tl.constexpr):
    """ptr + offset for an optional tensor (None when absent)."""
    if PRESENT:
        return ptr + offset
    return ptr


@triton.jit
def _key_ok(mask_base, cols, N, s_mask_n, HAS_MASK: tl.constexpr):
    """Which keys of a block take part: inside the window and, with a mask, kept by it."""
    ok = cols < N
    if HAS_MASK:
        ok = ok & (tl.load(mask_base + cols.to(tl.int64) * s_mask_n, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _logits(q, k, bias_base, key_ok, rows, cols, N, scale_log2, s_bias_n, s_bias_m,
            HAS_BIAS: tl.constexpr, FP32: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] tile of base-2 logits log2(e)·(scale·q kᵀ + bias), -inf for keys that take no part."""
    if HAS_BIAS:
        # clamped rather than masked: no predicate per element; what is read past N is never used
        r = tl.minimum(rows, N - 1).to(tl.int64)
        c = tl.minimum(cols, N - 1).to(tl.int64)
        bias = tl.load(bias_base + r[:, None] * s_bias_n + c[None, :] * s_bias_m)
        # the bias enters as the dot's accumulator (bias/scale, then all times scale·log2 e), which keeps the
        # softmax in the dot's register layout instead of the load's
        s = dot(q, tl.trans(k), FP32, bias.to(tl.float32) * (_LOG2E / scale_log2)) * scale_log2
    else:
        s = dot(q, tl.trans(k), FP32) * scale_log2
    return tl.where(key_ok[None, :], s, float("-inf"))


@triton.jit
def _fwd_kernel(
    Q, K, V, BIAS, MASK, O, LSE,
    s_q_b, s_q_h, s_q_n, s_q_d,
    s_k_b, s_k_h, s_k_n, s_k_d,
    s_v_b, s_v_h, s_v_n, s_v_d,
    s_o_b, s_o_h, s_o_n, s_o_d,
    s_bias_g, s_bias_h, s_bias_n, s_bias_m,
    s_mask_g, s_mask_n,
    G, Gm, H, N, D, scale_log2,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr,
):
    bh = tl.program_id(0)  # window b, head h; divided in int32 (B·H < 2³¹), widened before meeting a stride
    b32 = bh // H
    b, h = b32.to(tl.int64), (bh % H).to(tl.int64)
    bh = bh.to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q = load_rows(Q + b * s_q_b + h * s_q_h, rows, d, N, D, s_q_n, s_q_d)
    k_base = K + b * s_k_b + h * s_k_h
    v_base = V + b * s_v_b + h * s_v_h
    bias_base = _slice(BIAS, (b32 % G).to(tl.int64) * s_bias_g + h * s_bias_h, HAS_BIAS)
    mask_base = _slice(MASK, (b32 % Gm).to(tl.int64) * s_mask_g, HAS_MASK)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running row max (base 2)
    l_i = tl.zeros((BLOCK_M,), tl.float32)                  # running row sum of exp2(s - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in tl.range(0, N, BLOCK_N, disable_licm=True):
        cols = start + tl.arange(0, BLOCK_N)
        k = load_rows(k_base, cols, d, N, D, s_k_n, s_k_d)
        v = load_rows(v_base, cols, d, N, D, s_v_n, s_v_d)
        key_ok = _key_ok(mask_base, cols, N, s_mask_n, HAS_MASK)
        s = _logits(q, k, bias_base, key_ok, rows, cols, N, scale_log2, s_bias_n, s_bias_m, HAS_BIAS, FP32)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet in the row: keep exp2 finite
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, FP32)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o = acc / l_safe[:, None]
    ok = (rows < N)[:, None] & (d < D)[None, :]
    o_base = O + b * s_o_b + h * s_o_h
    tl.store(o_base + rows[:, None] * s_o_n + d[None, :] * s_o_d, o.to(O.dtype.element_ty), mask=ok)
    # +inf for a row with no key: backward's P = exp2(S - lse) is then 0 everywhere in it
    lse = tl.where(has_key, m_i + tl.log2(l_safe), float("inf"))
    tl.store(LSE + bh * N + rows, lse, mask=rows < N)


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA,
    s_o_b, s_o_h, s_o_n, s_o_d,
    s_do_b, s_do_h, s_do_n, s_do_d,
    H, N, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO ∘ O), fp32 [B, H, N]."""
    bh = tl.program_id(0)
    b32 = bh // H
    b, h = b32.to(tl.int64), (bh % H).to(tl.int64)
    bh = bh.to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    o = load_rows(O + b * s_o_b + h * s_o_h, rows, d, N, D, s_o_n, s_o_d)
    do = load_rows(DO + b * s_do_b + h * s_do_h, rows, d, N, D, s_do_n, s_do_d)
    tl.store(DELTA + bh * N + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < N)


@triton.jit
def _bwd_kv_kernel(
    Q, K, V, BIAS, MASK, DO, LSE, DELTA, DQ, DK, DV, DBIAS,
    s_q_b, s_q_h, s_q_n, s_q_d,
    s_k_b, s_k_h, s_k_n, s_k_d,
    s_v_b, s_v_h, s_v_n, s_v_d,
    s_do_b, s_do_h, s_do_n, s_do_d,
    s_bias_g, s_bias_h, s_bias_n, s_bias_m,
    s_mask_g, s_mask_n,
    M, G, Gm, H, N, D, scale, scale_log2, windows_per_program,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BIAS_GRAD: tl.constexpr, WRITE_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr,
):
    """dK and dV of one key block for the windows b = m·G + j, m in this program's chunk, head h; dQ too when
    WRITE_DQ (all keys in this one block); this chunk's Σ dS into its own slice of DBIAS when BIAS_GRAD."""
    pid = tl.program_id(0)  # divided in int32, widened before meeting a stride
    h = (pid % H).to(tl.int64)
    j = (pid // H) % G  # the bias slice of every window of this program
    chunk = pid // H // G
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    kv_ok = (cols < N)[:, None] & (d < D)[None, :]
    bias_base = _slice(BIAS, j.to(tl.int64) * s_bias_g + h * s_bias_h, HAS_BIAS)
    ONE_Q_BLOCK: tl.constexpr = WRITE_DQ and BLOCK_M == BLOCK_N  # then N <= BLOCK_M: one query block
    dbias_acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)  # Σ dS over the chunk, when ONE_Q_BLOCK
    dbias_base = _slice(DBIAS, ((chunk.to(tl.int64) * G + j) * H + h) * N * N, BIAS_GRAD)

    first = chunk * windows_per_program
    for m in range(first, tl.minimum(first + windows_per_program, M)):
        b32 = m * G + j
        b = b32.to(tl.int64)
        bh = b * H + h
        k = load_rows(K + b * s_k_b + h * s_k_h, cols, d, N, D, s_k_n, s_k_d)
        v = load_rows(V + b * s_v_b + h * s_v_h, cols, d, N, D, s_v_n, s_v_d)
        key_ok = _key_ok(_slice(MASK, (b32 % Gm).to(tl.int64) * s_mask_g, HAS_MASK), cols, N, s_mask_n, HAS_MASK)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for start in tl.range(0, N, BLOCK_M, disable_licm=True):
            rows = start + tl.arange(0, BLOCK_M)
            q = load_rows(Q + b * s_q_b + h * s_q_h, rows, d, N, D, s_q_n, s_q_d)
            do = load_rows(DO + b * s_do_b + h * s_do_h, rows, d, N, D, s_do_n, s_do_d)
            lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=float("inf"))
            delta = tl.load(DELTA + bh * N + rows, mask=rows < N, other=0.0)
            s = _logits(q, k, bias_base, key_ok, rows, cols, N, scale_log2, s_bias_n, s_bias_m, HAS_BIAS, FP32)
            p = tl.exp2(s - lse[:, None])  # exactly forward's softmax; 0 in rows with no key or past N
            dv += dot(tl.trans(p).to(do.dtype), do, FP32)
            dp = dot(do, tl.trans(v), FP32)
            ds = p * (dp - delta[:, None])  # gradient of the natural-log logits
            dk += dot(tl.trans(ds).to(q.dtype), q, FP32)
            if WRITE_DQ:
                dq = dot(ds.to(k.dtype), k, FP32) * scale
                q_ok = (rows < N)[:, None] & (d < D)[None, :]
                tl.store(DQ + (bh * N + rows[:, None]) * D + d[None, :], dq.to(DQ.dtype.element_ty), mask=q_ok)
            if BIAS_GRAD:
                if ONE_Q_BLOCK:
                    dbias_acc += ds
                else:
                    tile = (rows < N)[:, None] & (cols < N)[None, :]
                    tl.atomic_add(dbias_base + rows[:, None] * N + cols[None, :], ds, mask=tile)
        # dq, dk, dv are contiguous [B, H, N, D]
        offs = (bh * N + cols[:, None]) * D + d[None, :]
        tl.store(DK + offs, (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
        tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=kv_ok)

    if BIAS_GRAD and ONE_Q_BLOCK:
        rows = tl.arange(0, BLOCK_M)
        tile = (rows < N)[:, None] & (cols < N)[None, :]
        tl.store(dbias_base + rows[:, None] * N + cols[None, :], dbias_acc, mask=tile)


@triton.jit
def _bwd_q_kernel(
    Q, K, V, BIAS, MASK, DO, LSE, DELTA, DQ,
    s_q_b, s_q_h, s_q_n, s_q_d,
    s_k_b, s_k_h, s_k_n, s_k_d,
    s_v_b, s_v_h, s_v_n, s_v_d,
    s_do_b, s_do_h, s_do_n, s_do_d,
    s_bias_g, s_bias_h, s_bias_n, s_bias_m,
    s_mask_g, s_mask_n,
    G, Gm, H, N, D, scale, scale_log2,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr,
):
    """dQ of one query block of one (window, head), looping over its key blocks (windows of N > BLOCK_N)."""
    bh = tl.program_id(0)
    b32 = bh // H
    b, h = b32.to(tl.int64), (bh % H).to(tl.int64)
    bh = bh.to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q = load_rows(Q + b * s_q_b + h * s_q_h, rows, d, N, D, s_q_n, s_q_d)
    do = load_rows(DO + b * s_do_b + h * s_do_h, rows, d, N, D, s_do_n, s_do_d)
    lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=float("inf"))
    delta = tl.load(DELTA + bh * N + rows, mask=rows < N, other=0.0)
    k_base = K + b * s_k_b + h * s_k_h
    v_base = V + b * s_v_b + h * s_v_h
    bias_base = _slice(BIAS, (b32 % G).to(tl.int64) * s_bias_g + h * s_bias_h, HAS_BIAS)
    mask_base = _slice(MASK, (b32 % Gm).to(tl.int64) * s_mask_g, HAS_MASK)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in tl.range(0, N, BLOCK_N, disable_licm=True):
        cols = start + tl.arange(0, BLOCK_N)
        k = load_rows(k_base, cols, d, N, D, s_k_n, s_k_d)
        v = load_rows(v_base, cols, d, N, D, s_v_n, s_v_d)
        key_ok = _key_ok(mask_base, cols, N, s_mask_n, HAS_MASK)
        s = _logits(q, k, bias_base, key_ok, rows, cols, N, scale_log2, s_bias_n, s_bias_m, HAS_BIAS, FP32)
        p = tl.exp2(s - lse[:, None])
        ds = p * (dot(do, tl.trans(v), FP32) - delta[:, None])
        dq += dot(ds.to(k.dtype), k, FP32)
    ok = (rows < N)[:, None] & (d < D)[None, :]
    tl.store(DQ + (bh * N + rows[:, None]) * D + d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=ok)


def _bias_mask_args(bias, mask):
    """(bias or None, its 4 strides), (int8 mask or None, its 2 strides), G, Gm; head stride 0 for a bias
    shared by all heads."""
    if bias is None:
        bias_args, G = (None, 0, 0, 0, 0), 1
    else:
        bias_args = (bias, bias.stride(0), bias.stride(1) if bias.shape[1] > 1 else 0, bias.stride(2), bias.stride(3))
        G = bias.shape[0]
    if mask is None:
        mask_args, Gm = (None, 0, 0), 1
    else:
        mask = mask.to(torch.int8)
        mask_args, Gm = (mask, mask.stride(0), mask.stride(1)), mask.shape[0]
    return bias_args, mask_args, G, Gm


def _forward(q, k, v, bias, mask, scale):
    B, H, N, D = q.shape
    cfg = _launch_config(N, D, q.dtype, target_of(q))
    o = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    (bias_t, *s_bias), (mask_t, *s_mask), G, Gm = _bias_mask_args(bias, mask)
    _fwd_kernel[(B * H, triton.cdiv(N, cfg["BLOCK_M"]))](
        q, k, v, bias_t, mask_t, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *s_bias, *s_mask,
        G, Gm, H, N, D, scale * LOG2E,
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None, FP32=fp32_dot(q.dtype), **cfg,
    )
    return o, lse


def _backward(do, q, k, v, bias, mask, o, lse, scale, bias_grad):
    B, H, N, D = q.shape
    target = target_of(q)
    cfg = _launch_config(N, D, q.dtype, target)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    FP32 = fp32_dot(q.dtype)
    (bias_t, *s_bias), (mask_t, *s_mask), G, Gm = _bias_mask_args(bias, mask)
    M = B // G
    dq, dk, dv = (torch.empty((B, H, N, D), dtype=q.dtype, device=q.device) for _ in range(3))

    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(B * H, triton.cdiv(N, bm))](
        o, do, delta, *o.stride(), *do.stride(), H, N, D,
        BLOCK_M=bm, BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )

    key_blocks = triton.cdiv(N, bn)
    write_dq = key_blocks == 1
    windows_per_program = _bias_grad_chunks(M, G, H, key_blocks, target) if bias_grad else 1
    chunks = triton.cdiv(M, windows_per_program)
    dbias = None
    if bias_grad:  # each program's own partial sum; added into atomically when the queries span several blocks
        alloc = torch.empty if N <= bm else torch.zeros
        dbias = alloc((chunks, G, H, N, N), dtype=torch.float32, device=q.device)
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *s_bias, *s_mask)
    _bwd_kv_kernel[(chunks * G * H, key_blocks)](
        q, k, v, bias_t, mask_t, do, lse, delta, dq, dk, dv, dbias, *common,
        M, G, Gm, H, N, D, scale, scale * LOG2E, windows_per_program,
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None, BIAS_GRAD=bias_grad, WRITE_DQ=write_dq,
        FP32=FP32, **cfg,
    )
    if not write_dq:
        _bwd_q_kernel[(B * H, triton.cdiv(N, bm))](
            q, k, v, bias_t, mask_t, do, lse, delta, dq, *common,
            G, Gm, H, N, D, scale, scale * LOG2E,
            HAS_BIAS=bias is not None, HAS_MASK=mask is not None, FP32=FP32, **cfg,
        )
    if bias_grad:
        dbias = dbias.sum(0)
        if bias.shape[1] == 1:  # one bias shared by all heads
            dbias = dbias.sum(1, keepdim=True)
        dbias = dbias.to(bias.dtype)
    return dq, dk, dv, dbias
