"""ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks (Saini, Jha,
Das, Mittal, Mohan, WACV 2020, https://arxiv.org/abs/2006.15102), in timm's MobileNetV1 and MobileNetV2.

The C channels are split into g equal subspaces; each learns its own spatial attention map (paper Fig. 2,
authors' ``Nandan91/ULSAM:ulsam.py``):

    per subspace x_n (C/g channels):
        m_n = ReLU(BN(DW1×1(x_n)))             depthwise 1×1 conv, with bias
        m_n = MaxPool3×3, stride 1 (m_n)
        m_n = ReLU(BN(PW1×1(m_n)))             pointwise conv to a single map, with bias
        a_n = softmax(m_n) over all H·W        one distribution over positions per subspace
        y_n = x_n · a_n + x_n

The g subspaces run batched: their depthwise convs and BNs are one depthwise conv and BN over all C channels,
their pointwise convs one conv with g groups — the same parameters as the authors' per-subspace modules
(5C + 3g). Two things of the authors' file are left out: ``momentum=0.9`` on the BNs (a TensorFlow-style
value that in PyTorch would replace 90 % of the running statistics every step; PyTorch's default 0.1 is the
same decay in TensorFlow's convention) and the global ``torch.set_default_tensor_type(torch.cuda.FloatTensor)``
at import. The softmax and ``x · a + x`` run through :func:`attnzoo.kernels.subspace_attention` (a fused
Triton kernel on CUDA).

Placement: ULSAM is a layer of its own between two blocks of the backbone. The paper's per-network positions
and subspace counts (its ImageNet tables) could not be retrieved when this was written (no copy of the paper
text was reachable; the authors' repository holds only the module), so the models below insert one ULSAM at
the end of a chosen stage with a chosen g, given explicitly in each model's ``ulsam`` argument and docstring,
and any placement can be passed as ``ulsam={stage: g, ...}``. Everything else is timm's: the EfficientNet
builder and blocks, MobileNetV1's and V2's block tables, the head and the model surface; with ULSAM taken out
the state_dict is timm's ``mobilenetv1_100`` / ``mobilenetv2_100``. No weights exist, so no pretrained tags.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models._builder import build_model_with_cfg
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, round_channels
from timm.models._registry import generate_default_cfgs, register_model
from timm.models.efficientnet import EfficientNet
from timm.models.efficientnet import _cfg as _effnet_cfg

from ..kernels import subspace_attention
from .ela import CheckedInput

__all__ = ["ULSAM", "UlsamMobileNet"]


class ULSAM(nn.Module):
    """Subspace attention over a [B, C, H, W] map with ``num_subspaces`` (g) subspaces of C/g channels."""

    def __init__(self, channels: int, num_subspaces: int, device=None, dtype=None):
        super().__init__()
        if num_subspaces < 1 or channels % num_subspaces:
            raise ValueError(f"ULSAM: `num_subspaces` must divide channels={channels}, got {num_subspaces}")
        dd = dict(device=device, dtype=dtype)
        self.num_subspaces = num_subspaces
        self.conv_dw = nn.Conv2d(channels, channels, 1, groups=channels, **dd)
        self.bn_dw = nn.BatchNorm2d(channels, **dd)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.conv_pw = nn.Conv2d(channels, num_subspaces, 1, groups=num_subspaces, **dd)  # one map per subspace
        self.bn_pw = nn.BatchNorm2d(num_subspaces, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.pool(torch.relu(self.bn_dw(self.conv_dw(x))))
        logits = torch.relu(self.bn_pw(self.conv_pw(m)))  # [B, g, H, W]
        return subspace_attention(x, logits)


class UlsamMobileNet(CheckedInput, EfficientNet):
    """timm's ``EfficientNet`` (here MobileNetV1 or V2) with a ULSAM appended to some stages.

    Args:
        ulsam: {stage index in ``blocks``: number of subspaces g}; each listed stage ends with a ULSAM on its
            output channels. The stages keep timm's module names, so features_only taps the attended maps.
        name: the model name, for error messages.
    """

    def __init__(self, *args, ulsam: dict[int, int], name: str = "UlsamMobileNet", device=None, dtype=None,
                 **kwargs):
        super().__init__(*args, device=device, dtype=dtype, **kwargs)
        self.name = name
        for stage, groups in ulsam.items():
            if not 0 <= stage < len(self.blocks):
                raise ValueError(f"{name}: `ulsam` stage {stage} does not exist; stages are 0 … "
                                 f"{len(self.blocks) - 1}")
            channels = self.blocks[stage][-1].feature_info("bottleneck")["num_chs"]  # the block output
            self.blocks[stage].append(ULSAM(channels, groups, device=device, dtype=dtype))


# MobileNetV1 (Howard et al. 2017, Table 1) and MobileNetV2 (Sandler et al. 2018, Table 2) in timm's block
# notation, as timm's mobilenetv1_100 / mobilenetv2_100 build them
_MOBILENETV1 = [["dsa_r1_k3_s1_c64"], ["dsa_r2_k3_s2_c128"], ["dsa_r2_k3_s2_c256"], ["dsa_r6_k3_s2_c512"],
                ["dsa_r2_k3_s2_c1024"]]
_MOBILENETV2 = [["ds_r1_k3_s1_c16"], ["ir_r2_k3_s2_e6_c24"], ["ir_r3_k3_s2_e6_c32"], ["ir_r4_k3_s2_e6_c64"],
                ["ir_r3_k3_s1_e6_c96"], ["ir_r3_k3_s2_e6_c160"], ["ir_r1_k3_s1_e6_c320"]]
_ARCHS = {"mobilenetv1": (_MOBILENETV1, 0), "mobilenetv2": (_MOBILENETV2, 1280)}  # table, head conv chs


def _create(variant: str, pretrained: bool, ulsam: dict[int, int], **kwargs) -> UlsamMobileNet:
    arch, num_features = _ARCHS[variant.split("_")[1]]
    return build_model_with_cfg(
        UlsamMobileNet, variant, pretrained,
        block_args=decode_arch_def(arch), num_features=num_features, stem_size=32,
        round_chs_fn=partial(round_channels, multiplier=1.0), act_layer=resolve_act_layer(kwargs, "relu6"),
        ulsam=ulsam, name=variant, feature_cfg=dict(flatten_sequential=True), **kwargs)


default_cfgs = generate_default_cfgs({
    "ulsam_mobilenetv1_100": _effnet_cfg(),
    "ulsam_mobilenetv2_100": _effnet_cfg(),
})


@register_model
def ulsam_mobilenetv1_100(pretrained: bool = False, ulsam: dict[int, int] | None = None, **kwargs):
    """MobileNetV1 with ULSAM (g=4) after the six 14×14×512 depthwise-separable layers (stage 3); untrained.
    The placement is this library's choice, not verified against the paper's table (see the module doc)."""
    return _create("ulsam_mobilenetv1_100", pretrained, {3: 4} if ulsam is None else ulsam, **kwargs)


@register_model
def ulsam_mobilenetv2_100(pretrained: bool = False, ulsam: dict[int, int] | None = None, **kwargs):
    """MobileNetV2 with ULSAM (g=4) after the 14×14×96 bottlenecks (stage 4); untrained. The placement is
    this library's choice, not verified against the paper's table (see the module doc)."""
    return _create("ulsam_mobilenetv2_100", pretrained, {4: 4} if ulsam is None else ulsam, **kwargs)
