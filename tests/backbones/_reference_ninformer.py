"""NiNformer as the authors compute it, written for the parity tests from Abdullah-88/NiNformer (ninformer.py, and
train.py's ``NiNformerImageClassification``): patchify conv → NiN blocks → mean over tokens → linear.

Plain PyTorch under their state_dict keys (``patcher``, ``model.i.{norm, mgu.proj, mgu.Mixer.token_mix.{0, 2.net.
{0,3}}, mgu.Mixer.channel_mix.{0, 1.net.{0,3}}, ffn.net.{0,3}}``, ``classifier``), so the tests load its weights
into attnzoo's model through ``attnzoo.backbones.ninformer.checkpoint_filter_fn``. Eval mode: dropout is off.
"""
from __future__ import annotations

from torch import nn


class Transpose(nn.Module):
    """Their einops ``Rearrange('b n d -> b d n')`` (and back): a parameterless slot in their Sequential."""

    def forward(self, x):
        return x.transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.5), nn.Linear(hidden, dim),
                                 nn.Dropout(0.5))

    def forward(self, x):
        return self.net(x)


class MixerBlock(nn.Module):
    def __init__(self, dim: int, num_tokens: int, hidden: int):
        super().__init__()
        self.token_mix = nn.Sequential(nn.LayerNorm(dim), Transpose(), FeedForward(num_tokens, hidden), Transpose())
        self.channel_mix = nn.Sequential(nn.LayerNorm(dim), FeedForward(dim, hidden))

    def forward(self, x):
        x = x + self.token_mix(x)
        return x + self.channel_mix(x)


class MixerGatingUnit(nn.Module):
    def __init__(self, dim: int, num_tokens: int, hidden: int):
        super().__init__()
        self.Mixer = MixerBlock(dim, num_tokens, hidden)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(x) * self.Mixer(x)


class NiNBlock(nn.Module):
    """One LayerNorm, ``norm``, before both the gating unit and the FFN."""

    def __init__(self, dim: int, hidden: int, num_tokens: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mgu = MixerGatingUnit(dim, num_tokens, hidden)
        self.ffn = FeedForward(dim, hidden)

    def forward(self, x):
        x = x + self.mgu(self.norm(x))
        return x + self.ffn(self.norm(x))


class NiNformerImageClassification(nn.Module):
    """Their train.py defaults: 32×32 images, patch 4 (64 tokens), d_model 256, d_ffn 512, 4 blocks, 10 classes."""

    def __init__(self, image_size=32, patch_size=4, num_classes=10, d_model=256, d_ffn=512, num_layers=4):
        super().__init__()
        num_tokens = (image_size // patch_size) ** 2
        self.model = nn.Sequential(*(NiNBlock(d_model, d_ffn, num_tokens) for _ in range(num_layers)))
        self.patcher = nn.Conv2d(3, d_model, patch_size, patch_size)
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, x):
        """(logits, every block's output as an NCHW map over the patch grid)."""
        patches = self.patcher(x)
        B, C, H, W = patches.shape
        x = patches.permute(0, 2, 3, 1).reshape(B, H * W, C)
        maps = []
        for block in self.model:
            x = block(x)
            maps.append(x.transpose(1, 2).reshape(B, C, H, W))
        return self.classifier(x.mean(1)), maps
