"""Softmax attention over many short sequences (windows): DaViT's spatial windows, MaxViT's block and grid
attention, L²ViT's window blocks.

    out_b = softmax(scale · q_b k_bᵀ + bias_{b mod G}, masked keys → -inf) · v_b        (one window b, one head)

``reference.py`` holds the readable formula and the SDPA path; ``fused.py`` the Triton forward and backward.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_float, check_rank, check_same, shape_str
from .._op import Op, fused_module
from .reference import window_attention_reference, window_attention_sdpa

fused = fused_module(__name__)

__all__ = ["window_attention"]

OP = "window_attention"


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention within each of B short sequences.

    Args:
        q, k, v: [B, H, N, D]. B counts windows × images, N is the window's token count (49, 64, 144, …; the
            fused kernel loops over key blocks, so any N), D the head dim (≤ 128 for the fused kernel). Any strides.
        bias: additive logits, [H, N, N] (e.g. a relative position bias, shared by every window) or
            [G, H, N, N] with B divisible by G: window b takes ``bias[b % G]``, matching windows laid out
            image-major (e.g. Swin's per-window shift masks). The head dim may be 1 to share across heads.
            Differentiable.
        mask: boolean key mask [N] or [G, N] (B divisible by G), True where the key takes part, e.g. False for
            the padded tokens of an image padded up to the window size. A query with no key left returns 0.
        scale: logit scale, default D ** -0.5.

    Returns:
        [B, H, N, D], the dtype of q.
    """
    _check(q, k, v, bias, mask)
    if bias is not None and bias.dim() == 3:
        bias = bias[None]
    if mask is not None and mask.dim() == 1:
        mask = mask[None]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _OP(q, k, v, bias, mask, scale)


_OP = Op(OP, fused, reference=window_attention_reference, torch=window_attention_sdpa,
         unsupported=lambda q, *_: fused.unsupported(q), preferred=lambda q, *_: fused.preferred(q))


@_OP.forward
def _forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None,
             scale: float) -> tuple[Tensor, Tensor]:
    """The output and the base-2 log-sum-exp of each row, [B, H, N] fp32."""
    return fused._forward(q, k, v, bias, mask, scale)


@_OP.fake
def _(q, k, v, bias, mask, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@_OP.backward
def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None, o: Tensor,
              lse: Tensor, scale: float, bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv and d bias (an empty tensor unless ``bias_grad``)."""
    dq, dk, dv, dbias = fused._backward(do, q, k, v, bias, mask, o, lse, scale, bias_grad)
    return dq, dk, dv, dbias if bias_grad else q.new_empty(0)


@_OP.backward_fake
def _(do, q, k, v, bias, mask, o, lse, scale, bias_grad):
    return (*(q.new_empty(q.shape) for _ in range(3)), bias.new_empty(bias.shape) if bias_grad else q.new_empty(0))


@_OP.grads(saved=(0, 1))
def _(inputs, outputs, grads, needs):
    q, k, v, bias, mask, scale = inputs
    bias_grad = bias is not None and needs[3]
    dq, dk, dv, dbias = _OP.backward_op(grads[0], q, k, v, bias, mask, *outputs, scale, bias_grad)
    return dq, dk, dv, dbias if bias_grad else None, None, None


def _check(q, k, v, bias, mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(OP, name, t)
        check_rank(OP, name, t, "BHND")
    for name, t in (("k", k), ("v", v)):
        check_same(OP, "q", q, name, t)
        if t.shape != q.shape:
            raise ValueError(f"{OP}: `{name}` must have the shape of `q` [B, H, N, D] = {shape_str(q.shape)}, "
                             f"got {shape_str(t.shape)}")
    B, H, N, _ = q.shape
    if bias is not None:
        check_float(OP, "bias", bias)
        if bias.device != q.device:
            raise ValueError(f"{OP}: `bias` is on {bias.device} but `q` is on {q.device}")
        G = bias.shape[0] if bias.dim() == 4 else 1
        if bias.dim() not in (3, 4) or bias.shape[-2:] != (N, N) or bias.shape[-3] not in (1, H) or B % G:
            raise ValueError(f"{OP}: `bias` must be [H, N, N] or [G, H, N, N] with B divisible by G (B={B}, H={H}, "
                             f"N={N}; the head dim may be 1), got {shape_str(bias.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"{OP}: `mask` must be a boolean tensor (True = the key takes part), got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.device != q.device:
            raise ValueError(f"{OP}: `mask` is on {mask.device} but `q` is on {q.device}")
        G = mask.shape[0] if mask.dim() == 2 else 1
        if mask.dim() not in (1, 2) or mask.shape[-1] != N or B % G:
            raise ValueError(f"{OP}: `mask` must be [N] or [G, N] with B divisible by G (B={B}, N={N}), got "
                             f"{shape_str(mask.shape)}")
