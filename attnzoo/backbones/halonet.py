"""HaloNet: Scaling Local Self-Attention for Parameter Efficient Visual Backbones (Vaswani et al., CVPR 2021,
https://arxiv.org/abs/2103.12731), on attnzoo's halo attention kernel.

    stem → 4 × stage[ bottleneck / self-attention blocks ] → (final 1×1 conv) → pool → fc
    self-attention block = 1×1 conv → halo attention → BN-act → 1×1 conv, + shortcut

Halo attention (paper Fig. 2): the map is cut into b×b blocks; each block's queries attend to the (b + 2h)²
neighbourhood around it (the block plus a halo of h pixels), with factorized relative position logits
(:func:`attnzoo.kernels.halo_attention`).

Everything that is not attention is timm's: the ByobNet builder and blocks (``timm.models.byobnet``), the
model configs and pretrained tags (``timm.models.byoanet``), and timm's ``HaloAttn`` parameters and init. Only
the halo layer of each config is swapped for :class:`HaloAttn` below, so the model names, pretrained tags and
state_dicts are timm's and timm's published weights load unchanged. Unlike timm, an input the blocks cannot
tile is refused with a ValueError naming the nearest sizes that work.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
from timm.layers.halo_attn import HaloAttn as TimmHaloAttn
from timm.models import byoanet
from timm.models._registry import register_model
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

from ..kernels import halo_attention
from ._common import build_checked, check_image_batch

__all__ = ["HaloAttn", "HaloNet"]


class HaloAttn(TimmHaloAttn):
    """timm's ``HaloAttn`` (same arguments, parameters and init) computing its attention with
    :func:`attnzoo.kernels.halo_attention` instead of unfolding the key/value map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        if H % self.block_size or W % self.block_size:
            raise ValueError(
                f"HaloAttn: a {H}x{W} feature map cannot be cut into blocks of block_size={self.block_size}; "
                f"nearest valid sizes: {_nearest_multiples(H, self.block_size)} (height), "
                f"{_nearest_multiples(W, self.block_size)} (width)")
        heads, dqk, dv = self.num_heads, self.dim_head_qk, self.dim_head_v
        q = self.q(x)  # [B, heads·dqk, H/s, W/s], channels head-major
        Hq, Wq = q.shape[-2:]
        q = q.view(B, heads, dqk, Hq, Wq).permute(0, 1, 3, 4, 2)
        kv = self.kv(x).view(B, heads, dqk + dv, H, W).permute(0, 1, 3, 4, 2)  # per head: k channels, then v
        k, v = kv.split([dqk, dv], dim=-1)
        rel = self.pos_embed
        out = halo_attention(
            q, k, v, rel.height_rel.to(q.dtype), rel.width_rel.to(q.dtype), self.block_size, self.halo_size,
            scale=self.scale, scale_pos_embed=self.scale_pos_embed)  # [B, heads, Hq, Wq, dv]
        out = out.permute(0, 1, 4, 2, 3).reshape(B, self.dim_out_v, Hq, Wq)
        return self.pool(out)


def _nearest_multiples(size: int, m: int) -> str:
    below, above = size // m * m, -(-size // m) * m
    return f"{below} or {above}" if below else str(above)


class HaloNet(ByobNet):
    """timm's ``ByobNet`` that checks, before running, that its input size tiles every halo layer.

    A strided conv or pool (padding k // 2) turns n pixels into ceil(n / s), so a halo layer at stride r of
    the input sees ceil(size / r) pixels, which must be a multiple of its block size (and even, where it
    downsamples by an average pool, which rounds down while the shortcut rounds up).
    """

    def __init__(self, cfg: ByoModelCfg, *args, name: str = "HaloNet", **kwargs):
        super().__init__(cfg, *args, **kwargs)
        self.name = name
        # (input stride, required multiple, block size) of each halo layer
        self.halo_tiling = [
            (stride, math.lcm(layer.block_size, 2 if _pools(layer) else 1), layer.block_size)
            for stride, layer in _halo_layer_strides(self)
        ]

    def tiles(self, size: int) -> bool:
        """Whether an input height (or width) of ``size`` tiles every halo layer."""
        return all(-(-size // stride) % multiple == 0 for stride, multiple, _ in self.halo_tiling)

    def check_input(self, x: torch.Tensor) -> None:
        """:func:`._common.check_image_batch`, then whether the size tiles every halo layer."""
        check_image_batch(self, x, self.in_chans, self.name)
        if isinstance(x, torch.fx.Proxy):
            return
        for dim, size in zip(("height", "width"), x.shape[-2:], strict=True):
            if self.tiles(size):
                continue
            period = math.lcm(*(stride * multiple for stride, multiple, _ in self.halo_tiling))
            below = next((s for s in range(size - 1, 0, -1) if self.tiles(s)), None)
            above = next(s for s in range(size + 1, size + period + 1) if self.tiles(s))
            nearest = f"{below} or {above}" if below else str(above)
            blocks = sorted({b for *_, b in self.halo_tiling})
            strides = sorted({s for s, *_ in self.halo_tiling})
            raise ValueError(
                f"{self.name}: input {dim} {size} cannot be tiled by the halo attention blocks (block_size="
                f"{', '.join(map(str, blocks))} on feature maps at strides {', '.join(map(str, strides))}); "
                f"nearest valid {dim}s: {nearest}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return super().forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        self.check_input(x)
        return super().forward_intermediates(x, *args, **kwargs)


def _halo_layer_strides(model: ByobNet):
    """(stride of the input at the layer, layer) for each halo layer. The stem's strides multiply; a block
    strides once (its shortcut and main path stride in parallel), in its halo layer or before it."""
    def stride(m: nn.Module) -> int:
        s = m.stride
        return s[0] if isinstance(s, tuple) else s

    downsampling = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    reduction = math.prod(stride(m) for m in model.stem.modules() if isinstance(m, downsampling))
    for stage in model.stages:
        for block in stage:
            block_stride = max((stride(m) for m in block.modules() if isinstance(m, downsampling)), default=1)
            for layer in block.modules():
                if isinstance(layer, HaloAttn):
                    own = layer.block_stride * (2 if _pools(layer) else 1)
                    yield reduction * block_stride // own, layer
            reduction *= block_stride


def _pools(layer: HaloAttn) -> bool:
    """Whether the layer downsamples with an average pool after attention (rather than strided queries)."""
    return isinstance(layer.pool, nn.AvgPool2d)


def _with_our_halo(cfg: ByoModelCfg) -> ByoModelCfg:
    """timm's config with every 'halo' self-attention layer (model-wide or per block) replaced by ours."""
    def swap(block: ByoBlockCfg) -> ByoBlockCfg:
        return replace(block, self_attn_layer=HaloAttn) if block.self_attn_layer == "halo" else block

    blocks = tuple(tuple(map(swap, s)) if isinstance(s, tuple) else swap(s) for s in cfg.blocks)
    model_wide = HaloAttn if cfg.self_attn_layer == "halo" else cfg.self_attn_layer
    return replace(cfg, blocks=blocks, self_attn_layer=model_wide)


# model name → timm config name
_VARIANTS = {
    "halonet_h1": "halonet_h1",
    "halonet26t": "halonet26t",
    "sehalonet33ts": "sehalonet33ts",
    "halonet50ts": "halonet50ts",
    "eca_halonext26ts": "eca_halonext26ts",
    "haloregnetz_b": "haloregnetz_b",
    "lamhalobotnet50ts_256": "lamhalobotnet50ts",
    "halo2botnet50ts_256": "halo2botnet50ts",
}
model_cfgs = {name: _with_our_halo(byoanet.model_cfgs[cfg]) for name, cfg in _VARIANTS.items()}
# timm's own pretrained tags (hf_hub_id 'timm/'), read by register_model from this module
default_cfgs = {name: cfg for name, cfg in byoanet.default_cfgs.items() if name in _VARIANTS}


def _create(variant: str, pretrained: bool = False, **kwargs) -> HaloNet:
    return build_checked(
        HaloNet, variant, pretrained, model_cfg=model_cfgs[variant], name=variant,
        feature_cfg=dict(flatten_sequential=True), **kwargs)


@register_model
def halonet_h1(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet-H1 (paper Table 2 layout, halo attention in every stage); untrained."""
    return _create("halonet_h1", pretrained, **kwargs)


@register_model
def halonet26t(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet with a ResNet26-T backbone: halo attention (b8, h2) in stages 3 and 4."""
    return _create("halonet26t", pretrained, **kwargs)


@register_model
def sehalonet33ts(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet with a ResNet33-T backbone, SE in the conv blocks, SiLU."""
    return _create("sehalonet33ts", pretrained, **kwargs)


@register_model
def halonet50ts(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet with a ResNet50-T backbone, SiLU."""
    return _create("halonet50ts", pretrained, **kwargs)


@register_model
def eca_halonext26ts(pretrained: bool = False, **kwargs) -> HaloNet:
    """HaloNet with a ResNeXt26-T backbone (group size 16), ECA in the conv blocks, SiLU."""
    return _create("eca_halonext26ts", pretrained, **kwargs)


@register_model
def haloregnetz_b(pretrained: bool = False, **kwargs) -> HaloNet:
    """Halo attention (b7, h2) in a RegNetZ-B."""
    return _create("haloregnetz_b", pretrained, **kwargs)


@register_model
def lamhalobotnet50ts_256(pretrained: bool = False, **kwargs) -> HaloNet:
    """Lambda (stage 2), halo (stage 3) and bottleneck (stage 4) attention in a ResNet50-T."""
    return _create("lamhalobotnet50ts_256", pretrained, **kwargs)


@register_model
def halo2botnet50ts_256(pretrained: bool = False, **kwargs) -> HaloNet:
    """Halo (stages 2, 3) and bottleneck (stage 4) attention in a ResNet50-T."""
    return _create("halo2botnet50ts_256", pretrained, **kwargs)
