"""ELA: Efficient Local Attention for Deep Convolutional Neural Networks (Xu & Wan, 2024,
https://arxiv.org/abs/2403.01123), in timm's ResNets and MobileNetV2.

    x_h = mean_W(x) ∈ R^{C×H}            x_w = mean_H(x) ∈ R^{C×W}                      (strip pooling)
    a_h = σ(GN(Conv1d(x_h)))             a_w = σ(GN(Conv1d(x_w)))     one Conv1d, one GN, shared by both axes
    y   = x · a_h[:, :, None] · a_w[:, None, :]

Unlike Coordinate Attention, from which it is derived, ELA keeps all C channels (no reduction), uses a 1-D
convolution along each strip instead of 1×1 convs, and GroupNorm instead of BatchNorm. Its four versions
differ only in the conv kernel, the conv groups and the GN groups (as public implementations give them):

    ELA-T  k=5  depthwise (C groups)   GN 32 groups        ELA-S  k=5  C/8 groups   GN 16 groups
    ELA-B  k=7  depthwise (C groups)   GN 16 groups        ELA-L  k=7  C/8 groups   GN 16 groups

The paper's text past its abstract was not reachable (only the abstract of https://arxiv.org/html/2403.01123v1
is stored in the reference corpus), so each fact below names its source:

    Versions      the table above is the plug-in implementations' one in public code, identical across many
                  copies (see ``shared/reference/backbones.md`` §8), not read in the paper. The abstract says only
                  "We carefully design three hyperparameters in ELA, resulting in four different versions".
                  timm's ``EfficientLocalAttn`` is a different module (separate k×1 / 1×k Conv2d per axis,
                  one-group norms, an extra SiLU).
    ResNet        on the residual branch after the last conv + BN, before the addition (timm's ``attn_layer``
                  slot of ``BasicBlock`` / ``Bottleneck``), in every block: our reading, as SE and Coordinate
                  Attention are placed. For ResNet18 the paper's count agrees: "ELA-ResNet18 ... 11.71M 1.83G"
                  (top-1 70.79), as a third party quotes the paper's ImageNet table (``wang-jing-xu/PDDR``
                  README, "the experimental data of ELA ... are sourced from the original paper"), is
                  ``ela_b_resnet18`` (11.707M; ELA-T would be 11.703M, ELA-S/L 11.77M/11.80M). Its
                  "ELA-ResNet50 ... 25.57M 4.14G" (top-1 76.63) we do not reproduce: ELA in every bottleneck,
                  after bn3 as here, adds 0.106M (ELA-T) to 0.136M (ELA-B) to timm's 25.557M, and after the 3×3
                  conv on the bottleneck width (where the authors' DeepLab backbone, ``Xuwei86/ELA_Code:
                  semantic/network/backbone/resnet.py``, puts it) 0.026M to 0.034M; 25.57M allows 0.008-0.018M.
                  Which version or placement gives it is open.
    MobileNetV2   in the inverted residuals with an expansion (not the first, t = 1, block), after the 3×3
                  depthwise conv + BN + ReLU6, before the 1×1 projection (timm's ``se_layer`` slot), i.e. on the
                  expanded channels: the ImageNet model file ``MbV2/models/mbv2_ela72.py`` of
                  ``Xuwei86/ELA_Code`` ("Engineering projects related to ELA's attention", apparently the first
                  author's; that file fixes the module to k=7, C/8 conv groups, GN 16 groups). ELA-T cannot sit
                  there: its 144-channel expansions do not split into 32 GN groups.

The strip pooling and the final double gate are memory-bound passes over the map and run through
:func:`attnzoo.kernels.ela_pool` and :func:`attnzoo.kernels.ela_gate` (fused Triton kernels on CUDA).
Everything else is timm's: ``ResNet`` with its blocks, ``EfficientNet`` with its builder, the heads and the
model surface. No weights exist, so no pretrained tags.
"""
from __future__ import annotations

import itertools
import re
from functools import partial

import torch
import torch.nn as nn
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, round_channels
from timm.models._registry import generate_default_cfgs, register_model
from timm.models.efficientnet import EfficientNet
from timm.models.efficientnet import _cfg as _effnet_cfg
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.resnet import _cfg as _resnet_cfg

from ..kernels import ela_gate, ela_pool
from ._common import CheckedInput, build_checked

__all__ = ["EfficientLocalAttention", "ElaResNet", "ElaMobileNetV2", "ELA_VERSIONS", "checkpoint_filter_fn"]

# version → (conv kernel size, channels per conv group, GroupNorm groups)
ELA_VERSIONS = {"t": (5, 1, 32), "b": (7, 1, 16), "s": (5, 8, 16), "l": (7, 8, 16)}


class EfficientLocalAttention(nn.Module):
    """The paper's ELA module on a [B, C, H, W] map (no parameters beyond one Conv1d and one GroupNorm).

    Args:
        channels: C.
        version: "t", "b", "s" or "l" (ELA-T/B/S/L), or None to give the three constants below.
        kernel_size, group_channels, norm_groups: the Conv1d kernel, the channels in each conv group (1 for
            depthwise, 8 for ELA-S/L's C/8 groups) and the GroupNorm groups.
    """

    def __init__(self, channels: int, version: str | None = "b", kernel_size: int | None = None,
                 group_channels: int | None = None, norm_groups: int | None = None, device=None, dtype=None):
        super().__init__()
        if version is not None:
            if version not in ELA_VERSIONS:
                raise ValueError(f"EfficientLocalAttention: `version` must be one of {', '.join(ELA_VERSIONS)} "
                                 f"or None, got {version!r}")
            kernel_size, group_channels, norm_groups = ELA_VERSIONS[version]
        name = f"ELA-{version.upper()}" if version else "EfficientLocalAttention"
        for arg, divisor in (("group_channels", group_channels), ("norm_groups", norm_groups)):
            if not divisor or channels % divisor:
                raise ValueError(f"{name}: `channels` must be divisible by {arg}={divisor}, got {channels}")
        if kernel_size % 2 == 0:
            raise ValueError(f"{name}: `kernel_size` must be odd (the strips keep their length), got "
                             f"{kernel_size}")
        dd = dict(device=device, dtype=dtype)
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2,
                              groups=channels // group_channels, bias=False, **dd)
        self.norm = nn.GroupNorm(norm_groups, channels, **dd)

    def gate(self, strip: torch.Tensor) -> torch.Tensor:
        """σ(GN(Conv1d(strip))) for a [B, C, L] strip."""
        return self.norm(self.conv(strip)).sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_h, x_w = ela_pool(x)
        return ela_gate(x, self.gate(x_h), self.gate(x_w))


class ElaResNet(CheckedInput, ResNet):
    """timm's ``ResNet`` with ELA in every block (through its ``attn_layer`` slot)."""

    def __init__(self, *args, name: str = "ElaResNet", **kwargs):
        super().__init__(*args, **kwargs)
        self.name = name


class ElaMobileNetV2(CheckedInput, EfficientNet):
    """timm's ``EfficientNet`` built from MobileNetV2's table with ELA in every inverted residual."""

    def __init__(self, *args, name: str = "ElaMobileNetV2", **kwargs):
        super().__init__(*args, **kwargs)
        self.name = name


def _ela_layer(version: str):
    """ELA as the attention layer of timm's blocks: ResNet blocks call it with the channels, EfficientNet
    blocks also pass their activation, which ELA, having none, does not take."""
    def layer(channels: int, act_layer=None, device=None, dtype=None) -> EfficientLocalAttention:
        return EfficientLocalAttention(channels, version, device=device, dtype=dtype)
    return layer


# the authors' MbV2/models/mbv2_ela72.py layout → ours: a block's ``conv`` Sequential, by index, for its t = 1
# (depthwise-separable) and its expanding blocks; their ELA (``custom_att``) names its GroupNorm ``gn``
_AUTHORS_DS = {"0": "conv_dw", "1": "bn1", "3": "conv_pw", "4": "bn2"}
_AUTHORS_IR = {"0": "conv_pw", "1": "bn1", "3": "conv_dw", "4": "bn2", "6": "se", "7": "conv_pwl", "8": "bn3"}
_AUTHORS_ENDS = {"features.0.0.": "conv_stem.", "features.0.1.": "bn1.", "conv.0.": "conv_head.", "conv.1.": "bn2.",
                 "classifier.1.": "classifier."}


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Loads the authors' ELA models: their MobileNetV2 (``MBV2_ELA72``: ``features.{k}.conv.{i}``, ``conv``,
    ``classifier.1``; ``features.{k}`` is the k-th inverted residual, counted through our stages) and any model
    holding their ELA module (``conv``, ``gn``), whose GroupNorm is our ``norm``. Ours passes through."""
    blocks = list(itertools.chain.from_iterable(
        (f"blocks.{s}.{j}" for j in range(len(stage))) for s, stage in enumerate(getattr(model, "blocks", []))))
    out = {}
    for key, value in state_dict.items():
        for old, new in _AUTHORS_ENDS.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        match = re.match(r"^features\.(\d+)\.conv\.(\d+)\.(.*)$", key)
        if match:
            k, index, rest = int(match[1]), match[2], match[3]
            key = f"{blocks[k - 1]}.{(_AUTHORS_DS if k == 1 else _AUTHORS_IR)[index]}.{rest}"
        out[re.sub(r"\.gn\.(weight|bias)$", r".norm.\1", key)] = value
    return out


_RESNETS = {  # depth → (block, blocks per stage), He et al. 2016, Table 1
    18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3)),
}

# MobileNetV2 (Sandler et al. 2018, Table 2) in timm's block notation, every expanding block with an attention
# slot ("se" marks the slot; the ratio is unused by ELA), the first (t = 1) block without, as the authors' code
_MOBILENETV2 = [
    ["ds_r1_k3_s1_c16"],
    ["ir_r2_k3_s2_e6_c24_se1"],
    ["ir_r3_k3_s2_e6_c32_se1"],
    ["ir_r4_k3_s2_e6_c64_se1"],
    ["ir_r3_k3_s1_e6_c96_se1"],
    ["ir_r3_k3_s2_e6_c160_se1"],
    ["ir_r1_k3_s1_e6_c320_se1"],
]


def _create_resnet(variant: str, pretrained: bool = False, **kwargs) -> ElaResNet:
    """ELA in every residual block, after the last conv + BN, before the addition."""
    version, depth = variant.split("_")[1], int(variant.rsplit("resnet", 1)[1])
    block, layers = _RESNETS[depth]
    block_args = dict(kwargs.pop("block_args", {}), attn_layer=_ela_layer(version))
    return build_checked(ElaResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, block=block,
                         layers=layers, block_args=block_args, name=variant, **kwargs)


def _create_mobilenetv2(variant: str, pretrained: bool = False, **kwargs) -> ElaMobileNetV2:
    """ELA in every inverted residual (not the first, t=1, block), after the depthwise conv, before the
    projection."""
    version = variant.split("_")[1]
    return build_checked(
        ElaMobileNetV2, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        block_args=decode_arch_def(_MOBILENETV2), num_features=1280, stem_size=32,
        round_chs_fn=partial(round_channels, multiplier=1.0), act_layer=resolve_act_layer(kwargs, "relu6"),
        se_layer=_ela_layer(version), name=variant, feature_cfg=dict(flatten_sequential=True), **kwargs)


_RESNET_NAMES = [f"ela_{v}_resnet{d}" for d in _RESNETS for v in ELA_VERSIONS]
_MOBILENET_NAMES = [f"ela_{v}_mobilenetv2_100" for v in ("b", "s", "l")]

default_cfgs = generate_default_cfgs({
    **{name: _resnet_cfg() for name in _RESNET_NAMES},
    **{name: _effnet_cfg() for name in _MOBILENET_NAMES},
})


@register_model
def ela_t_resnet18(pretrained: bool = False, **kwargs) -> ElaResNet:
    """ResNet-18 with ELA-T (Conv1d k=5, depthwise, GN 32 groups) in every residual block; untrained."""
    return _create_resnet("ela_t_resnet18", pretrained, **kwargs)


@register_model
def ela_b_resnet18(pretrained: bool = False, **kwargs) -> ElaResNet:
    """ResNet-18 with ELA-B (Conv1d k=7, depthwise, GN 16 groups) in every residual block; untrained."""
    return _create_resnet("ela_b_resnet18", pretrained, **kwargs)


@register_model
def ela_s_resnet18(pretrained: bool = False, **kwargs) -> ElaResNet:
    """ResNet-18 with ELA-S (Conv1d k=5, C/8 groups, GN 16 groups) in every residual block; untrained."""
    return _create_resnet("ela_s_resnet18", pretrained, **kwargs)


@register_model
def ela_l_resnet18(pretrained: bool = False, **kwargs) -> ElaResNet:
    """ResNet-18 with ELA-L (Conv1d k=7, C/8 groups, GN 16 groups) in every residual block; untrained."""
    return _create_resnet("ela_l_resnet18", pretrained, **kwargs)


@register_model
def ela_t_resnet34(pretrained: bool = False, **kwargs) -> ElaResNet:
    """ResNet-34 with ELA-T (Conv1d k=5, depthwise, GN 32 groups) in every residual block; untrained."""
    return _create_resnet("ela_t_resnet34", pretrained, **kwargs)


@register_model
def ela_b_resnet34(pretrained: bool = False, **kwargs) -> ElaResNet:
    """ResNet-34 with ELA-B (Conv1d k=7, depthwise, GN 16 groups) in every residual block; untrained."""
    return _create_resnet("ela_b_resnet34", pretrained, **kwargs)


@register_model
def ela_s_resnet34(pretrained: bool = False, **kwargs) -> ElaResNet:
    """ResNet-34 with ELA-S (Conv1d k=5, C/8 groups, GN 16 groups) in every residual block; untrained."""
    return _create_resnet("ela_s_resnet34", pretrained, **kwargs)


@register_model
def ela_l_resnet34(pretrained: bool = False, **kwargs) -> ElaResNet:
    """ResNet-34 with ELA-L (Conv1d k=7, C/8 groups, GN 16 groups) in every residual block; untrained."""
    return _create_resnet("ela_l_resnet34", pretrained, **kwargs)


@register_model
def ela_t_resnet50(pretrained: bool = False, **kwargs) -> ElaResNet:
    """ResNet-50 with ELA-T (Conv1d k=5, depthwise, GN 32 groups) in every residual block; untrained."""
    return _create_resnet("ela_t_resnet50", pretrained, **kwargs)


@register_model
def ela_b_resnet50(pretrained: bool = False, **kwargs) -> ElaResNet:
    """ResNet-50 with ELA-B (Conv1d k=7, depthwise, GN 16 groups) in every residual block; untrained."""
    return _create_resnet("ela_b_resnet50", pretrained, **kwargs)


@register_model
def ela_s_resnet50(pretrained: bool = False, **kwargs) -> ElaResNet:
    """ResNet-50 with ELA-S (Conv1d k=5, C/8 groups, GN 16 groups) in every residual block; untrained."""
    return _create_resnet("ela_s_resnet50", pretrained, **kwargs)


@register_model
def ela_l_resnet50(pretrained: bool = False, **kwargs) -> ElaResNet:
    """ResNet-50 with ELA-L (Conv1d k=7, C/8 groups, GN 16 groups) in every residual block; untrained."""
    return _create_resnet("ela_l_resnet50", pretrained, **kwargs)


@register_model
def ela_t_resnet101(pretrained: bool = False, **kwargs) -> ElaResNet:
    """ResNet-101 with ELA-T (Conv1d k=5, depthwise, GN 32 groups) in every residual block; untrained."""
    return _create_resnet("ela_t_resnet101", pretrained, **kwargs)


@register_model
def ela_b_resnet101(pretrained: bool = False, **kwargs) -> ElaResNet:
    """ResNet-101 with ELA-B (Conv1d k=7, depthwise, GN 16 groups) in every residual block; untrained."""
    return _create_resnet("ela_b_resnet101", pretrained, **kwargs)


@register_model
def ela_s_resnet101(pretrained: bool = False, **kwargs) -> ElaResNet:
    """ResNet-101 with ELA-S (Conv1d k=5, C/8 groups, GN 16 groups) in every residual block; untrained."""
    return _create_resnet("ela_s_resnet101", pretrained, **kwargs)


@register_model
def ela_l_resnet101(pretrained: bool = False, **kwargs) -> ElaResNet:
    """ResNet-101 with ELA-L (Conv1d k=7, C/8 groups, GN 16 groups) in every residual block; untrained."""
    return _create_resnet("ela_l_resnet101", pretrained, **kwargs)


@register_model
def ela_b_mobilenetv2_100(pretrained: bool = False, **kwargs) -> ElaMobileNetV2:
    """MobileNetV2 with ELA-B (Conv1d k=7, depthwise, GN 16 groups) in the inverted residuals; untrained."""
    return _create_mobilenetv2("ela_b_mobilenetv2_100", pretrained, **kwargs)


@register_model
def ela_s_mobilenetv2_100(pretrained: bool = False, **kwargs) -> ElaMobileNetV2:
    """MobileNetV2 with ELA-S (Conv1d k=5, C/8 groups, GN 16 groups) in the inverted residuals; untrained."""
    return _create_mobilenetv2("ela_s_mobilenetv2_100", pretrained, **kwargs)


@register_model
def ela_l_mobilenetv2_100(pretrained: bool = False, **kwargs) -> ElaMobileNetV2:
    """MobileNetV2 with ELA-L (Conv1d k=7, C/8 groups, GN 16 groups) in the inverted residuals; untrained."""
    return _create_mobilenetv2("ela_l_mobilenetv2_100", pretrained, **kwargs)
