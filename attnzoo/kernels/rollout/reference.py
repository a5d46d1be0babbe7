"""The attention-rollout step in plain PyTorch: the explicit softmax matrix, then its transpose times r.

Takes validated arguments (see ``attnzoo.kernels.rollout``): q, k [B, H, N, D], r [B, H, N] (a [B, N] vector is
expanded over the heads by the caller).
"""
from __future__ import annotations

import torch


def rollout_step_reference(q: torch.Tensor, k: torch.Tensor, r: torch.Tensor, scale: float) -> torch.Tensor:
    """Pᵀr per head with P = softmax(scale · q kᵀ) materialised as [B, H, N, N]; in float32 (float64 for float64
    inputs)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    p = ((q.to(acc) * scale) @ k.to(acc).transpose(-2, -1)).softmax(-1)  # [B, H, N, N], rows sum to 1
    return (r.to(acc).unsqueeze(-2) @ p).squeeze(-2)  # Σ_i r_i P_ij
