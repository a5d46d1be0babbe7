"""Sparse attention in plain PyTorch: the readable reference and the SDPA path.

Both take validated arguments (see ``attnzoo.kernels.sparse``): q [B, H, M, D], k and v [B, H, N, D], ``index``
[B, H, M, K] integer key indices, distinct within a row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def key_mask(index: torch.Tensor, num_keys: int) -> torch.Tensor:
    """The boolean [B, H, M, N] mask that is True at the keys each query keeps."""
    mask = torch.zeros(*index.shape[:-1], num_keys, dtype=torch.bool, device=index.device)
    return mask.scatter_(-1, index.long(), True)


def sparse_attention_reference(q, k, v, index, scale: float) -> torch.Tensor:
    """Dense logits scale·q kᵀ, the dropped keys set to -inf, softmax, times v; in at least float32."""
    acc = torch.promote_types(q.dtype, torch.float32)
    logits = (q.to(acc) * scale) @ k.to(acc).transpose(-2, -1)  # [B, H, M, N]
    logits = logits.masked_fill(~key_mask(index, k.shape[-2]), float("-inf"))
    return (logits.softmax(-1) @ v.to(acc)).to(q.dtype)


def sparse_attention_sdpa(q, k, v, index, scale: float) -> torch.Tensor:
    """The same through ``F.scaled_dot_product_attention`` with the dense boolean mask: no time saved, the
    fastest eager path on the CPU."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask(index, k.shape[-2]), scale=scale)
