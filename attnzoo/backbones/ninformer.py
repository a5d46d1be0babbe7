"""NiNformer: a Network in Network Transformer with a token-mixing generated gating function (Abdullah & Aydin,
2024, https://arxiv.org/abs/2403.02411), ported from the authors' ``Abdullah-88/NiNformer``.

    patchify (conv p×p, stride p) → depth × NiN block → mean over tokens → fc
    NiN block      x = x + MGU(LN(x));  x = x + FFN(LN(x))         one LayerNorm, shared by both pre-norms
    MGU(u)         = proj(u) ⊙ MixerBlock(u)                        no sigmoid: the Mixer output is the gate

The "network in network": in place of attention, a whole MLP-Mixer block (token-mixing MLP, then channel MLP,
each with its own pre-norm and residual) runs inside the block and its output gates a linear projection of the
same tokens element-wise. The token-mixing MLP has one weight per token position, so the model takes only the
token count, hence the image size, it was built for. There is no position embedding and no final norm.

``ninformer_cifar`` is the authors' only configuration (``train.py``: 32 px, patch 4, d 256, d_ffn 512 for the
FFN and both Mixer MLPs, 4 blocks, dropout 0.5). The paper gives no ImageNet model; the ``*_patch16_224`` variants
are attnzoo's own design: ViT-Ti/S/B widths and depth 12 on 196 tokens, the FFN and Mixer channel MLP at 4 d as
in ViT, the token MLP at d / 2 as in MLP-Mixer, no dropout. They have no weights.

The Mixer block, MLPs and patch embedding are timm's (``timm.models.mlp_mixer.MixerBlock``, ``timm.layers``).
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, PatchEmbed, calculate_drop_path_rates, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models._registry import generate_default_cfgs, register_model
from timm.models.mlp_mixer import MixerBlock
from torch.utils.checkpoint import checkpoint

from ._common import build_checked, check_image_batch

__all__ = ["NiNformer", "NiNBlock", "MixerGatingUnit"]


class MixerGatingUnit(nn.Module):
    """``proj(x) ⊙ MixerBlock(x)``: a linear projection gated element-wise by an MLP-Mixer block's output."""

    def __init__(self, dim: int, num_tokens: int, token_mlp_dim: int, mlp_dim: int, drop: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, **dd)
        # the authors' Mixer uses torch's default LayerNorm (eps 1e-5), not timm's Mixer default of 1e-6
        self.mixer = MixerBlock(dim, num_tokens, mlp_ratio=(token_mlp_dim / dim, mlp_dim / dim),
                                norm_layer=nn.LayerNorm, drop=drop, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.mixer(x)


class NiNBlock(nn.Module):
    """``x + MGU(LN(x))`` then ``x + FFN(LN(x))``, the same LayerNorm both times."""

    def __init__(self, dim: int, num_tokens: int, token_mlp_dim: int, mlp_dim: int, drop: float = 0.0,
                 drop_path: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm = nn.LayerNorm(dim, **dd)
        self.gate = MixerGatingUnit(dim, num_tokens, token_mlp_dim, mlp_dim, drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, mlp_dim, act_layer=nn.GELU, drop=drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.gate(self.norm(x)))
        return x + self.drop_path2(self.mlp(self.norm(x)))


class NiNformer(nn.Module):
    """An isotropic stack of NiN blocks on non-overlapping patches, for one input size."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        global_pool: str = "avg",
        embed_dim: int = 256,
        depth: int = 4,
        mlp_dim: int = 512,
        token_mlp_dim: int = 512,
        proj_drop_rate: float = 0.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"NiNformer: `global_pool` takes 'avg' or '' (no pooling), got {global_pool!r}")
        dd = dict(device=device, dtype=dtype)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, **dd)
        if self.patch_embed.img_size[0] % patch_size or self.patch_embed.img_size[1] % patch_size:
            raise ValueError(f"NiNformer: `img_size` {self.patch_embed.img_size} must be a multiple of "
                             f"`patch_size` {patch_size}")
        num_tokens = self.patch_embed.num_patches
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*(
            NiNBlock(embed_dim, num_tokens, token_mlp_dim, mlp_dim, proj_drop_rate, dpr[i], **dd)
            for i in range(depth)
        ))
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}")
                             for i in range(depth)]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed", blocks=[(r"^blocks\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"NiNformer: `global_pool` takes 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        device, dtype = self.patch_embed.proj.weight.device, self.patch_embed.proj.weight.dtype
        self.head = (nn.Linear(self.embed_dim, num_classes, device=device, dtype=dtype) if num_classes > 0
                     else nn.Identity())

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(self.patch_embed.img_size)
        check_image_batch(self, x, self.in_chans, "NiNformer", size, why=(
            f"the token-mixing MLP was built for {self.patch_embed.num_patches} tokens of a {size[0]}×{size[1]} "
            "image"))
        return self.patch_embed(x)  # [B, N, C], tokens in row-major order

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's ViT convention: the outputs of the blocks in ``indices`` (the last n if an int), as NCHW maps
        (or NLC tokens). There is no final norm, so ``norm`` changes nothing."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"NiNformer: `output_fmt` takes 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self._embed(x)
        B = x.shape[0]
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing else block(x)
            if i in take_indices:
                intermediates.append(x)
        if output_fmt == "NCHW":
            H, W = self.patch_embed.grid_size
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


# the authors' train.py layout → ours
_AUTHORS_KEYS = (
    (r"^patcher\.", "patch_embed.proj."),
    (r"^model\.(\d+)\.", r"blocks.\1."),
    (r"\.mgu\.Mixer\.token_mix\.0\.", ".gate.mixer.norm1."),
    (r"\.mgu\.Mixer\.token_mix\.2\.net\.0\.", ".gate.mixer.mlp_tokens.fc1."),
    (r"\.mgu\.Mixer\.token_mix\.2\.net\.3\.", ".gate.mixer.mlp_tokens.fc2."),
    (r"\.mgu\.Mixer\.channel_mix\.0\.", ".gate.mixer.norm2."),
    (r"\.mgu\.Mixer\.channel_mix\.1\.net\.0\.", ".gate.mixer.mlp_channels.fc1."),
    (r"\.mgu\.Mixer\.channel_mix\.1\.net\.3\.", ".gate.mixer.mlp_channels.fc2."),
    (r"\.mgu\.proj\.", ".gate.proj."),
    (r"\.ffn\.net\.0\.", ".mlp.fc1."),
    (r"\.ffn\.net\.3\.", ".mlp.fc2."),
    (r"^classifier\.", "head."),
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: NiNformer) -> dict[str, torch.Tensor]:
    """Loads a model trained with the authors' ``train.py`` (``NiNformerImageClassification``); ours as is."""
    state_dict = state_dict.get("model", state_dict)
    if "patcher.weight" not in state_dict:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _AUTHORS_KEYS:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _create_ninformer(variant: str, pretrained: bool = False, **kwargs) -> NiNformer:
    # features_only: the last three blocks (timm's ViT default), all of them in a shallower model
    out_indices = kwargs.pop("out_indices", min(3, kwargs["depth"]))
    return build_checked(
        NiNformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return dict(dict(num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.9,
                     interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), fixed_input_size=True,
                     first_conv="patch_embed.proj", classifier="head", license="bsd-3-clause"), **kwargs)


# no published weights: tag-less configs carry the preprocessing only; the token-mixing MLPs fix the token count,
# so each takes only its img_size (timm's tools read fixed_input_size and do not shrink the input)
default_cfgs = generate_default_cfgs({
    # the authors' CIFAR-10 script: Normalize((0.5,) * 3, (0.5,) * 3), 32 px, no resize
    "ninformer_cifar": _cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0),
    "ninformer_tiny_patch16_224": _cfg(),
    "ninformer_small_patch16_224": _cfg(),
    "ninformer_base_patch16_224": _cfg(),
})


@register_model
def ninformer_cifar(pretrained: bool = False, **kwargs) -> NiNformer:
    """The authors' configuration (``train.py``): d_model 256, d_ffn 512 everywhere, 4 blocks, dropout 0.5."""
    model_args = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=256, depth=4, mlp_dim=512,
                      token_mlp_dim=512, proj_drop_rate=0.5)
    return _create_ninformer("ninformer_cifar", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def ninformer_tiny_patch16_224(pretrained: bool = False, **kwargs) -> NiNformer:
    model_args = dict(img_size=224, patch_size=16, embed_dim=192, depth=12, mlp_dim=768, token_mlp_dim=96)
    return _create_ninformer("ninformer_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def ninformer_small_patch16_224(pretrained: bool = False, **kwargs) -> NiNformer:
    model_args = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, mlp_dim=1536, token_mlp_dim=192)
    return _create_ninformer("ninformer_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def ninformer_base_patch16_224(pretrained: bool = False, **kwargs) -> NiNformer:
    model_args = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, mlp_dim=3072, token_mlp_dim=384)
    return _create_ninformer("ninformer_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))
