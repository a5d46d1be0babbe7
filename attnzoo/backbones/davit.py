"""DaViT: Dual Attention Vision Transformers (Ding et al., ECCV 2022, https://arxiv.org/abs/2204.03645), on
attnzoo's window and channel attention kernels.

    stem → 4 × stage[ downsample → (spatial block → channel block) × depth ] → pool → norm → fc
    block (paper Fig. 3) = x + CPE(x) → x + Attn(LN(x)) → x + CPE(x) → x + MLP(LN(x)),  CPE a 3×3 dw conv

The two attentions are duals of each other. Spatial window attention: tokens attend to the other tokens of
their 7×7 window, every head over its hd channels (:func:`attnzoo.kernels.window_attention`). Channel group
attention: the hd channels of a group attend to each other through an hd × hd map summed over all tokens of
the image (:func:`attnzoo.kernels.channel_attention`), so every channel sees the whole image.

Everything that is not attention is timm's (``timm.models.davit``): the stem, downsampling, position encoding,
head, checkpoint converter, configs and the model surface (``forward_intermediates``, ``reset_classifier``,
``features_only``, ...). The model names, pretrained tags and state_dict are timm's too, so timm's published
weights load unchanged.

Window padding. A size the 7×7 windows do not tile is padded as timm and the authors pad it: the normed tokens
are zero-padded before the qkv projection and the padded tokens are attended to (their keys and values are the
qkv bias), which is what every published DaViT and L²ViT checkpoint, detection and segmentation included, was
trained with. ``window_padding="masked"`` instead pads q, k, v after the projection and masks the padded keys out,
so a real token's output does not depend on the padding at all. Both are exactly timm's computation at a size
that tiles.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, calculate_drop_path_rates, get_norm_layer, to_2tuple
from timm.models import davit as timm_davit
from timm.models._registry import register_model
from timm.models.davit import ConvPosEnc, checkpoint_filter_fn
from timm.models.maxxvit import window_partition, window_reverse

from ..kernels import channel_attention, window_attention
from ._common import build_checked, check_image_batch
from ._pretrained import split_output_norms
from ._windows import pad_to_multiple, padding_key_mask

__all__ = ["DaVit", "WindowAttention", "ChannelAttention", "DaVitBlock", "WINDOW_PADDING",
           "checkpoint_filter_fn", "det_checkpoint_filter_fn"]

# the eps of the LayerNorm the authors' detection backbone (dingmyu/davit mmdet/mmdet/models/backbones/davit.py)
# puts on each output, ``norm{i}`` = nn.LayerNorm(dim); read by attnzoo.det.AttnzooBackbone(out_norm=True)
DET_OUT_NORM_EPS = 1e-5


WINDOW_PADDING = ("zeros", "masked")


def check_window_padding(model: str, window_padding: str) -> str:
    if window_padding not in WINDOW_PADDING:
        raise ValueError(f"{model}: `window_padding` takes {' or '.join(map(repr, WINDOW_PADDING))}, got "
                         f"{window_padding!r}")
    return window_padding


class WindowAttention(nn.Module):
    """Multi-head self-attention within non-overlapping windows of an NHWC map (no shift, no position bias).

    Any size, padded up to a multiple of the window at the bottom and right. ``padding="zeros"`` (timm's and the
    authors'): the input tokens are zero-padded before the qkv projection and attended to. ``padding="masked"``:
    q, k, v are zero-padded after it and the padded keys masked out, so a real token's output does not depend
    on the padding.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, qkv_bias: bool = True,
                 padding: str = "zeros", device=None, dtype=None):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = to_2tuple(window_size)
        self.padding = check_window_padding("WindowAttention", padding)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        if self.padding == "masked":
            qkv = pad_to_multiple(self.qkv(x), ws)
            mask = padding_key_mask((H, W), qkv.shape[1:3], ws, window_partition, x.device)
        else:
            qkv, mask = self.qkv(pad_to_multiple(x, ws)), None
        padded_hw = qkv.shape[1:3]
        windows = window_partition(qkv, ws)  # [B·windows, wh, ww, 3C], windows image-major
        q, k, v = windows.reshape(-1, ws[0] * ws[1], 3, self.num_heads, C // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B·windows, heads, N, hd]
        x = window_attention(q, k, v, mask=mask)  # default scale hd^-0.5, as timm
        x = window_reverse(x.transpose(1, 2).reshape(-1, *ws, C), ws, padded_hw)
        return self.proj(x[:, :H, :W])


class ChannelAttention(nn.Module):
    """Channel group attention over an NHWC map: per group of hd channels, ``q · softmax(hd^-0.5 · kᵀv)ᵀ``.

    ``v2`` is Florence-2's variant (timm's ``ChannelAttentionV2``): ``v · softmax(N^-0.5 · qᵀk)ᵀ``, the same
    op with the roles of q, k, v rotated.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, v2: bool = False, device=None,
                 dtype=None):
        super().__init__()
        self.groups = num_heads
        self.v2 = v2
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        N = H * W
        q, k, v = self.qkv(x).reshape(B, N, 3, self.groups, C // self.groups).permute(2, 0, 3, 1, 4)
        if self.v2:
            x = channel_attention(v, q, k, scale=N ** -0.5)
        else:
            x = channel_attention(q, k, v)  # [B, groups, N, hd]
        return self.proj(x.transpose(1, 2).reshape(B, H, W, C))


class DaVitBlock(nn.Module):
    """One half of a dual block, spatial or channel by its ``attn``; NCHW in and out; timm's keys."""

    def __init__(
        self,
        dim: int,
        attn: nn.Module,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        norm_layer=nn.LayerNorm,
        ffn: bool = True,
        cpe_act: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.cpe1 = ConvPosEnc(dim, k=3, act=cpe_act, **dd)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.cpe2 = ConvPosEnc(dim, k=3, act=cpe_act, **dd)
        if ffn:
            self.norm2 = norm_layer(dim, **dd)
            self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, **dd)
            self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        else:
            self.norm2 = self.mlp = self.drop_path2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cpe1(x).permute(0, 2, 3, 1)  # NHWC: LayerNorm, attention and MLP act on the channels
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = self.cpe2(x.permute(0, 3, 1, 2))
        if self.mlp is not None:
            x = x.permute(0, 2, 3, 1)
            x = (x + self.drop_path2(self.mlp(self.norm2(x)))).permute(0, 3, 1, 2)
        return x


class DaVit(timm_davit.DaVit):
    """timm's DaVit with the dual attention blocks on attnzoo kernels.

    timm's constructor builds everything that is not attention (stem, the stages' downsampling, head,
    ``feature_info``) with empty stages; the blocks are then built here into each ``stages[i].blocks``, so the
    module tree and state_dict are timm's. Takes timm's ``DaVit`` arguments, and ``window_padding``
    ("zeros", timm's, or "masked"; see the module docstring).
    """

    def __init__(
        self,
        depths: tuple[int, ...] = (1, 1, 3, 1),
        embed_dims: tuple[int, ...] = (96, 192, 384, 768),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer_cl: str = "layernorm",
        norm_eps: float = 1e-5,
        attn_types: tuple[str, ...] = ("spatial", "channel"),
        ffn: bool = True,
        cpe_act: bool = False,
        channel_attn_v2: bool = False,
        named_blocks: bool = False,
        window_padding: str = "zeros",
        drop_path_rate: float = 0.0,
        device=None,
        dtype=None,
        **kwargs,
    ):
        if len(depths) != len(embed_dims) or len(depths) != len(num_heads):
            raise ValueError(f"DaVit: `depths`, `embed_dims` and `num_heads` need one entry per stage, got "
                             f"{len(depths)}, {len(embed_dims)} and {len(num_heads)}")
        for dim, heads in zip(embed_dims, num_heads, strict=True):
            if dim % heads:
                raise ValueError(f"DaVit: each of `embed_dims` {tuple(embed_dims)} must be divisible by its "
                                 f"`num_heads` {tuple(num_heads)}")
        for attn_type in attn_types:
            if attn_type not in ("spatial", "channel"):
                raise ValueError(f"DaVit: `attn_types` takes 'spatial' and 'channel', got {attn_type!r}")
        check_window_padding("DaVit", window_padding)
        dd = dict(device=device, dtype=dtype)
        super().__init__(depths=(0,) * len(depths), embed_dims=embed_dims, num_heads=num_heads,
                         norm_eps=norm_eps, **dd, **kwargs)
        norm_layer = partial(get_norm_layer(norm_layer_cl), eps=norm_eps)

        def half(attn_type: str, dim: int, heads: int, drop_path: float) -> tuple[str, DaVitBlock]:
            if attn_type == "spatial":
                attn = WindowAttention(dim, heads, window_size, qkv_bias=qkv_bias, padding=window_padding, **dd)
            else:
                attn = ChannelAttention(dim, heads, qkv_bias=qkv_bias, v2=channel_attn_v2, **dd)
            block = DaVitBlock(dim, attn, mlp_ratio, drop_path, norm_layer, ffn=ffn, cpe_act=cpe_act, **dd)
            return f"{attn_type}_block", block

        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)
        for stage, dim, heads, rates in zip(self.stages, embed_dims, num_heads, dpr, strict=True):
            dual_blocks = [OrderedDict(half(t, dim, heads, rate) for t in attn_types) for rate in rates]
            stage.blocks = nn.Sequential(*(
                nn.Sequential(halves) if named_blocks else nn.Sequential(*halves.values())
                for halves in dual_blocks
            ))
            stage.blocks.apply(self._init_weights)

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_batch(self, x, self.in_chans, "DaVit")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return super().forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        self._check_input(x)
        return super().forward_intermediates(x, *args, **kwargs)


def det_checkpoint_filter_fn(state_dict: dict, model: DaVit) -> dict[str, torch.Tensor]:
    """The backbone of the authors' detection and segmentation checkpoints → ours (what
    :class:`attnzoo.det.AttnzooBackbone` loads from an mmdet/mmseg file). Their ``DaViT`` backbone (dingmyu/davit
    mmdet/mmdet/models/backbones/davit.py, the same in mmseg/) is the MSFT classification layout (``patch_embeds``,
    ``main_blocks``), which timm's converter maps, without the head, plus an ``nn.LayerNorm`` ``norm{i}`` on the
    output of every stage, returned as ``out_norms.{i}.*``."""
    rest, norms = split_output_norms(state_dict, r"norm(\d+)\.")
    return {**checkpoint_filter_fn(rest, model), **norms}


def _create_davit(variant: str, pretrained: bool = False, **kwargs) -> DaVit:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (1, 1, 3, 1))))))
    # Florence-2's vision tower checkpoints carry no head norm
    strict = kwargs.pop("pretrained_strict", not variant.endswith("_fl"))
    return build_checked(
        DaVit,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,  # timm's layout as is; MSFT, Florence-2 renamed
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        pretrained_strict=strict,
        **kwargs,
    )


# timm's own pretrained configs: the same tags, Hub ids ('timm/...', Florence-2's) and preprocessing
default_cfgs = timm_davit.default_cfgs


@register_model
def davit_tiny(pretrained: bool = False, **kwargs) -> DaVit:
    model_args = dict(depths=(1, 1, 3, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
    return _create_davit("davit_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def davit_small(pretrained: bool = False, **kwargs) -> DaVit:
    model_args = dict(depths=(1, 1, 9, 1), embed_dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24))
    return _create_davit("davit_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def davit_base(pretrained: bool = False, **kwargs) -> DaVit:
    model_args = dict(depths=(1, 1, 9, 1), embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32))
    return _create_davit("davit_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def davit_large(pretrained: bool = False, **kwargs) -> DaVit:
    model_args = dict(depths=(1, 1, 9, 1), embed_dims=(192, 384, 768, 1536), num_heads=(6, 12, 24, 48))
    return _create_davit("davit_large", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def davit_huge(pretrained: bool = False, **kwargs) -> DaVit:
    model_args = dict(depths=(1, 1, 9, 1), embed_dims=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64))
    return _create_davit("davit_huge", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def davit_giant(pretrained: bool = False, **kwargs) -> DaVit:
    model_args = dict(depths=(1, 1, 12, 3), embed_dims=(384, 768, 1536, 3072), num_heads=(12, 24, 48, 96))
    return _create_davit("davit_giant", pretrained=pretrained, **dict(model_args, **kwargs))


# Florence-2 vision towers: 12×12 windows, overlapping 3×3 downsampling, the v2 channel attention
_FLORENCE2 = dict(window_size=12, down_kernel_size=3, channel_attn_v2=True, named_blocks=True)


@register_model
def davit_base_fl(pretrained: bool = False, **kwargs) -> DaVit:
    model_args = dict(depths=(1, 1, 9, 1), embed_dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32),
                      **_FLORENCE2)
    return _create_davit("davit_base_fl", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def davit_huge_fl(pretrained: bool = False, **kwargs) -> DaVit:
    # the image tower of Florence-2-large
    model_args = dict(depths=(1, 1, 9, 1), embed_dims=(256, 512, 1024, 2048), num_heads=(8, 16, 32, 64),
                      **_FLORENCE2)
    return _create_davit("davit_huge_fl", pretrained=pretrained, **dict(model_args, **kwargs))
