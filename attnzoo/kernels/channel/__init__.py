"""DaViT's channel attention: per group (head), tokens are the sequence being summed over and the hd channels
attend to each other through one hd × hd matrix.

    A = softmax(scale · kᵀ v)   (over the last dim, hd × hd, a sum over all N tokens)        out = q Aᵀ

``reference.py`` holds the readable formula and the fastest eager path; ``fused.py`` the Triton forward and
backward (split-N reduction of kᵀ v in fp32, softmax on the small state, then one pass over the tokens).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_float, check_rank, check_same, shape_str
from .._op import Op, fused_module
from .reference import channel_attention_reference, channel_attention_torch

fused = fused_module(__name__)

__all__ = ["channel_attention"]

OP = "channel_attention"


def channel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Channel attention of DaViT (timm's ``ChannelAttention``), group by group.

    Args:
        q, k, v: [B, G, N, hd]: B images, G channel groups (DaViT's heads), N tokens (H·W, any count), hd
            channels per group (≤ 128 for the fused kernel). Any strides.
        scale: multiplies the logits kᵀ v (timm applies it to k), default hd ** -0.5.

    Returns:
        q · softmax(scale · kᵀ v)ᵀ, [B, G, N, hd], the dtype of q.
    """
    _check(q, k, v, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _OP(q, k, v, scale)


_OP = Op(OP, fused, reference=channel_attention_reference, torch=channel_attention_torch,
         unsupported=lambda q, *_: fused.unsupported(q))


@_OP.forward
def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The output and A = softmax(scale · kᵀ v), [B·G, hd, hd] fp32."""
    return fused._forward(q, k, v, scale, fused._Launch(q))


@_OP.fake
def _(q, k, v, scale):
    B, G, _, D = q.shape
    return q.new_empty(q.shape), q.new_empty((B * G, D, D), dtype=torch.float32)


@_OP.backward
def _backward(d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn: Tensor,
              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return fused._backward(q, k, v, attn, d_out, scale, fused._Launch(q))


@_OP.backward_fake
def _(d_out, q, k, v, attn, scale):
    return tuple(q.new_empty(q.shape) for _ in range(3))


@_OP.grads(saved=(1,))
def _(inputs, outputs, grads, needs):
    q, k, v, scale = inputs
    return *_OP.backward_op(grads[0], q, k, v, outputs[0], scale), None


def _check(q, k, v, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(OP, name, t)
        check_rank(OP, name, t, "BGNd")
    for name, t in (("k", k), ("v", v)):
        check_same(OP, "q", q, name, t)
        if t.shape != q.shape:
            raise ValueError(f"{OP}: `{name}` must have the shape of `q` [B, G, N, hd] = "
                             f"{shape_str(q.shape)}, got {shape_str(t.shape)}")
    if q.numel() == 0:
        raise ValueError(f"{OP}: `q` must not be empty, got shape {shape_str(q.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"{OP}: `scale` must be a Python number or None, got {type(scale).__name__}")
