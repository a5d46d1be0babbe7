"""One step of attention rollout (Abnar & Zuidema 2020) as DCAL's global-local cross-attention uses it (Zhu et
al., CVPR 2022, Eq. 2): the product of a row vector with one layer's attention matrix,

    out_j = Σ_i r_i P_ij,      P = softmax(scale · q kᵀ) row-wise                           (per head)

i.e. Pᵀr. The CLS row of the rollout Ŝ_L = S̄_L ⋯ S̄_1 is a chain of these products taken from the last layer
down, so it needs no N×N matrix per layer: only each layer's q and k.

``reference.py`` builds P explicitly. ``fused.py`` is the reduction of FlashAttention's dV = Pᵀ dO backward with a
one-column dO: a first pass stores each query row's log-sum-exp, a second streams over the query blocks,
recomputes P from q and k and accumulates Pᵀr per key block. Forward only: rollout runs under ``no_grad``, and what
DCAL does with it (a top-k) has no gradient anyway.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_float, check_rank, check_same, shape_str
from .._op import Op, fused_module
from .reference import rollout_step_reference

fused = fused_module(__name__)

__all__ = ["rollout_step"]

OP = "rollout_step"


def rollout_step(q: torch.Tensor, k: torch.Tensor, r: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Pᵀr for every head, P = softmax(scale · q kᵀ), without materialising P on the fused path.

    Args:
        q, k: [B, H, N, D] queries and keys of one attention layer (any strides, same dtype and device).
        r: [B, N] (the same vector for every head) or [B, H, N], any float dtype: the weight of each query row.
        scale: logit scale, default D ** -0.5.

    Returns:
        [B, H, N] float32 (float64 for float64 inputs), out[b, h, j] = Σ_i r[b, (h,) i] P[b, h, i, j]. Not
        differentiable: call it under ``torch.no_grad()``.
    """
    _check(q, k, r, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if r.dim() == 2:
        r = r.unsqueeze(1).expand(-1, q.shape[1], -1)

    return _OP(q, k, r, scale)


# torch: the reference itself, the explicit matrix (no faster PyTorch formulation); forward only, so no autograd
# is registered
_OP = Op(OP, fused, reference=rollout_step_reference, torch=rollout_step_reference,
         unsupported=lambda q, *_: fused.unsupported(q))


@_OP.forward
def _forward(q: Tensor, k: Tensor, r: Tensor, scale: float) -> Tensor:
    return fused.rollout_step_fused(q, k, r, scale)


@_OP.fake
def _(q, k, r, scale):
    return q.new_empty(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32))


def _check(q, k, r, scale) -> None:
    for name, t in (("q", q), ("k", k)):
        check_float(OP, name, t)
        check_rank(OP, name, t, "BHND")
    check_same(OP, "q", q, "k", k)
    if k.shape != q.shape:
        raise ValueError(f"{OP}: `k` must have the shape of `q` {shape_str(q.shape)} (self-attention), got "
                         f"{shape_str(k.shape)}")
    if q.numel() == 0:
        raise ValueError(f"{OP}: `q` must not be empty, got {shape_str(q.shape)}")
    check_float(OP, "r", r)
    if r.device != q.device:
        raise ValueError(f"{OP}: `r` is on {r.device} but `q` is on {q.device}; they must match")
    B, H, N, _ = q.shape
    if tuple(r.shape) not in ((B, N), (B, H, N)):
        raise ValueError(f"{OP}: `r` must be [B, N] = [{B}, {N}] or [B, H, N] = [{B}, {H}, {N}], got "
                         f"{shape_str(r.shape)}")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or r.requires_grad):
        raise ValueError(f"{OP}: has no backward; call it under torch.no_grad() (or pass detached tensors)")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"{OP}: `scale` must be a Python number or None, got {type(scale).__name__}")
