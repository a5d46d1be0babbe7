"""The gating ops in plain PyTorch: the readable formulas the fused kernels are tested against.

All take validated arguments (see ``attnzoo.kernels.gating``).
"""
from __future__ import annotations

import torch


def ela_pool_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ELA's strip pooling of x [B, C, H, W]: the mean of every row, [B, C, H], and of every column,
    [B, C, W]."""
    return x.mean(dim=3), x.mean(dim=2)


def ela_gate_reference(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """y[b, c, h, w] = x[b, c, h, w] · a_h[b, c, h] · a_w[b, c, w]."""
    return x * a_h.unsqueeze(-1) * a_w.unsqueeze(-2)


def subspace_attention_reference(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """ULSAM's gating: per subspace g (channels g·C/G … (g+1)·C/G − 1), the map softmax(logits[:, g]) taken
    over all H·W positions scales every channel of the subspace, plus the identity: y = x · a + x."""
    B, C, H, W = x.shape
    G = logits.shape[1]
    attn = logits.flatten(2).float().softmax(dim=-1).to(x.dtype)  # [B, G, H·W]
    xg = x.reshape(B, G, C // G, H * W)
    return (xg * attn.unsqueeze(2) + xg).reshape(B, C, H, W)
