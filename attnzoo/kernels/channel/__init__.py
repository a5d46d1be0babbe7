"""DaViT's channel attention: per group (head), tokens are the sequence being summed over and the hd channels
attend to each other through one hd × hd matrix.

    A = softmax(scale · kᵀ v)   (over the last dim, hd × hd, a sum over all N tokens)        out = q Aᵀ

``reference.py`` holds the readable formula and the fastest eager path; ``fused.py`` the Triton forward and
backward (split-N reduction of kᵀ v in fp32, softmax on the small state, then one pass over the tokens).
"""
from __future__ import annotations

import torch

from .._checks import check_float, check_rank, check_same, shape_str
from ..dispatch import select_backend
from .reference import channel_attention_reference, channel_attention_torch

try:
    from . import fused
except ImportError:  # no triton on this platform: the torch and reference paths remain
    fused = None

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

    # without triton the dispatcher never picks it, and a forced "triton" fails there with the reason
    unsupported = None if fused is None else fused.unsupported(q)
    backend = select_backend(OP, q, triton_supported=fused is not None and unsupported is None)
    if backend == "reference":
        return channel_attention_reference(q, k, v, scale)
    if backend == "torch":
        return channel_attention_torch(q, k, v, scale)
    if unsupported is not None:
        raise ValueError(f"{OP}: the triton backend {unsupported}")
    return fused.channel_attention_fused(q, k, v, scale)


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
