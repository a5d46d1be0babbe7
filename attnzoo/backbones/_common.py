"""Small pieces shared by the backbone families."""
from __future__ import annotations

import torch
from torch import nn


def check_image_batch(model: nn.Module, x, in_chans: int, family: str) -> None:
    """A ValueError naming the model, the argument and what it expects unless `x` is a floating-point image
    batch [B, in_chans, H, W]."""
    name = getattr(model, "pretrained_cfg", {}).get("architecture", family)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != in_chans:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: input `x` must be an image batch [B, {in_chans}, H, W] (in_chans={in_chans}), "
                         f"got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: input `x` must be a floating-point image batch, got {x.dtype}")


class CheckedInput:
    """Mixin for timm CNNs (which keep ``in_chans``): :func:`check_image_batch` before the first conv, naming the
    model (``self.name``)."""

    name: str
    in_chans: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(self, x, self.in_chans, self.name)
        return super().forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        check_image_batch(self, x, self.in_chans, self.name)
        return super().forward_intermediates(x, *args, **kwargs)
