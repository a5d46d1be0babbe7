"""The simple feature pyramid of ViTDet, for plain (single-scale) ViT backbones such as Sparsifiner.

Li, Mao, Girshick, He, "Exploring Plain Vision Transformer Backbones for Object Detection" (ECCV 2022,
https://arxiv.org/abs/2203.16527), Sec. 3 and Fig. 2(c): the pyramid is built from the backbone's last feature
map alone (stride 16), without FPN's top-down or lateral paths:

    stride  4:  deconv 2x2/2 -> LN -> GELU -> deconv 2x2/2
    stride  8:  deconv 2x2/2
    stride 16:  identity
    stride 32:  maxpool 2x2/2
    then on each level:  conv 1x1 -> LN -> conv 3x3 -> LN          (to ``out_channels``)
    levels beyond the scales (``num_outs``):  maxpool 1x1/2 of the last one (P6 for the RPN)

From the authors' code (detectron2 ``SimpleFeaturePyramid`` with ``norm="LN"`` and ``LastLevelMaxPool``): LayerNorm
over channels, convolutions without bias where a norm follows. mmdetection 3.3.0 ships no such neck (its ViTDet
project is not in the package); mmsegmentation's ``Feature2Pyramid`` does the rescaling but neither the
projection to ``out_channels`` nor the extra level, and lives only in mmseg's registry.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from timm.layers import LayerNorm2d
from torch import nn

__all__ = ["SimpleFPN"]


def _rescale(channels: int, scale: float) -> nn.Module:
    if scale == 4.0:
        return nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, stride=2), LayerNorm2d(channels), nn.GELU(),
                             nn.ConvTranspose2d(channels, channels, 2, stride=2))
    if scale == 2.0:
        return nn.ConvTranspose2d(channels, channels, 2, stride=2)
    if scale == 1.0:
        return nn.Identity()
    if scale == 0.5:
        return nn.MaxPool2d(2, stride=2)
    raise ValueError(f"SimpleFPN: `scale_factors` may hold 4, 2, 1 and 0.5, got {scale}")


class SimpleFPN(BaseModule):
    """ViTDet's simple feature pyramid from one feature map.

    Args:
        in_channels: channels of the backbone's feature maps; the last one feeds the pyramid (a list, as FPN
            takes, so ``backbone.out_channels`` fits).
        out_channels: channels of every output level.
        scale_factors: resampling of the input per level, finest first (ViTDet: 4, 2, 1, 0.5 for strides 4-32
            from a stride-16 input).
        num_outs: number of outputs; those beyond ``scale_factors`` max-pool the previous one by 2.
    """

    def __init__(self, in_channels: list[int], out_channels: int = 256,
                 scale_factors: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5), num_outs: int = 5,
                 init_cfg: dict | None = None):
        super().__init__(init_cfg)
        if num_outs < len(scale_factors):
            raise ValueError(f"SimpleFPN: `num_outs`={num_outs} is fewer than the {len(scale_factors)} "
                             f"`scale_factors`")
        self.in_channels = list(in_channels)
        self.num_outs = num_outs
        c = self.in_channels[-1]
        self.rescales = nn.ModuleList(_rescale(c, float(s)) for s in scale_factors)
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                          nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))
            for _ in scale_factors)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"SimpleFPN: got {len(inputs)} feature maps, expected {len(self.in_channels)} "
                             f"(`in_channels`={self.in_channels})")
        x = inputs[-1]
        outs = [conv(rescale(x)) for rescale, conv in zip(self.rescales, self.convs, strict=True)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)
