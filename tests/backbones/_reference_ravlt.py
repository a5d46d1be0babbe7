"""RAVLT as the authors compute it, written for the parity tests from qhfan/RALA (classfication/RALA.py,
``RAVLT``; the detection backbone ``GLTA`` in detection/mmdet/models/backbones/RALA.py runs the same modules and
returns each stage's output before its downsampling).

Plain PyTorch under their state_dict keys (``patch_embed.proj.{0..10}``, ``layers.i.{RoPE.angle, blocks.j.*,
downsample.{reduction,norm}}``, ``proj``, ``norm``, ``head``), so the tests load its weights into attnzoo's
model through ``attnzoo.backbones.ravlt.checkpoint_filter_fn``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Their theta_shift: each channel pair (x0, x1) → (x0 cos − x1 sin, x1 cos + x0 sin)."""
    turned = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    return x * cos + turned * sin


class RoPE(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        angle = 1.0 / 10000 ** torch.linspace(0, 1, dim // num_heads // 4)
        self.register_buffer("angle", angle[:, None].repeat(1, 2).flatten())

    def forward(self, h: int, w: int):
        """(sin, cos) [(h w), head_dim]: the first half turns with the row index, the second with the column."""
        rows = torch.arange(h, dtype=self.angle.dtype)[:, None] * self.angle
        cols = torch.arange(w, dtype=self.angle.dtype)[:, None] * self.angle
        theta = torch.cat([rows[:, None].expand(h, w, -1), cols[None].expand(h, w, -1)], dim=-1).flatten(0, 1)
        return theta.sin(), theta.cos()


class Attention(nn.Module):
    """GateLinearAttentionNoSilu (``linear``) or VanillaSelfAttention."""

    def __init__(self, dim: int, num_heads: int, linear: bool):
        super().__init__()
        self.num_heads, self.linear = num_heads, linear
        self.qkvo = nn.Conv2d(dim, 4 * dim, 1)
        self.lepe = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, sin, cos):
        B, C, H, W = x.shape
        N, scale = H * W, (C // self.num_heads) ** -0.5
        qkvo = self.qkvo(x)
        o = qkvo[:, 3 * C:]
        lepe = self.lepe(qkvo[:, 2 * C:3 * C])
        # channels (m n d): m in q, k, v; n heads; d head_dim
        q, k, v = qkvo[:, :3 * C].reshape(B, 3, self.num_heads, C // self.num_heads, N).permute(1, 0, 2, 4, 3)
        if self.linear:
            q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
            importance = (scale * q.mean(-2, keepdim=True) @ k.transpose(-1, -2)).softmax(-1).transpose(-1, -2)
            k = k * importance * N
            z = 1 / (q @ k.mean(-2, keepdim=True).transpose(-2, -1) + 1e-6)
            kv = (_rotate(k, sin, cos).transpose(-2, -1) * N ** -0.5) @ (v * N ** -0.5)
            out = _rotate(q, sin, cos) @ kv * z
        else:
            q, k = _rotate(q, sin, cos), _rotate(k, sin, cos)
            out = (scale * q @ k.transpose(-1, -2)).softmax(-1) @ v
        out = out.transpose(-2, -1).reshape(B, C, H, W) + lepe
        return self.proj(out * o)


class ChannelsLastNorm(nn.Module):
    """Their LayerNorm2d: an ``nn.LayerNorm`` (eps 1e-6) applied channels-last."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, dim, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)

    def forward(self, x):
        x = F.gelu(self.fc1(x))
        return self.fc2(x + self.dwconv(x))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, linear: bool, mlp_ratio: float, layer_scale: float):
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.norm1, self.norm2 = ChannelsLastNorm(dim), ChannelsLastNorm(dim)
        self.attn = Attention(dim, num_heads, linear)
        self.ffn = FFN(dim, int(mlp_ratio * dim))
        self.gamma_1 = nn.Parameter(torch.full((1, dim, 1, 1), layer_scale))
        self.gamma_2 = nn.Parameter(torch.full((1, dim, 1, 1), layer_scale))

    def forward(self, x, sin, cos):
        x = x + self.pos(x)
        x = x + self.gamma_1 * self.attn(self.norm1(x), sin, cos)
        return x + self.gamma_2 * self.ffn(self.norm2(x))


class Downsample(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x):
        return self.norm(self.reduction(x))


class Layer(nn.Module):
    def __init__(self, dim, out_dim, depth, num_heads, linear, mlp_ratio, layer_scale):
        super().__init__()
        self.RoPE = RoPE(dim, num_heads)
        self.blocks = nn.ModuleList(Block(dim, num_heads, linear, mlp_ratio, layer_scale) for _ in range(depth))
        self.downsample = Downsample(dim, out_dim) if out_dim else None

    def forward(self, x):
        """(the blocks' output, the next stage's input)."""
        sin, cos = self.RoPE(*x.shape[2:])
        for block in self.blocks:
            x = block(x, sin, cos)
        return x, self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        half = dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, dim, 3, 2, 1), nn.BatchNorm2d(dim))


class RAVLT(nn.Module):
    """Their RAVLT_T by default; stages 1–2 linear ('l'), 3–4 softmax ('v'), as their ``flagss``."""

    def __init__(self, embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8),
                 mlp_ratio=3.5, layer_scales=(1.0, 1.0, 1.0, 1.0), projection=1024, num_classes=1000):
        super().__init__()
        self.patch_embed = PatchEmbed(3, embed_dims[0])
        self.layers = nn.ModuleList(
            Layer(embed_dims[i], embed_dims[i + 1] if i + 1 < len(depths) else None, depths[i], num_heads[i],
                  i < 2, mlp_ratio, layer_scales[i])
            for i in range(len(depths)))
        self.proj = nn.Conv2d(embed_dims[-1], projection, 1)
        self.norm = nn.BatchNorm2d(projection)
        self.head = nn.Conv2d(projection, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)

    def forward(self, x):
        """(logits, the NCHW output of every stage: the detection backbone's maps before its output norms)."""
        x = self.patch_embed.proj(x)
        features = []
        for layer in self.layers:
            out, x = layer(x)
            features.append(out)
        x = F.silu(self.norm(self.proj(x))).mean((2, 3), keepdim=True)
        return self.head(x).flatten(1), features
