"""What the reference-parity tests share: random norm statistics and affines (so that no block is an identity
at init), the one fp32 comparison of logits and feature maps, and a window padding that fills with noise."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random affine on every BatchNorm/LayerNorm/GroupNorm and random BatchNorm running statistics, in place;
    the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) and getattr(m, "weight", None) is not None:
            m.weight.data = 0.5 + 0.5 * torch.rand(m.weight.shape, generator=g)
            m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=g)
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
            m.running_mean = 0.1 * torch.randn(m.running_mean.shape, generator=g)
            m.running_var = 0.5 + torch.rand(m.running_var.shape, generator=g)
    return model.eval()


def assert_close_fp32(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    """``got`` equals ``want`` in shape and to ``tol``, relative to the largest entry where that exceeds 1 (a
    randomly initialised deep stage grows its residual stream to ~1e2–1e3, where one fp32 ulp is ~1e-5–1e-4)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    bound = tol * max(1.0, want.abs().max().item())
    assert err <= bound, f"{what}: max |diff| {err:.3g} > {bound:.3g}"


def noisy_padding(pad: Callable, extra_windows: int = 0) -> Callable:
    """A stand-in for ``pad_to_multiple(x, size)`` (NHWC): the same padded shape plus ``extra_windows`` whole
    windows of rows and columns, the padding filled with large noise instead of zeros."""
    def padded(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        H, W = (n + extra_windows * s for n, s in zip(pad(x, size).shape[1:3], size, strict=True))
        noisy = 10 * torch.randn(x.shape[0], H, W, x.shape[3], generator=torch.Generator().manual_seed(5))
        noisy[:, : x.shape[1], : x.shape[2]] = x
        return noisy
    return padded
