"""ELA as the authors compute it, written for the parity tests from Xuwei86/ELA_Code (MbV2/models/mbv2_ela72.py:
their ELA module ``custom_att`` and the ImageNet MobileNetV2 ``MBV2_ELA72`` that holds it), under their keys
(``features.{k}.conv.{i}``, ``conv``, ``classifier.1``; the module's ``conv`` and ``gn``), so the tests load its
weights into attnzoo's models through ``attnzoo.backbones.ela.checkpoint_filter_fn``."""
from __future__ import annotations

import torch
from torch import nn


class ELA(nn.Module):
    """Their ``custom_att`` (fixed there to ELA-L: kernel 7, C/8 conv groups, GN 16), with the three constants as
    arguments: one Conv1d and one GroupNorm shared by the row and column strips, x · σ(a_h) · σ(a_w)."""

    def __init__(self, channels: int, kernel_size: int = 7, group_channels: int = 8, norm_groups: int = 16):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2,
                              groups=channels // group_channels, bias=False)
        self.gn = nn.GroupNorm(norm_groups, channels)

    def forward(self, x):
        b, c, h, w = x.shape
        x_h = torch.sigmoid(self.gn(self.conv(x.mean(3)))).view(b, c, h, 1)
        x_w = torch.sigmoid(self.gn(self.conv(x.mean(2)))).view(b, c, 1, w)
        return x * x_h * x_w


def _conv_bn(inp: int, oup: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> list:
    layers = [nn.Conv2d(inp, oup, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(oup)]
    return layers + [nn.ReLU6()] if act else layers


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.identity = stride == 1 and inp == oup
        if expand_ratio == 1:  # dw, pw-linear
            layers = _conv_bn(hidden, hidden, 3, stride, hidden) + _conv_bn(hidden, oup, 1, act=False)
        else:  # pw, dw, ELA, pw-linear
            layers = (_conv_bn(inp, hidden, 1) + _conv_bn(hidden, hidden, 3, stride, hidden) + [ELA(hidden)]
                      + _conv_bn(hidden, oup, 1, act=False))
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.identity else self.conv(x)


class MBV2_ELA72(nn.Module):
    # t, c, n, s: MobileNetV2's table, as theirs
    CFGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, inp = [nn.Sequential(*_conv_bn(3, 32, 3, 2))], 32
        for t, c, n, s in self.CFGS:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        self.features = nn.Sequential(*layers)
        self.conv = nn.Sequential(*_conv_bn(inp, 1280, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(1280, num_classes))

    def forward(self, x):
        """(logits, the output of every ``features`` layer)."""
        maps = []
        for layer in self.features:
            x = layer(x)
            maps.append(x)
        return self.classifier(self.conv(x).mean((2, 3))), maps
