"""Sparsifiner as the authors compute it at inference, written for the parity tests from lim142857/Sparsifiner
(src/models/sparsifiner.py, ``Sparsifiner`` with ``MaskPredictor``; the default yaml: BASIS_COEF.USE_TOPK with
TOPK 8, ATTN_SCORE.USE_TOPK, no token pruning): a DeiT whose attention keeps, per patch query, the top
ceil(keep_rate · N) keys of the predictor's low-rank approximation, as a dense softmax with the other logits at
-inf (their code has no sparse kernel); the cls row stays dense.

Plain PyTorch under their state_dict keys (DeiT's plus ``blocks.i.attn.mask_predictor.{proj_c_q, proj_c_k,
proj_n, proj_back_n}``), so the tests load its weights into attnzoo's model through
``attnzoo.backbones.sparsifiner.checkpoint_filter_fn``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MaskPredictor(nn.Module):
    def __init__(self, dim, num_heads, num_tokens, keep_rate, basis_topk, reduce_n_factor, reduce_c_factor,
                 basis_threshold):
        super().__init__()
        head_dim, reduced_n = dim // num_heads, num_tokens // reduce_n_factor
        self.scale = num_heads ** -0.5  # their code: num_heads, not head_dim
        self.basis_topk, self.basis_threshold = basis_topk, basis_threshold
        self.attn_budget = math.ceil(keep_rate * num_tokens)
        self.proj_c_q = nn.Linear(head_dim, head_dim // reduce_c_factor)
        self.proj_c_k = nn.Linear(head_dim, head_dim // reduce_c_factor)
        self.proj_n = nn.Parameter(0.02 * torch.randn(num_tokens, reduced_n))
        self.proj_back_n = nn.Parameter(0.02 * torch.randn(num_tokens, reduced_n))

    def forward(self, q, k):
        """The [B, H, N, N] 0/1 mask of the kept keys, the cls row all ones."""
        B, H, N, _ = q.shape
        k = self.proj_c_k(k).permute(0, 1, 3, 2) @ self.proj_n
        basis = F.threshold(self.proj_back_n.permute(1, 0).abs(), self.basis_threshold, 0.0)
        coef = ((self.proj_c_q(q) @ k) * self.scale)[..., 1:, :].softmax(-1)
        top, top_index = coef.topk(self.basis_topk, sorted=False)
        coef = torch.zeros_like(coef).scatter_(-1, top_index, top)
        keep = (coef @ basis).topk(self.attn_budget, sorted=False)[1]
        mask = torch.zeros(B, H, N - 1, N).scatter_(-1, keep, 1.0)
        return torch.cat([torch.ones(B, H, 1, N), mask], dim=2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, num_tokens, **predictor):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mask_predictor = MaskPredictor(dim, num_heads, num_tokens, **predictor)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = self.mask_predictor(q, k)
        attn = (q @ k.transpose(-2, -1)) * (C // self.num_heads) ** -0.5
        attn = attn.masked_fill(~mask.bool(), float("-inf")).softmax(-1).nan_to_num()
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, num_tokens, **predictor):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, num_tokens, **predictor)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)


class Sparsifiner(nn.Module):
    """Their DeiT-S configuration by default, with the default yaml's predictor."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=1000,
                 keep_rate=0.25, basis_topk=8, reduce_n_factor=6, reduce_c_factor=2, basis_threshold=0.02):
        super().__init__()
        num_tokens = (img_size // patch_size) ** 2 + 1
        predictor = dict(keep_rate=keep_rate, basis_topk=basis_topk, reduce_n_factor=reduce_n_factor,
                         reduce_c_factor=reduce_c_factor, basis_threshold=basis_threshold)
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, num_tokens, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, num_tokens, **predictor) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)

    def forward(self, x):
        """(logits, every block's output patches as an NCHW map)."""
        patches = self.patch_embed.proj(x)
        B, C, H, W = patches.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), patches.flatten(2).transpose(1, 2)], 1) + self.pos_embed
        maps = []
        for block in self.blocks:
            x = block(x)
            maps.append(x[:, 1:].transpose(1, 2).reshape(B, C, H, W))
        return self.head(self.norm(x)[:, 0]), maps
