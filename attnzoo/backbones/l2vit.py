"""L²ViT: The Linear Attention Resurrection in Vision Transformer (Zheng, https://arxiv.org/abs/2501.16182), on
attnzoo's window and linear attention kernels. Ported from the authors' ``ChuanyangZheng/L2ViT``
(``classification/models/l2vit.py``, ``block_type='mix_local_enhanced_vit'``, ``conv_stem=True``).

    stem (conv3×3 s2 → BN → ReLU → conv3×3 s2 → BN → LN) → 4 × stage[ downsample (LN → conv2×2 s2) →
        (LWA block → LGA block) × depth/2 ] → LN → avg pool → fc

    LWA (local window attention) = DaViT's spatial block: x + CPE(x) → x + WindowAttn7×7(LN(x)) → x + CPE(x)
        → x + MLP(LN(x)), CPE a 3×3 dw conv; no relative position bias, no shift.
    LGA (linear global attention) = x + CPE(x) → x + LinearAttn(LN(x)) → x + LCM(LN(x)) → x + MLP(LN(x))

LinearAttn is ReLU linear attention over all tokens of the image with a clamped normalizer and a learnable
per-head temperature τ (initialised to hd^-0.5):

    out_n = τ · φ(q_n) (Σ_m φ(k_m)ᵀ v_m) / max(φ(q_n) · Σ_m φ(k_m), 100),   φ = ReLU

(:func:`attnzoo.kernels.linear_attention`). LCM, the local concentration module, is dwconv7×7 → GELU → BN →
dwconv7×7: it gives back the local detail that linear attention's global average blurs.

Any input size: the stem and downsampling pad to even sizes as the authors' code does, and the windows are
padded as the authors pad them (zero tokens before the qkv projection, attended to), which their detection and
segmentation checkpoints were trained with; ``window_padding="masked"`` masks the padded keys out instead (see
:mod:`attnzoo.backbones.davit`). A size that tiles, such as 224 and 384, computes the same either way.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, LayerNorm2d, Mlp, calculate_drop_path_rates, trunc_normal_
from timm.models._manipulate import checkpoint_seq
from timm.models._registry import generate_default_cfgs, register_model
from timm.models.davit import ConvPosEnc

from ..kernels import linear_attention
from ._common import build_checked, takes_device_dtype
from ._pretrained import load_authors_checkpoint, split_output_norms
from ._staged import StagedNet
from .davit import DaVitBlock, WindowAttention, check_window_padding

# the eps of the LayerNorm the authors' detection backbone puts on each output (object_detection/.../l2vit.py
# builds nn.LayerNorm(dim)); read by attnzoo.det.AttnzooBackbone(out_norm=True)
DET_OUT_NORM_EPS = 1e-5

__all__ = ["L2ViT", "LinearAttention", "LocalConcentration", "LinearGlobalBlock", "checkpoint_filter_fn",
           "det_checkpoint_filter_fn"]


def _pad_to_even(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad NCHW ``x`` at the bottom and right to multiples of ``multiple``, as the authors' PatchEmbed."""
    pad_h, pad_w = (-x.shape[2]) % multiple, (-x.shape[3]) % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


class Stem(nn.Module):
    """Two stride-2 3×3 convs (4× down), then a LayerNorm over channels."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = nn.BatchNorm2d(dim // 2)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.norm = LayerNorm2d(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(_pad_to_even(x, 4))))
        return self.norm(self.norm2(self.conv2(x)))


class Downsample(nn.Module):
    """LayerNorm, then a 2×2 stride-2 conv to the next width."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = LayerNorm2d(in_dim, eps=1e-5)
        self.conv = nn.Conv2d(in_dim, out_dim, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_pad_to_even(self.norm(x), 2))


class LinearAttention(nn.Module):
    """ReLU linear attention over all tokens of an NHWC map, clamped normalizer, per-head temperature."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), (dim // num_heads) ** -0.5))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        # τ is a per-head scalar: applied to the output, it is the authors' τ on the kᵀv state
        x = linear_attention(q, k, v, "relu", clamp_min=100.0) * self.temperature
        return self.proj(x.transpose(1, 2).reshape(B, H, W, C))


class LocalConcentration(nn.Module):
    """LCM: depthwise 7×7 conv → GELU → BatchNorm → depthwise 7×7 conv, NCHW."""

    def __init__(self, dim: int, kernel_size: int = 7):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.bn(self.act(self.conv1(x))))


class LinearGlobalBlock(nn.Module):
    """LGA block, NCHW in and out. As the authors: ``norm2`` serves the MLP and ``norm3`` the LCM."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.cpe = ConvPosEnc(dim, k=3)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LinearAttention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.lcm = LocalConcentration(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cpe(x).permute(0, 2, 3, 1)  # NHWC for the norms, the attention and the MLP
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.lcm(self.norm3(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


class L2ViTStage(nn.Module):
    """Downsampling (none in the first stage, after the stem), then LWA and LGA blocks in turn."""

    def __init__(self, in_dim: int | None, dim: int, depth: int, num_heads: int, window_size: int,
                 mlp_ratio: float, drop_path: list[float], window_padding: str = "zeros"):
        super().__init__()
        self.downsample = nn.Identity() if in_dim is None else Downsample(in_dim, dim)
        self.blocks = nn.Sequential(*(
            DaVitBlock(dim, WindowAttention(dim, num_heads, window_size, padding=window_padding), mlp_ratio,
                       drop_path[j]) if j % 2 == 0
            else LinearGlobalBlock(dim, num_heads, mlp_ratio, drop_path[j])
            for j in range(depth)
        ))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class L2ViT(StagedNet):
    family = "L2ViT"

    @takes_device_dtype
    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: tuple[int, ...] = (2, 2, 6, 2),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        window_padding: str = "zeros",
    ):
        super().__init__()
        check_window_padding("L2ViT", window_padding)
        if not len(depths) == len(dims) == len(num_heads):
            raise ValueError(f"L2ViT: `depths`, `dims` and `num_heads` need one entry per stage, got {len(depths)}, "
                             f"{len(dims)} and {len(num_heads)}")
        for dim, heads in zip(dims, num_heads, strict=True):
            if dim % heads:
                raise ValueError(f"L2ViT: each of `dims` {tuple(dims)} must be divisible by its `num_heads` "
                                 f"{tuple(num_heads)}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False

        self.stem = Stem(in_chans, dims[0])
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)
        self.stages = nn.Sequential(*(
            L2ViTStage(dims[i - 1] if i else None, dims[i], depths[i], num_heads[i], window_size, mlp_ratio, dpr[i],
                       window_padding)
            for i in range(len(depths))
        ))
        self.feature_info = self.stage_feature_info(dims)
        self.norm = LayerNorm2d(dims[-1], eps=1e-5)  # before pooling, as the authors
        self.conv_head = nn.Identity()
        self.head = ClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("temperature")}

    def load_pretrained(self, path: str) -> None:
        """timm's ``custom_load`` hook: the authors' ``.pth`` (see :func:`._pretrained.load_authors_checkpoint`)."""
        load_authors_checkpoint(self, path, checkpoint_filter_fn)


# the authors' names → ours, as (prefix, replacement) in order: the first match applies
_RENAMES = (
    ("downsample_layers.0.proj.proj.0.", "stem.conv1."),
    ("downsample_layers.0.proj.proj.1.", "stem.norm1."),
    ("downsample_layers.0.proj.proj.3.", "stem.conv2."),
    ("downsample_layers.0.proj.proj.4.", "stem.norm2."),
    ("downsample_layers.0.norm.", "stem.norm."),
    ("head.", "head.fc."),
)


def checkpoint_filter_fn(state_dict: dict, model: L2ViT) -> dict[str, torch.Tensor]:
    """The authors' layout → ours, on a bare state_dict (the loaders take it out of a training checkpoint by the
    file's name: :func:`._pretrained.checkpoint_weights`); ours passes through unchanged."""
    if "stem.conv1.weight" in state_dict:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        else:
            parts = key.split(".")
            if parts[0] == "downsample_layers":  # downsample_layers.i.{norm,proj} → stages.i.downsample.{norm,conv}
                key = f"stages.{parts[1]}.downsample.{'conv' if parts[2] == 'proj' else 'norm'}.{parts[3]}"
            elif parts[0] == "stages":  # stages.i.j.* → stages.i.blocks.j.*
                rest = ".".join(parts[3:])
                rest = rest.replace("cpe.0.", "cpe1." if int(parts[2]) % 2 == 0 else "cpe.").replace(
                    "cpe.1.", "cpe2.").replace("local_mp.", "lcm.")
                key = f"stages.{parts[1]}.blocks.{parts[2]}.{rest}"
        out[key] = value
    return out


def det_checkpoint_filter_fn(state_dict: dict, model: L2ViT) -> dict[str, torch.Tensor]:
    """The backbone of the authors' detection and segmentation checkpoints → ours (what
    :class:`attnzoo.det.AttnzooBackbone` loads from an mmdet/mmseg file). Their ``L2ViT`` backbone
    (object_detection/mmdet/models/backbones/l2vit.py, semantic_segmentation/mmseg/models/backbone/l2vit.py, built
    with ``block_type='mix_local_enhanced_vit'``, ``conv_stem=True``) keeps the classification layout
    (``downsample_layers``, ``stages.i.j`` with the ``cpe`` ModuleList and ``local_mp``) without the final norm and
    head, plus an ``nn.LayerNorm`` ``norm{i}`` on each output it returns, returned as ``out_norms.{i}.*``."""
    rest, norms = split_output_norms(state_dict, r"norm(\d+)\.")
    return {**checkpoint_filter_fn(rest, model), **norms}


def _create_l2vit(variant: str, pretrained: bool = False, **kwargs) -> L2ViT:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_checked(
        L2ViT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


_RELEASE = "https://github.com/ChuanyangZheng/L2ViT/releases/download/v1.0/"


def _cfg(file: str, **kwargs) -> dict:
    # the authors' .pth files, loaded (and converted) by L2ViT.load_pretrained
    cfg = dict(url=_RELEASE + file, custom_load=True, num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
               crop_pct=0.9, interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
               first_conv="stem.conv1", classifier="head.fc", license="mit")
    return dict(cfg, **kwargs)


default_cfgs = generate_default_cfgs({
    "l2vit_tiny.in1k": _cfg("L2ViT-Tiny-checkpoint-best-ema.pth"),
    "l2vit_small.in1k": _cfg("L2ViT-Small-checkpoint-best-ema.pth"),
    "l2vit_base.in1k": _cfg("L2ViT-Base-checkpoint-best-ema.pth"),
    "l2vit_base.in22k_ft_in1k": _cfg("L2ViT-Base-22k21k-finetune-224-checkpoint-best.pth"),
    # the ImageNet-22k pre-training (21,841 classes, in the authors' own class order: their
    # classification/custom_map22kto1k.txt maps it to ImageNet-1k's, unlike ConvNeXt's map)
    "l2vit_base.in22k": _cfg("L2ViT-Base-22k-pretrain-checkpoint-best.pth", num_classes=21841),
    "l2vit_base_384.in22k_ft_in1k": _cfg("L2ViT-Base-22k21k-finetune-384-checkpoint-best.pth",
                                         input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
})

_MODELS = dict(
    l2vit_tiny=dict(depths=(2, 2, 6, 2), dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24)),
    l2vit_small=dict(depths=(2, 2, 18, 2), dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24)),
    l2vit_base=dict(depths=(2, 2, 18, 2), dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32)),
    l2vit_base_384=dict(depths=(2, 2, 18, 2), dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), window_size=12),
)


@register_model
def l2vit_tiny(pretrained: bool = False, **kwargs) -> L2ViT:
    return _create_l2vit("l2vit_tiny", pretrained, **dict(_MODELS["l2vit_tiny"], **kwargs))


@register_model
def l2vit_small(pretrained: bool = False, **kwargs) -> L2ViT:
    return _create_l2vit("l2vit_small", pretrained, **dict(_MODELS["l2vit_small"], **kwargs))


@register_model
def l2vit_base(pretrained: bool = False, **kwargs) -> L2ViT:
    return _create_l2vit("l2vit_base", pretrained, **dict(_MODELS["l2vit_base"], **kwargs))


@register_model
def l2vit_base_384(pretrained: bool = False, **kwargs) -> L2ViT:
    """L2ViT-Base with 12×12 windows, for its 384 px fine-tune."""
    return _create_l2vit("l2vit_base_384", pretrained, **dict(_MODELS["l2vit_base_384"], **kwargs))
