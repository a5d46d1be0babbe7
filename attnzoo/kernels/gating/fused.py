"""Fused Triton gating kernels, forward and backward, on contiguous [B, C, H, W] maps (other layouts are made
contiguous first). Sums are accumulated in fp32.

ELA, one program per (image, channel) plane, walking it in blocks of whole rows:
    pool    forward  x_h[h] = Σ_w x[h, w] / W,  x_w[w] = Σ_h x[h, w] / H
            backward dx[h, w] = dx_h[h] / W + dx_w[w] / H
    gate    forward  y = x · a_h[h] · a_w[w]
            backward dx = dy · a_h · a_w,  da_h[h] = Σ_w dy · x · a_w,  da_w[w] = Σ_h dy · x · a_h

ULSAM, one program per (image, subspace, block of positions):
    forward  a = softmax(l) over all H·W (each program recomputes the plane's log-sum-exp from the logits),
             y = x · (1 + a) for the subspace's channels; the log-sum-exp is kept for the backward
    backward da[p] = Σ_c dy[c, p] · x[c, p],  dx = dy · (1 + a),  dl = a · (da − Σ_p a · da)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import Target, target_of, unsupported_input

MAX_W = 4096
MAX_BLOCK = 2048  # elements of a plane an ELA program holds at once (more when one row is longer)
MAX_POSITIONS = 4096  # positions of a block in the ULSAM kernels (each program re-reads its plane's logits)


def unsupported(x: torch.Tensor) -> str | None:
    """Why the fused kernels cannot take ``x`` (a phrase for an error message), or None when they can."""
    return unsupported_input(x, "x", MAX_W, "a width", "W")


def launch_config(H: int, W: int, dtype: torch.dtype, target: Target) -> dict:
    """The blocks of the kernels on [B, C, H, W] maps of ``dtype`` on ``target``: ``"ela"`` (BLOCK_H whole rows
    of BLOCK_W, at most MAX_BLOCK elements unless one row is longer) and ``"ulsam"`` (BLOCK of the H·W
    positions, at most MAX_POSITIONS), each with its warps.

    The kernels are memory-bound and elementwise: the rule keeps 8-16 elements of each live tensor per thread,
    warps growing with the block (1 warp per 256 elements, 4 to 16), which holds every fp32/fp16/bf16 kernel in
    registers on sm_80 and sm_90a (4096-element blocks on 4 warps spilled the ELA gate backward on sm_90a).
    Not dtype- or target-dependent today; never interpreter-dependent, so the CPU tests run the GPU's blocks.
    """
    del dtype, target
    block_w = triton.next_power_of_2(W)
    block_h = min(triton.next_power_of_2(H), max(1, MAX_BLOCK // block_w))
    block = min(MAX_POSITIONS, triton.next_power_of_2(H * W))
    return dict(ela=dict(BLOCK_H=block_h, BLOCK_W=block_w, num_warps=_warps(block_h * block_w)),
                ulsam=dict(BLOCK=block, num_warps=_warps(block)))


def _warps(elements: int) -> int:
    return min(16, max(4, elements // 256))


def _ela_blocks(x: torch.Tensor) -> dict:
    return launch_config(x.shape[-2], x.shape[-1], x.dtype, target_of(x))["ela"]


def _ulsam_blocks(x: torch.Tensor) -> dict:
    return launch_config(x.shape[-2], x.shape[-1], x.dtype, target_of(x))["ulsam"]


# ---------------------------------------------------------------------------------------------------- ELA


@triton.jit
def _ela_pool_fwd(x_ptr, xh_ptr, xw_ptr, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    x_ptr += plane * H * W
    cols = tl.arange(0, BLOCK_W)
    col_sum = tl.zeros((BLOCK_W,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        rows = h0 + tl.arange(0, BLOCK_H)
        inside = (rows[:, None] < H) & (cols[None, :] < W)
        x = tl.load(x_ptr + rows[:, None] * W + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        tl.store(xh_ptr + plane * H + rows, (tl.sum(x, axis=1) / W).to(xh_ptr.dtype.element_ty), mask=rows < H)
        col_sum += tl.sum(x, axis=0)
    tl.store(xw_ptr + plane * W + cols, (col_sum / H).to(xw_ptr.dtype.element_ty), mask=cols < W)


@triton.jit
def _ela_pool_bwd(dxh_ptr, dxw_ptr, dx_ptr, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    dxw = tl.load(dxw_ptr + plane * W + cols, mask=cols < W, other=0.0).to(tl.float32) / H
    for h0 in range(0, H, BLOCK_H):
        rows = h0 + tl.arange(0, BLOCK_H)
        dxh = tl.load(dxh_ptr + plane * H + rows, mask=rows < H, other=0.0).to(tl.float32) / W
        inside = (rows[:, None] < H) & (cols[None, :] < W)
        tl.store(dx_ptr + plane * H * W + rows[:, None] * W + cols[None, :],
                 (dxh[:, None] + dxw[None, :]).to(dx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _ela_gate_fwd(x_ptr, ah_ptr, aw_ptr, y_ptr, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    aw = tl.load(aw_ptr + plane * W + cols, mask=cols < W, other=0.0).to(tl.float32)
    for h0 in range(0, H, BLOCK_H):
        rows = h0 + tl.arange(0, BLOCK_H)
        ah = tl.load(ah_ptr + plane * H + rows, mask=rows < H, other=0.0).to(tl.float32)
        inside = (rows[:, None] < H) & (cols[None, :] < W)
        offs = plane * H * W + rows[:, None] * W + cols[None, :]
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (x * ah[:, None] * aw[None, :]).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _ela_gate_bwd(x_ptr, ah_ptr, aw_ptr, dy_ptr, dx_ptr, dah_ptr, daw_ptr, H, W,
                  BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    aw = tl.load(aw_ptr + plane * W + cols, mask=cols < W, other=0.0).to(tl.float32)
    daw = tl.zeros((BLOCK_W,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        rows = h0 + tl.arange(0, BLOCK_H)
        ah = tl.load(ah_ptr + plane * H + rows, mask=rows < H, other=0.0).to(tl.float32)
        inside = (rows[:, None] < H) & (cols[None, :] < W)
        offs = plane * H * W + rows[:, None] * W + cols[None, :]
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, (dy * ah[:, None] * aw[None, :]).to(dx_ptr.dtype.element_ty), mask=inside)
        dyx = dy * x
        tl.store(dah_ptr + plane * H + rows, tl.sum(dyx * aw[None, :], axis=1).to(dah_ptr.dtype.element_ty),
                 mask=rows < H)
        daw += tl.sum(dyx * ah[:, None], axis=0)
    tl.store(daw_ptr + plane * W + cols, daw.to(daw_ptr.dtype.element_ty), mask=cols < W)


def _ela_pool_forward(x):
    """(x_h, x_w): the row and column means of x [B, C, H, W]."""
    B, C, H, W = x.shape
    x = x.contiguous()
    x_h = torch.empty(B, C, H, device=x.device, dtype=x.dtype)
    x_w = torch.empty(B, C, W, device=x.device, dtype=x.dtype)
    _ela_pool_fwd[(B * C,)](x, x_h, x_w, H, W, **_ela_blocks(x))
    return x_h, x_w


def _ela_pool_backward(dx_h, dx_w):
    """dx [B, C, H, W] from the gradients of x_h [B, C, H] and x_w [B, C, W]."""
    B, C, H = dx_h.shape
    W = dx_w.shape[-1]
    dx_h, dx_w = dx_h.contiguous(), dx_w.contiguous()
    dx = torch.empty(B, C, H, W, device=dx_h.device, dtype=dx_h.dtype)
    _ela_pool_bwd[(B * C,)](dx_h, dx_w, dx, H, W, **_ela_blocks(dx))
    return dx


def _ela_gate_forward(x, a_h, a_w):
    B, C, H, W = x.shape
    x, a_h, a_w = x.contiguous(), a_h.contiguous(), a_w.contiguous()
    y = torch.empty_like(x)
    _ela_gate_fwd[(B * C,)](x, a_h, a_w, y, H, W, **_ela_blocks(x))
    return y


def _ela_gate_backward(x, a_h, a_w, dy):
    """(dx, da_h, da_w)."""
    B, C, H, W = x.shape
    x, a_h, a_w = x.contiguous(), a_h.contiguous(), a_w.contiguous()
    dx, da_h, da_w = torch.empty_like(x), torch.empty_like(a_h), torch.empty_like(a_w)
    _ela_gate_bwd[(B * C,)](x, a_h, a_w, dy.contiguous(), dx, da_h, da_w, H, W, **_ela_blocks(x))
    return dx, da_h, da_w


@triton.jit
def _log_sum_exp(l_ptr, N, BLOCK: tl.constexpr):
    """log Σ_p exp(l[p]) over one plane of N logits, online (running max and rescaled sum)."""
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    for p0 in range(0, N, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        logit = tl.load(l_ptr + offs, mask=offs < N, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, logit)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that have seen nothing yet
        s = s * tl.exp(m - safe) + tl.exp(logit - safe)
        m = m_new
    m_all = tl.max(m, axis=0)
    return m_all + tl.log(tl.sum(s * tl.exp(tl.where(m == float("-inf"), m_all, m) - m_all), axis=0))


@triton.jit
def _subspace_fwd(x_ptr, l_ptr, y_ptr, lse_ptr, CG, N, BLOCK: tl.constexpr):
    bg = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    lse = _log_sum_exp(l_ptr + bg * N, N, BLOCK)
    if block == 0:
        tl.store(lse_ptr + bg, lse)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    a = tl.exp(tl.load(l_ptr + bg * N + offs, mask=inside, other=0.0).to(tl.float32) - lse)
    base = bg * CG * N  # subspace g of image b: channels g·CG … g·CG + CG − 1, contiguous
    for c in range(CG):
        x = tl.load(x_ptr + base + c * N + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(y_ptr + base + c * N + offs, (x * (1.0 + a)).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _subspace_bwd_dx(x_ptr, l_ptr, lse_ptr, dy_ptr, dx_ptr, da_ptr, CG, N, BLOCK: tl.constexpr):
    """dx = dy · (1 + a) and da = Σ_c dy · x for one block of positions."""
    bg = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    a = tl.exp(tl.load(l_ptr + bg * N + offs, mask=inside, other=0.0).to(tl.float32) - tl.load(lse_ptr + bg))
    da = tl.zeros((BLOCK,), dtype=tl.float32)
    base = bg * CG * N
    for c in range(CG):
        x = tl.load(x_ptr + base + c * N + offs, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + base + c * N + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(dx_ptr + base + c * N + offs, (dy * (1.0 + a)).to(dx_ptr.dtype.element_ty), mask=inside)
        da += dy * x
    tl.store(da_ptr + bg * N + offs, da, mask=inside)


@triton.jit
def _subspace_bwd_dl(l_ptr, lse_ptr, da_ptr, dl_ptr, N, BLOCK: tl.constexpr):
    """Softmax backward for one block of positions: dl = a · (da − Σ_p a · da), the sum over the plane."""
    bg = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + bg)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p0 in range(0, N, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        a = tl.exp(tl.load(l_ptr + bg * N + offs, mask=offs < N, other=float("-inf")).to(tl.float32) - lse)
        acc += a * tl.load(da_ptr + bg * N + offs, mask=offs < N, other=0.0)
    dot = tl.sum(acc, axis=0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    a = tl.exp(tl.load(l_ptr + bg * N + offs, mask=inside, other=0.0).to(tl.float32) - lse)
    da = tl.load(da_ptr + bg * N + offs, mask=inside, other=0.0)
    tl.store(dl_ptr + bg * N + offs, (a * (da - dot)).to(dl_ptr.dtype.element_ty), mask=inside)


def _subspace_forward(x, logits):
    """(y, lse): the gated map and the fp32 [B·G] log-sum-exp of each subspace's logits."""
    B, C, H, W = x.shape
    G, N = logits.shape[1], H * W
    x, logits = x.contiguous(), logits.contiguous()
    y = torch.empty_like(x)
    lse = torch.empty(B * G, device=x.device, dtype=torch.float32)
    blocks = _ulsam_blocks(x)
    _subspace_fwd[(B * G, triton.cdiv(N, blocks["BLOCK"]))](x, logits, y, lse, C // G, N, **blocks)
    return y, lse


def _subspace_backward(x, logits, lse, dy):
    """(dx, dlogits)."""
    B, C, H, W = x.shape
    G, N = logits.shape[1], H * W
    x, logits = x.contiguous(), logits.contiguous()
    blocks = _ulsam_blocks(x)
    grid = (B * G, triton.cdiv(N, blocks["BLOCK"]))
    dx = torch.empty_like(x)
    da = torch.empty(B * G, N, device=x.device, dtype=torch.float32)
    _subspace_bwd_dx[grid](x, logits, lse, dy.contiguous(), dx, da, C // G, N, **blocks)
    dl = torch.empty_like(logits)
    _subspace_bwd_dl[grid](logits, lse, da, dl, N, **blocks)
    return dx, dl
