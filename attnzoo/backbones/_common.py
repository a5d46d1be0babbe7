"""Small pieces shared by the backbone families."""
from __future__ import annotations

import torch
from torch import nn


def check_image_batch(model: nn.Module, x, in_chans: int, family: str) -> None:
    """A ValueError naming the model, the argument and what it expects unless `x` is an image batch
    [B, in_chans, H, W]."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != in_chans:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        name = getattr(model, "pretrained_cfg", {}).get("architecture", family)
        raise ValueError(f"{name}: input `x` must be an image batch [B, {in_chans}, H, W] (in_chans={in_chans}), "
                         f"got {got}")
