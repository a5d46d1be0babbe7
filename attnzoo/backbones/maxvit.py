"""MaxViT: Multi-Axis Vision Transformer (Tu et al., ECCV 2022, https://arxiv.org/abs/2204.01697), on
attnzoo's window attention.

    stem → 4 × stage[ MaxViT block × depth ] → pool → head
    MaxViT block (paper Fig. 2) = MBConv → block attention + FFN → grid attention + FFN

Block attention attends within each P×P window; grid attention within each G×G grid cell strided over the
whole map (a dilated, global mixing). Both are the same softmax attention over short sequences with a
relative position bias, so both run through :func:`attnzoo.kernels.window_attention`, the bias passed as
``bias`` rather than added into the logits.

Everything that is not attention is timm's (``timm.models.maxxvit``): the configs, stem, MBConv, heads, the
window / grid partitions, the relative position modules and the model surface (``forward_intermediates``,
``reset_classifier``, ...). The model names, pretrained tags and state_dict are timm's too, so timm's
published weights load unchanged. Unlike timm, any input size works: the map is padded up to the partition
size, the padded keys are masked out and the output cropped back; a size that already tiles takes exactly
timm's computation.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from timm.layers import (
    ClassifierHead,
    NormMlpClassifierHead,
    calculate_drop_path_rates,
    extend_tuple,
    get_norm_layer,
    to_2tuple,
)
from timm.models import maxxvit, register_model
from timm.models._manipulate import checkpoint_seq, named_apply
from timm.models.maxxvit import (
    AttentionCl,
    MaxxVit,
    MaxxVitCfg,
    MaxxVitConvCfg,
    MaxxVitTransformerCfg,
    MbConvBlock,
    checkpoint_filter_fn,
    grid_partition,
    grid_reverse,
    model_cfgs,
    window_partition,
    window_reverse,
)
from torch import nn

from ..kernels import window_attention
from ._common import build_checked, check_image_batch
from ._windows import pad_to_multiple, padding_key_mask

__all__ = ["MaxVit", "MaxVitBlock", "ParallelMaxVitBlock", "PartitionAttention", "checkpoint_filter_fn"]

Partition = Callable[[torch.Tensor, list[int]], torch.Tensor]
Reverse = Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]


def _attend(attn: AttentionCl, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """timm's multi-head attention ``attn`` (its qkv, relative position bias and proj) over NHWC ``windows``
    [B', h, w, C], the softmax attention through ``window_attention``."""
    B, h, w, C = windows.shape
    N, heads, dim_head = h * w, attn.num_heads, attn.dim_head
    qkv = attn.qkv(windows.reshape(B, N, C))
    if attn.head_first:  # channels (head, [q|k|v], dim_head)
        q, k, v = qkv.view(B, N, heads, 3 * dim_head).transpose(1, 2).chunk(3, dim=3)
    else:  # channels ([q|k|v], head, dim_head), as TF's concatenated q, k, v projections
        q, k, v = qkv.view(B, N, 3, heads, dim_head).permute(2, 0, 3, 1, 4).unbind(0)
    bias = attn.rel_pos.get_bias() if attn.rel_pos is not None else None  # [H, N, N] or [1, H, N, N]
    out = window_attention(q, k, v, bias=bias, mask=mask, scale=attn.scale)
    out = out.transpose(1, 2).reshape(B, h, w, heads * dim_head)
    return attn.proj_drop(attn.proj(out))


def partitioned_attention(
    attn: AttentionCl, x: torch.Tensor, size: tuple[int, int], partition: Partition, reverse: Reverse
) -> torch.Tensor:
    """``attn`` within each partition (window or grid cell) of NHWC ``x``, any H and W.

    The map is zero-padded at the bottom and right up to a multiple of ``size``, the padded tokens are masked
    out as keys (so they take no weight) and the padded rows and columns cropped off the output.
    """
    H, W = x.shape[1:3]
    x = pad_to_multiple(x, size)
    padded_hw = x.shape[1:3]
    mask = padding_key_mask((H, W), padded_hw, size, partition, x.device)  # [windows per image, N] or None
    out = _attend(attn, partition(x, list(size)), mask)
    return reverse(out, list(size), list(padded_hw))[:, :H, :W]


class PartitionAttention(maxxvit.PartitionAttentionCl):
    """Block (window) or grid attention + FFN, channels-last: timm's layers, attention through attnzoo."""

    def _partition_attn(self, x: torch.Tensor) -> torch.Tensor:
        if self.partition_block:
            return partitioned_attention(self.attn, x, self.partition_size, window_partition, window_reverse)
        return partitioned_attention(self.attn, x, self.partition_size, grid_partition, grid_reverse)


class ParallelPartitionAttention(maxxvit.ParallelPartitionAttention):
    """timm's experimental parallel variant: block and grid attention side by side on half the channels each,
    concatenated, then one FFN."""

    def _partition_attn(self, x: torch.Tensor) -> torch.Tensor:
        size = self.partition_size
        x_window = partitioned_attention(self.attn_block, x, size, window_partition, window_reverse)
        x_grid = partitioned_attention(self.attn_grid, x, size, grid_partition, grid_reverse)
        return torch.cat([x_window, x_grid], dim=-1)


class MaxVitBlock(nn.Module):
    """MBConv → block attention + FFN → grid attention + FFN (paper Fig. 2)."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        stride: int,
        conv_cfg: MaxxVitConvCfg,
        transformer_cfg: MaxxVitTransformerCfg,
        drop_path: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv = MbConvBlock(dim, dim_out, stride=stride, cfg=conv_cfg, drop_path=drop_path, **dd)
        attn_kwargs = dict(dim=dim_out, cfg=transformer_cfg, drop_path=drop_path, **dd)
        self.attn_block = PartitionAttention(partition_type="block", **attn_kwargs)
        self.attn_grid = PartitionAttention(partition_type="grid", **attn_kwargs)

    def init_weights(self, scheme: str = "") -> None:
        named_apply(partial(maxxvit._init_conv, scheme=scheme), self.conv)
        for attn in (self.attn_block, self.attn_grid):
            named_apply(partial(maxxvit._init_transformer, scheme=scheme), attn)

    def set_input_size(self, feat_size, window_size: tuple[int, int], grid_size: tuple[int, int]) -> None:
        """Change the partition sizes (and resize the relative position tables); ``feat_size`` is unused."""
        self.attn_block.set_partition_size(window_size)
        self.attn_grid.set_partition_size(grid_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).permute(0, 2, 3, 1)  # NCHW → NHWC for the attention
        x = self.attn_grid(self.attn_block(x))
        return x.permute(0, 3, 1, 2)


class ParallelMaxVitBlock(nn.Module):
    """timm's experimental ``maxvit_tiny_pm`` block: two MBConvs → parallel block + grid attention → FFN."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        stride: int,
        conv_cfg: MaxxVitConvCfg,
        transformer_cfg: MaxxVitTransformerCfg,
        drop_path: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv = nn.Sequential(
            MbConvBlock(dim, dim_out, stride=stride, cfg=conv_cfg, drop_path=drop_path, **dd),
            MbConvBlock(dim_out, dim_out, cfg=conv_cfg, drop_path=drop_path, **dd),
        )
        self.attn = ParallelPartitionAttention(dim=dim_out, cfg=transformer_cfg, drop_path=drop_path, **dd)

    def init_weights(self, scheme: str = "") -> None:
        named_apply(partial(maxxvit._init_conv, scheme=scheme), self.conv)
        named_apply(partial(maxxvit._init_transformer, scheme=scheme), self.attn)

    def set_input_size(self, feat_size, window_size: tuple[int, int], grid_size: tuple[int, int]) -> None:
        """Change the partition size, one for both attentions here; ``feat_size`` is unused."""
        if to_2tuple(window_size) != to_2tuple(grid_size):
            raise ValueError(
                f"ParallelMaxVitBlock: `window_size` {window_size} and `grid_size` {grid_size} must be equal")
        self.attn.set_partition_size(window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).permute(0, 2, 3, 1)
        return self.attn(x).permute(0, 3, 1, 2)


class MaxVitStage(nn.Module):
    """``depth`` MaxViT blocks, the first one downsampling ×2 (in its MBConv)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        depth: int,
        block_types: str | tuple[str, ...],
        conv_cfg: MaxxVitConvCfg,
        transformer_cfg: MaxxVitTransformerCfg,
        drop_path: list[float],
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.grad_checkpointing = False
        blocks = []
        for i, block_type in enumerate(extend_tuple(block_types, depth)):
            block_cls = ParallelMaxVitBlock if block_type == "PM" else MaxVitBlock
            blocks.append(block_cls(
                in_chs if i == 0 else out_chs, out_chs, stride=2 if i == 0 else 1, conv_cfg=conv_cfg,
                transformer_cfg=transformer_cfg, drop_path=drop_path[i], device=device, dtype=dtype,
            ))
        self.blocks = nn.Sequential(*blocks)

    def set_input_size(self, feat_size, window_size: tuple[int, int], grid_size: tuple[int, int]) -> None:
        for block in self.blocks:
            block.set_input_size(feat_size, window_size, grid_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class Stem(maxxvit.Stem):
    """timm's stem (3×3 s2 conv → norm-act → 3×3 conv), checking the input it is given."""

    def __init__(self, *args, model_name: str, size_multiple: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_name = model_name
        self.size_multiple = size_multiple  # the stem's output size must be a multiple of this

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(self, x, self.conv1.in_channels, self.model_name)
        if isinstance(x, torch.fx.Proxy):
            return super().forward(x)
        H, W = x.shape[-2:]
        m = self.size_multiple
        if m > 1 and ((H + 1) // 2 % m or (W + 1) // 2 % m):
            raise ValueError(
                f"{self.model_name}: the input `x` must have a height and width that are multiples of "
                f"{2 * m} (or one less): its MBConv shortcuts pool 2×2 without padding, so every stage "
                f"needs an even size; got {H}×{W}")
        return super().forward(x)


def _check_cfg(model_name: str, cfg: MaxxVitCfg, transformer_cfg: MaxxVitTransformerCfg) -> None:
    """Reject the timm options that this MaxViT does not implement (they belong to CoAtNet and MaxxViT)."""
    for i, types in enumerate(cfg.block_type):
        if any(t not in ("M", "PM") for t in ((types,) if isinstance(types, str) else types)):
            raise ValueError(f"{model_name}: `block_type` must be 'M' (MaxViT) or 'PM' (parallel MaxViT) "
                             f"blocks, got {types!r} for stage {i}; CoAtNet stages stay with timm")
    unsupported = {
        "conv_block_type": (cfg.conv_cfg.block_type, "mbconv"),
        "transformer_use_nchw_attn": (transformer_cfg.use_nchw_attn, False),
        "transformer_no_block_attn": (transformer_cfg.no_block_attn, False),
        "transformer_attn_drop": (transformer_cfg.attn_drop, 0.0),  # window_attention has no attn dropout
    }
    for name, (value, expected) in unsupported.items():
        if value != expected:
            raise ValueError(f"{model_name}: `{name}` must be {expected!r} here, got {value!r}")


class MaxVit(MaxxVit):
    """MaxViT with its block and grid attention on attnzoo's ``window_attention``.

    A subclass of timm's ``MaxxVit`` for its model surface (``forward_features``, ``forward_head``,
    ``forward_intermediates``, ``reset_classifier``, ``set_grad_checkpointing``, ``set_input_size``, ...),
    with the same attributes and state_dict. The constructor is this one, not timm's, because timm's builds
    its own stage classes.

    Args:
        cfg: a timm ``MaxxVitCfg`` (``timm.models.maxxvit.model_cfgs``) with MaxViT blocks.
        img_size: the input size the window and grid sizes derive from (img_size / 32); other sizes are
            padded.
        model_name: the name errors are reported under.
        **kwargs: ``transformer_*`` / ``conv_*`` / top-level overrides of ``cfg``, as in timm.
    """

    def __init__(
        self,
        cfg: MaxxVitCfg,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        model_name: str = "MaxVit",
        device=None,
        dtype=None,
        **kwargs,
    ):
        nn.Module.__init__(self)
        dd = dict(device=device, dtype=dtype)
        img_size = to_2tuple(img_size)
        if kwargs:
            cfg = maxxvit._overlay_kwargs(cfg, **kwargs)
        transformer_cfg = maxxvit.cfg_window_size(cfg.transformer_cfg, img_size)
        _check_cfg(model_name, cfg, transformer_cfg)
        self.img_size = img_size
        # timm's cfgs mark MaxViT fixed-size (its windows are); this one pads, so timm's tools may resize the input
        self._traits = {"fixed_input_size": False}
        self.partition_ratio = transformer_cfg.partition_ratio
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.embed_dim = cfg.embed_dim[-1]
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        conv_cfg = cfg.conv_cfg
        self.stem = Stem(
            in_chans, cfg.stem_width, padding=conv_cfg.padding, bias=cfg.stem_bias,
            act_layer=conv_cfg.act_layer, norm_layer=conv_cfg.norm_layer, norm_eps=conv_cfg.norm_eps,
            model_name=model_name,
            # 'same' padding downsamples any size; otherwise each stride-2 MBConv needs an even one
            size_multiple=1 if conv_cfg.padding == "same" else 2 ** len(cfg.depths), **dd,
        )
        self.feature_info = [dict(num_chs=self.stem.out_chs, reduction=self.stem.stride, module="stem")]
        stride, in_chs = self.stem.stride, self.stem.out_chs
        dpr = calculate_drop_path_rates(drop_path_rate, cfg.depths, stagewise=True)
        stages = []
        for i, (depth, out_chs) in enumerate(zip(cfg.depths, cfg.embed_dim, strict=True)):
            stages.append(MaxVitStage(
                in_chs, out_chs, depth, cfg.block_type[i], conv_cfg, transformer_cfg, dpr[i], **dd))
            stride, in_chs = stride * 2, out_chs
            self.feature_info.append(dict(num_chs=out_chs, reduction=stride, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        norm_layer = partial(get_norm_layer(cfg.transformer_cfg.norm_layer), eps=cfg.transformer_cfg.norm_eps)
        if cfg.head_hidden_size:  # the TF models: pool → norm → fc + tanh → classifier
            self.norm = nn.Identity()
            self.head = NormMlpClassifierHead(
                self.num_features, num_classes, hidden_size=cfg.head_hidden_size, pool_type=global_pool,
                drop_rate=drop_rate, norm_layer=norm_layer, **dd)
        else:  # norm → pool → classifier
            self.norm = norm_layer(self.num_features, **dd)
            self.head = ClassifierHead(
                self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.head_hidden_size = self.head.num_features

        if cfg.weight_init:
            named_apply(partial(self._init_weights, scheme=cfg.weight_init), self)


def _create_maxvit(variant: str, pretrained: bool = False, **kwargs) -> MaxVit:
    return build_checked(
        MaxVit,
        variant,
        pretrained,
        model_cfg=model_cfgs[variant.rsplit("_", 1)[0]],  # maxvit_tiny_tf_224 → maxvit_tiny_tf
        model_name=variant,
        feature_cfg=dict(flatten_sequential=True),
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


# timm's own pretrained cfgs (tags, hf_hub_id 'timm/', input sizes) for every maxvit_* architecture
default_cfgs = {arch: cfg for arch, cfg in maxxvit.default_cfgs.items() if arch.startswith("maxvit_")}


@register_model
def maxvit_pico_rw_256(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_pico_rw_256", pretrained, **kwargs)


@register_model
def maxvit_nano_rw_256(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_nano_rw_256", pretrained, **kwargs)


@register_model
def maxvit_tiny_rw_224(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_tiny_rw_224", pretrained, **kwargs)


@register_model
def maxvit_tiny_rw_256(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_tiny_rw_256", pretrained, **kwargs)


@register_model
def maxvit_rmlp_pico_rw_256(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_rmlp_pico_rw_256", pretrained, **kwargs)


@register_model
def maxvit_rmlp_nano_rw_256(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_rmlp_nano_rw_256", pretrained, **kwargs)


@register_model
def maxvit_rmlp_tiny_rw_256(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_rmlp_tiny_rw_256", pretrained, **kwargs)


@register_model
def maxvit_rmlp_small_rw_224(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_rmlp_small_rw_224", pretrained, **kwargs)


@register_model
def maxvit_rmlp_small_rw_256(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_rmlp_small_rw_256", pretrained, **kwargs)


@register_model
def maxvit_rmlp_base_rw_224(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_rmlp_base_rw_224", pretrained, **kwargs)


@register_model
def maxvit_rmlp_base_rw_384(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_rmlp_base_rw_384", pretrained, **kwargs)


@register_model
def maxvit_tiny_pm_256(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_tiny_pm_256", pretrained, **kwargs)


@register_model
def maxvit_tiny_tf_224(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_tiny_tf_224", pretrained, **kwargs)


@register_model
def maxvit_tiny_tf_384(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_tiny_tf_384", pretrained, **kwargs)


@register_model
def maxvit_tiny_tf_512(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_tiny_tf_512", pretrained, **kwargs)


@register_model
def maxvit_small_tf_224(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_small_tf_224", pretrained, **kwargs)


@register_model
def maxvit_small_tf_384(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_small_tf_384", pretrained, **kwargs)


@register_model
def maxvit_small_tf_512(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_small_tf_512", pretrained, **kwargs)


@register_model
def maxvit_base_tf_224(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_base_tf_224", pretrained, **kwargs)


@register_model
def maxvit_base_tf_384(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_base_tf_384", pretrained, **kwargs)


@register_model
def maxvit_base_tf_512(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_base_tf_512", pretrained, **kwargs)


@register_model
def maxvit_large_tf_224(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_large_tf_224", pretrained, **kwargs)


@register_model
def maxvit_large_tf_384(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_large_tf_384", pretrained, **kwargs)


@register_model
def maxvit_large_tf_512(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_large_tf_512", pretrained, **kwargs)


@register_model
def maxvit_xlarge_tf_224(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_xlarge_tf_224", pretrained, **kwargs)


@register_model
def maxvit_xlarge_tf_384(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_xlarge_tf_384", pretrained, **kwargs)


@register_model
def maxvit_xlarge_tf_512(pretrained: bool = False, **kwargs) -> MaxVit:
    return _create_maxvit("maxvit_xlarge_tf_512", pretrained, **kwargs)
