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

Placement. The paper's PDF text was not reachable; its tables are in the authors' WACV slides and poster
(``Nandan91/ULSAM``: ``ULSAM_Slides_WACV2020.pdf`` slides 7–9, ``ULSAM_Poster_WACV2020.pdf`` "Results on
ImageNet 1K", "Fine-grained classification", "Ablation study on ImageNet 1K"). Their rows are of two kinds:
ULSAM added to the network ("1.0 MV1 + ULSAM 4.2M 569.2M", "MV2 + ULSAM 3.4M 300.01M") and ULSAM in place of
layers, which is where the abstract's "≈13% and ≈25% reduction in both the FLOPs and parameter counts of
MobileNet-V2" comes from. The slides do not name the replaced layers, but the counts do, block for block:

    MobileNetV1  "MV1 + ULSAM (g = 4) 3.9M 517M" (vanilla 4.2M 569M; ImageNet top-1 70.43 vs 70.65, and the
                 layout of its fine-grained table): −52M MACs is one 14×14×512 depthwise-separable layer
                 (dw 3×3 + pw 512→512 at 14×14 = 52.3M MACs, 0.27M params).
    MobileNetV2  (vanilla 3.4M 300M) −22.69M MACs per 14×14×96 bottleneck, −15.48M per 7×7×160 one, −10.31M
                 per 14×14×64 one. ImageNet ablation "MV2 + ULSAM (g = 4) 2.96M 261.88M 71.52" (the abstract's
                 ≈13 % and +0.27 %): one 96 and one 160 bottleneck replaced. "2.77M 269.07M": two 160.
                 "2.54M 223.77M" (≈25 %): two 96 and two 160. The fine-grained (Birds) table also has one 96
                 (277.34M), one 160 (284.54M), one 96 and one 64 (267.06M); its "2.54M 224.16M" row is 0.39M
                 off the ablation's 223.77M, unexplained.

Our FLOPs for these configurations are the paper's plus one constant (timm's MobileNetV2 has 300.77M MACs,
the paper prints 300M), to the printed 0.01M; its parameter counts are ~0.1M below timm's throughout (vanilla
3.4M vs 3.50M), the reductions agree (see ``tests/backbones/test_ulsam.py``). Which of the equal,
shape-keeping blocks of a stage is replaced (MobileNetV1 has five 14×14×512 layers, MobileNetV2 two 96 and
two 160 bottlenecks with a skip) the tables do not say: the models below replace the last one of the stage,
our reading. Any placement can be given as ``ulsam={(stage, block): g}``, replacing those blocks, or with
``replace=False`` adding a ULSAM after each. Everything else is timm's: the EfficientNet builder and blocks,
MobileNetV1's and V2's block tables, the head and the model surface. No weights exist, so no pretrained tags.
"""
from __future__ import annotations

import re
from functools import partial

import torch
import torch.nn as nn
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, round_channels
from timm.models._registry import generate_default_cfgs, register_model
from timm.models.efficientnet import EfficientNet
from timm.models.efficientnet import _cfg as _effnet_cfg

from ..kernels import subspace_attention
from ._common import CheckedInput, build_checked

__all__ = ["ULSAM", "UlsamMobileNet", "checkpoint_filter_fn"]


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
    """timm's ``EfficientNet`` (here MobileNetV1 or V2) with ULSAMs in place of, or after, some blocks.

    Args:
        ulsam: {(stage, block): number of subspaces g}, indices into ``blocks``.
        replace: True: each listed block is replaced by a ULSAM on its channels (the block must keep its input's
            shape: stride 1, as many channels out as in). False: a ULSAM is added after each listed block.
        name: the model name, for error messages.

    The stages keep timm's module names, so features_only taps the same points.
    """

    def __init__(self, *args, ulsam: dict[tuple[int, int], int], replace: bool = True, name: str = "UlsamMobileNet",
                 device=None, dtype=None, **kwargs):
        super().__init__(*args, device=device, dtype=dtype, **kwargs)
        self.name = name
        for stage, block in ulsam:  # validate everything before changing anything
            if not 0 <= stage < len(self.blocks) or not 0 <= block < len(self.blocks[stage]):
                raise ValueError(f"{name}: `ulsam` block ({stage}, {block}) does not exist; the stages have "
                                 f"{[len(s) for s in self.blocks]} blocks")
            if replace and not _keeps_shape(self.blocks[stage][block]):
                raise ValueError(f"{name}: `ulsam` block ({stage}, {block}) changes its input's shape, so a "
                                 "ULSAM cannot replace it (pass replace=False to add one after it)")
        for (stage, block), groups in sorted(ulsam.items(), reverse=True):  # later blocks first: indices hold
            channels = self.blocks[stage][block].feature_info("bottleneck")["num_chs"]  # the block output
            attn = ULSAM(channels, groups, device=device, dtype=dtype)
            if replace:
                self.blocks[stage][block] = attn
            else:
                self.blocks[stage].insert(block + 1, attn)


def _keeps_shape(block: nn.Module) -> bool:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    out_chs = block.feature_info("bottleneck")["num_chs"]
    return convs[0].in_channels == out_chs and all(c.stride == (1, 1) for c in convs)


# the authors' per-subspace modules (ulsam.py: ``subspaces.{n}.{conv_dws, bn_dws, conv_point, bn_point}``) → ours
_AUTHORS_KEY = re.compile(r"^(.*)\.subspaces\.(\d+)\.(conv_dws|bn_dws|conv_point|bn_point)\.(\w+)$")
_AUTHORS_NAMES = {"conv_dws": "conv_dw", "bn_dws": "bn_dw", "conv_point": "conv_pw", "bn_point": "bn_pw"}


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Loads a model whose ULSAMs are the authors' ``ULSAM`` modules (one ``SubSpace`` per group, in
    ``subspaces``): their per-subspace tensors are concatenated, in subspace order, into our batched ones (the
    subspace counters ``num_batches_tracked`` agree, the first is kept). Other keys, and ours, pass through."""
    out, parts = {}, {}
    for key, value in state_dict.items():
        match = _AUTHORS_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        prefix, n, module, name = match.groups()
        parts.setdefault(f"{prefix}.{_AUTHORS_NAMES[module]}.{name}", {})[int(n)] = value
    for key, by_subspace in parts.items():
        values = [by_subspace[n] for n in sorted(by_subspace)]
        out[key] = values[0] if key.endswith("num_batches_tracked") else torch.cat(values)
    return out


# MobileNetV1 (Howard et al. 2017, Table 1) and MobileNetV2 (Sandler et al. 2018, Table 2) in timm's block
# notation, as timm's mobilenetv1_100 / mobilenetv2_100 build them
_MOBILENETV1 = [["dsa_r1_k3_s1_c64"], ["dsa_r2_k3_s2_c128"], ["dsa_r2_k3_s2_c256"], ["dsa_r6_k3_s2_c512"],
                ["dsa_r2_k3_s2_c1024"]]
_MOBILENETV2 = [["ds_r1_k3_s1_c16"], ["ir_r2_k3_s2_e6_c24"], ["ir_r3_k3_s2_e6_c32"], ["ir_r4_k3_s2_e6_c64"],
                ["ir_r3_k3_s1_e6_c96"], ["ir_r3_k3_s2_e6_c160"], ["ir_r1_k3_s1_e6_c320"]]
_ARCHS = {"mobilenetv1": (_MOBILENETV1, 0), "mobilenetv2": (_MOBILENETV2, 1280)}  # table, head conv chs


def _create(variant: str, pretrained: bool, ulsam: dict[tuple[int, int], int], **kwargs) -> UlsamMobileNet:
    arch, num_features = _ARCHS[variant.split("_")[1]]
    return build_checked(
        UlsamMobileNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        block_args=decode_arch_def(arch), num_features=num_features, stem_size=32,
        round_chs_fn=partial(round_channels, multiplier=1.0), act_layer=resolve_act_layer(kwargs, "relu6"),
        ulsam=ulsam, name=variant, feature_cfg=dict(flatten_sequential=True), **kwargs)


default_cfgs = generate_default_cfgs({
    "ulsam_mobilenetv1_100": _effnet_cfg(),
    "ulsam_mobilenetv2_100": _effnet_cfg(),
})


@register_model
def ulsam_mobilenetv1_100(pretrained: bool = False, ulsam: dict[tuple[int, int], int] | None = None, **kwargs):
    """MobileNetV1 with a ULSAM (g=4) in place of one 14×14×512 depthwise-separable layer (the last of
    stage 3), the paper's "MV1 + ULSAM (g = 4) 3.9M 517M"; untrained. Which of the five layers is our reading."""
    return _create("ulsam_mobilenetv1_100", pretrained, {(3, 5): 4} if ulsam is None else ulsam, **kwargs)


@register_model
def ulsam_mobilenetv2_100(pretrained: bool = False, ulsam: dict[tuple[int, int], int] | None = None, **kwargs):
    """MobileNetV2 with ULSAMs (g=4) in place of one 14×14×96 and one 7×7×160 bottleneck (the last of stages 4
    and 5), the paper's ImageNet "MV2 + ULSAM (g = 4) 2.96M 261.88M"; untrained. Which blocks of those stages
    is our reading."""
    return _create("ulsam_mobilenetv2_100", pretrained, {(4, 2): 4, (5, 2): 4} if ulsam is None else ulsam,
                   **kwargs)
