"""L²ViT as the authors compute it, written for the parity tests from ChuanyangZheng/L2ViT
(classification/models/l2vit.py, ``block_type='mix_local_enhanced_vit'``, ``conv_stem=True``; the detection
backbone object_detection/mmdet/models/backbones/l2vit.py runs the same modules and returns each stage's output).

Plain PyTorch on (B, N, C) token sequences as theirs, under their state_dict keys (``downsample_layers``,
``stages.i.j`` with the ``cpe`` ModuleList, ``local_mp``, ``norm``, ``head``), so the tests load its weights
into attnzoo's model through ``attnzoo.backbones.l2vit.checkpoint_filter_fn``. Their windows: the normed tokens
zero-padded at the bottom/right to a multiple of the window before qkv, the padded tokens attended to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _to_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *size)


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


class CPE(nn.Module):
    """x + dwconv3×3(x) on tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, size):
        return x + _to_tokens(self.proj(_to_map(x, size)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # [windows, N, C]
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (C // self.num_heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class LWABlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.window = window
        self.cpe = nn.ModuleList([CPE(dim), CPE(dim)])
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x, size):
        (H, W), w, B, C = size, self.window, x.shape[0], x.shape[2]
        x = self.cpe[0](x, size)
        t = F.pad(self.norm1(x).reshape(B, H, W, C), (0, 0, 0, (-W) % w, 0, (-H) % w))
        Hp, Wp = t.shape[1:3]
        t = t.reshape(B, Hp // w, w, Wp // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
        t = self.attn(t).reshape(B, Hp // w, Wp // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        x = x + t[:, :H, :W].reshape(B, H * W, C)
        x = self.cpe[1](x, size)
        return x + self.mlp(self.norm2(x))


class LinearAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), (dim // num_heads) ** -0.5))
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = q.relu(), k.relu()
        denom = torch.clamp(q @ k.transpose(-2, -1).sum(-1, keepdim=True), min=100.0)
        out = (q @ ((k.transpose(-2, -1) @ v) * self.temperature)) / denom
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class LCM(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)

    def forward(self, x, size):
        return _to_tokens(self.conv2(self.bn(F.gelu(self.conv1(_to_map(x, size))))))


class LGABlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.cpe = nn.ModuleList([CPE(dim)])
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = LinearAttention(dim, num_heads)
        self.mlp = Mlp(dim, 4 * dim)
        self.local_mp = LCM(dim)

    def forward(self, x, size):
        x = self.cpe[0](x, size)
        x = x + self.attn(self.norm1(x))
        x = x + self.local_mp(self.norm3(x), size)
        return x + self.mlp(self.norm2(x))


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    return F.pad(x, (0, (-x.shape[3]) % multiple, 0, (-x.shape[2]) % multiple))


class ConvStem(nn.Module):
    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_chans, dim // 2, 3, 2, 1), nn.BatchNorm2d(dim // 2), nn.ReLU(),
                                  nn.Conv2d(dim // 2, dim, 3, 2, 1), nn.BatchNorm2d(dim))


class Stem(nn.Module):
    """PatchEmbed(patch 4, conv_stem '2L'): pad to ×4, conv-BN-ReLU-conv-BN, LayerNorm on the tokens."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = ConvStem(in_chans, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj.proj(_pad_to(x, 4))
        return self.norm(_to_tokens(x)), tuple(x.shape[2:])


class Downsample(nn.Module):
    """PatchEmbed(patch 2): LayerNorm on the tokens, pad to ×2, conv2×2 s2."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Conv2d(in_dim, dim, 2, 2)

    def forward(self, x, size):
        x = self.proj(_pad_to(_to_map(self.norm(x), size), 2))
        return _to_tokens(x), tuple(x.shape[2:])


class L2ViT(nn.Module):
    def __init__(self, depths=(2, 2, 6, 2), dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24), window_size=7,
                 num_classes=1000):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [Stem(3, dims[0])] + [Downsample(dims[i - 1], dims[i]) for i in range(1, len(dims))])
        self.stages = nn.ModuleList(
            nn.ModuleList(LWABlock(dims[i], num_heads[i], window_size) if j % 2 == 0
                          else LGABlock(dims[i], num_heads[i]) for j in range(depths[i]))
            for i in range(len(dims)))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)

    def forward(self, x):
        """(logits, the NCHW output of every stage: the detection backbone's maps before its output norms)."""
        features = []
        x, size = self.downsample_layers[0](x)
        for i, stage in enumerate(self.stages):
            if i:
                x, size = self.downsample_layers[i](x, size)
            for block in stage:
                x = block(x, size)
            features.append(_to_map(x, size))
        return self.head(self.norm(x).mean(1)), features
