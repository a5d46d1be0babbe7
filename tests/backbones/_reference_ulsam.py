"""ULSAM as the authors compute it, written for the parity tests from Nandan91/ULSAM (ulsam.py: ``ULSAM`` of
``num_splits`` ``SubSpace`` modules over equal channel chunks), under their keys (``subspaces.{n}.{conv_dws,
bn_dws, conv_point, bn_point}``), without their BN ``momentum=0.9`` (training only) and their global
``torch.set_default_tensor_type`` at import."""
from __future__ import annotations

import torch
from torch import nn


class SubSpace(nn.Module):
    """DW 1×1 + BN + ReLU, max-pool 3×3 s1, PW 1×1 to one map + BN + ReLU, softmax over H·W, x·a + x."""

    def __init__(self, nin: int):
        super().__init__()
        self.conv_dws, self.bn_dws = nn.Conv2d(nin, nin, 1, groups=nin), nn.BatchNorm2d(nin)
        self.conv_point, self.bn_point = nn.Conv2d(nin, 1, 1), nn.BatchNorm2d(1)

    def forward(self, x):
        out = nn.functional.max_pool2d(torch.relu(self.bn_dws(self.conv_dws(x))), 3, 1, 1)
        out = torch.relu(self.bn_point(self.conv_point(out)))
        B, _, H, W = out.shape
        a = out.view(B, 1, -1).softmax(dim=2).view(B, 1, H, W)
        return x * a + x


class ULSAM(nn.Module):
    def __init__(self, nin: int, num_splits: int):
        super().__init__()
        self.num_splits = num_splits
        self.subspaces = nn.ModuleList(SubSpace(nin // num_splits) for _ in range(num_splits))

    def forward(self, x):
        chunks = torch.chunk(x, self.num_splits, dim=1)
        return torch.cat([s(c) for s, c in zip(self.subspaces, chunks, strict=True)], dim=1)
