"""Linear attention in plain PyTorch: the readable reference.

Takes validated arguments (see ``attnzoo.kernels.linear``): q, k, v of shape [B, H, N, D]; ``feature_map``
"relu" or "elu"; ``reweight_scale`` a float or None; ``cos``, ``sin`` [N, D] or None; ``clamp_min`` a float or
None; ``eps`` a float.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def feature(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """φ(x): ReLU (L²ViT) or ELU + 1 (RALA), both non-negative."""
    return F.relu(x) if feature_map == "relu" else F.elu(x) + 1.0


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent channel pairs (RetNet's ``theta_shift``): (x₀, x₁) → (x₀c − x₁s, x₁c + x₀s)."""
    rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


def linear_attention_reference(q, k, v, feature_map: str, reweight_scale: float | None, cos, sin,
                               clamp_min: float | None, eps: float) -> torch.Tensor:
    """The formula of ``attnzoo.kernels.linear_attention``, step by step, computed in at least float32."""
    N = q.shape[-2]
    acc = torch.promote_types(q.dtype, torch.float32)
    phi_q, phi_k, v = feature(q.to(acc), feature_map), feature(k.to(acc), feature_map), v.to(acc)
    if reweight_scale is not None:  # RALA: α = N · softmax_n(s · mean_m φ(q_m) · φ(k_n)), k'_n = α_n φ(k_n)
        q_mean = phi_q.mean(-2, keepdim=True)  # [B, H, 1, D]
        alpha = N * (reweight_scale * q_mean @ phi_k.transpose(-2, -1)).softmax(-1)  # [B, H, 1, N]
        phi_k = phi_k * alpha.transpose(-2, -1)
    den = phi_q @ phi_k.sum(-2, keepdim=True).transpose(-2, -1) + N * eps  # [B, H, N, 1], before RoPE
    if clamp_min is not None:
        den = den.clamp(min=clamp_min)
    if cos is not None:
        phi_q, phi_k = rotate_pairs(phi_q, cos.to(acc), sin.to(acc)), rotate_pairs(phi_k, cos.to(acc), sin.to(acc))
    state = phi_k.transpose(-2, -1) @ v  # [B, H, D, D], a sum over all N tokens
    return (phi_q @ state / den).to(q.dtype)
