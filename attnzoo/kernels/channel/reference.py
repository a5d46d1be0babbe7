"""Channel attention in plain PyTorch: the readable reference and the fastest eager path.

Both take validated arguments (see ``attnzoo.kernels.channel``): q, k, v of shape [B, G, N, hd] and a float
``scale``.
"""
from __future__ import annotations

import torch


def channel_attention_reference(q, k, v, scale: float) -> torch.Tensor:
    """q · softmax(scale · kᵀ v)ᵀ computed in at least float32, with the scale on k as timm's ChannelAttention
    applies it."""
    acc = torch.promote_types(q.dtype, torch.float32)
    state = (k.to(acc) * scale).transpose(-2, -1) @ v.to(acc)  # [B, G, hd, hd], a sum over all N tokens
    attn = state.softmax(dim=-1)
    return (q.to(acc) @ attn.transpose(-2, -1)).to(q.dtype)


def channel_attention_torch(q, k, v, scale: float) -> torch.Tensor:
    """The same in the input dtype, the scale on the small hd × hd state instead of on the N × hd keys."""
    attn = (k.transpose(-2, -1) @ v).mul(scale).softmax(dim=-1)
    return q @ attn.transpose(-2, -1)
