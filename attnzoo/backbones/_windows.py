"""Padding for window and grid partitions: any input size, with the padded tokens masked out as keys.

The partitions themselves are timm's (``timm.models.maxxvit.window_partition`` / ``grid_partition``); this adds
the zero padding up to the partition size and the boolean key mask that ``window_attention`` takes, so that
padded tokens never receive attention weight. When the size already tiles nothing is padded and the mask is
None, so the result is exactly the unpadded computation.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad NHWC ``x`` at the bottom and right so that H and W are multiples of ``size``."""
    _, H, W, _ = x.shape
    pad_h, pad_w = (-H) % size[0], (-W) % size[1]
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def padding_key_mask(
    hw: tuple[int, int],
    padded_hw: tuple[int, int],
    size: tuple[int, int],
    partition: Callable[[torch.Tensor, list[int]], torch.Tensor],
    device: torch.device,
) -> torch.Tensor | None:
    """[num_windows, size[0]·size[1]] boolean mask, True for real tokens, laid out as ``partition`` lays out
    the windows of one image; None when nothing was padded."""
    if tuple(hw) == tuple(padded_hw):
        return None
    valid = torch.zeros(1, *padded_hw, 1, dtype=torch.bool, device=device)
    valid[:, : hw[0], : hw[1]] = True
    return partition(valid, list(size)).reshape(-1, size[0] * size[1])
