"""RAVLT: Breaking the Low-Rank Dilemma of Linear Attention (Fan, Huang, He, CVPR 2025,
https://arxiv.org/abs/2411.07635), on attnzoo's linear attention kernel. Ported from the authors' ``qhfan/RALA``
(``classfication/RALA.py``, ``RAVLT``).

    stem (4 × conv3×3 → BN, GELU between; 4× down) → 4 × stage[ downsample (conv3×3 s2 → BN, stages 2–4) →
        block × depth ] → conv1×1 → BN → SiLU → avg pool → conv1×1 classifier
    block = x + CPE(x) → x + γ₁ · Attn(LN(x)) → x + γ₂ · FFN(LN(x)),  CPE a 3×3 dw conv, FFN conv1×1 → GELU →
        (+ dwconv3×3) → conv1×1, γ the layer scales

Attn, for both kinds: q, k, v, o from one 1×1 conv; out = proj((A(q, k, v) + LePE(v)) ⊙ o), LePE a 5×5 dw conv,
o an element-wise gate (no activation), with 2D RoPE on q and k (half the channels turn with the row index, half
with the column index). A is

    stages 1–2: RALA, rank-augmented linear attention (:func:`attnzoo.kernels.linear_attention`):
        φ = ELU + 1; each key is reweighted by a query-aware softmax importance, α = N · softmax_n(s · mean(φ(q)) ·
        φ(k_n)), which lifts the rank of the KV buffer; out_n = ρ(φ(q_n)) Σ_m ρ(α_m φ(k_m))ᵀ v_m / den_n
    stages 3–4: softmax attention over all tokens (``F.scaled_dot_product_attention``).

Any input size: RoPE tables are built for the map at hand.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (
    ClassifierHead,
    ConvNormAct,
    DropPath,
    LayerNorm2d,
    LayerScale2d,
    calculate_drop_path_rates,
    trunc_normal_,
)
from timm.models._registry import generate_default_cfgs, register_model

from ..kernels import linear_attention
from ..kernels.linear.reference import rotate_pairs
from ._common import build_checked, takes_device_dtype
from ._pretrained import load_authors_checkpoint, split_output_norms
from ._staged import StagedNet

__all__ = ["RAVLT", "RalaAttention", "RavltBlock", "checkpoint_filter_fn", "det_checkpoint_filter_fn"]

# the eps of the LayerNorm2d the authors' detection backbone (detection/.../RALA.py, `extra_norms`) puts on each
# output; read by attnzoo.det.AttnzooBackbone(out_norm=True)
DET_OUT_NORM_EPS = 1e-6


def rope_tables(head_dim: int, size: tuple[int, int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [H·W, head_dim] of the authors' 2D RoPE: frequencies 10000^-linspace(0, 1, head_dim/4), each for a
    channel pair; the first head_dim/2 channels turn with the row index, the rest with the column index."""
    angle = (1.0 / 10000 ** torch.linspace(0, 1, head_dim // 4, device=device)).repeat_interleave(2)
    H, W = size
    rows = torch.arange(H, device=device, dtype=angle.dtype)[:, None].expand(H, W).reshape(-1)
    cols = torch.arange(W, device=device, dtype=angle.dtype)[None, :].expand(H, W).reshape(-1)
    theta = torch.cat([rows[:, None] * angle, cols[:, None] * angle], dim=-1)
    return theta.cos(), theta.sin()


class RalaAttention(nn.Module):
    """RALA (``linear=True``) or softmax attention over all tokens of an NCHW map, with RoPE, LePE and the gate."""

    def __init__(self, dim: int, num_heads: int, linear: bool):
        super().__init__()
        self.num_heads = num_heads
        self.linear = linear
        self.qkvo = nn.Conv2d(dim, dim * 4, 1)
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv, o = self.qkvo(x).split([3 * C, C], dim=1)
        lepe = self.lepe(qkv[:, 2 * C:])
        # channels are (q|k|v, head, head_dim): views [B, heads, H·W, head_dim]
        q, k, v = qkv.reshape(B, 3, self.num_heads, C // self.num_heads, H * W).transpose(-2, -1).unbind(1)
        cos, sin = (t.to(x.dtype) for t in rope)
        if self.linear:
            x = linear_attention(q, k, v, "elu", reweight_keys=True, rope=(cos, sin), eps=1e-6)
        else:
            x = F.scaled_dot_product_attention(rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin), v)
        x = x.transpose(-2, -1).reshape(B, C, H, W) + lepe
        return self.proj(x * o)


class ConvFfn(nn.Module):
    """conv1×1 → GELU → x + dwconv3×3(x) → conv1×1."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        return self.fc2(x + self.dwconv(x))


class RavltBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, linear: bool, mlp_ratio: float, drop_path: float,
                 layer_scale: float):
        super().__init__()
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.attn = RalaAttention(dim, num_heads, linear)
        self.ls1 = LayerScale2d(dim, layer_scale)
        self.norm2 = LayerNorm2d(dim, eps=1e-6)
        self.mlp = ConvFfn(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale2d(dim, layer_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.cpe(x)
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), rope)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class RavltStage(nn.Module):
    """Downsampling (stages 2–4), then the blocks, which share one set of RoPE tables."""

    def __init__(self, in_dim: int | None, dim: int, depth: int, num_heads: int, linear: bool, mlp_ratio: float,
                 drop_path: list[float], layer_scale: float):
        super().__init__()
        self.head_dim = dim // num_heads
        self.downsample = nn.Identity() if in_dim is None else ConvNormAct(
            in_dim, dim, 3, stride=2, bias=True, apply_act=False)
        self.blocks = nn.ModuleList(
            RavltBlock(dim, num_heads, linear, mlp_ratio, drop_path[j], layer_scale) for j in range(depth))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        rope = rope_tables(self.head_dim, x.shape[-2:], x.device)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return x


class RAVLT(StagedNet):
    family = "RAVLT"

    @takes_device_dtype
    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: tuple[int, ...] = (2, 2, 6, 2),
        dims: tuple[int, ...] = (64, 128, 256, 512),
        num_heads: tuple[int, ...] = (1, 2, 4, 8),
        linear_stages: tuple[bool, ...] = (True, True, False, False),
        mlp_ratio: float = 3.5,
        layer_scales: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
        head_hidden_size: int = 1024,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        per_stage = dict(depths=depths, dims=dims, num_heads=num_heads, linear_stages=linear_stages,
                         layer_scales=layer_scales)
        if len({len(v) for v in per_stage.values()}) != 1:
            raise ValueError("RAVLT: " + ", ".join(f"`{k}`" for k in per_stage) + " need one entry per stage, got "
                             + ", ".join(str(len(v)) for v in per_stage.values()))
        for dim, heads in zip(dims, num_heads, strict=True):
            if dim % heads or (dim // heads) % 4:
                raise ValueError(f"RAVLT: each of `dims` {tuple(dims)} must be divisible by its `num_heads` "
                                 f"{tuple(num_heads)} into a head dim divisible by 4 (2D RoPE)")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = dims[-1]
        self.head_hidden_size = head_hidden_size
        self.grad_checkpointing = False

        half = dims[0] // 2
        self.stem = nn.Sequential(
            ConvNormAct(in_chans, half, 3, stride=2, bias=True, act_layer=nn.GELU),
            ConvNormAct(half, half, 3, bias=True, act_layer=nn.GELU),
            ConvNormAct(half, half, 3, bias=True, act_layer=nn.GELU),
            ConvNormAct(half, dims[0], 3, stride=2, bias=True, apply_act=False),
        )
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=True)
        self.stages = nn.Sequential(*(
            RavltStage(dims[i - 1] if i else None, dims[i], depths[i], num_heads[i], linear_stages[i], mlp_ratio,
                       dpr[i], layer_scales[i])
            for i in range(len(depths))
        ))
        self.feature_info = self.stage_feature_info(dims)
        self.norm = nn.Identity()  # no final norm before the conv head (forward_intermediates' `norm` is a no-op)
        self.conv_head = ConvNormAct(dims[-1], head_hidden_size, 1, bias=True, act_layer=nn.SiLU)
        self.head = ClassifierHead(head_hidden_size, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   use_conv=True)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def load_pretrained(self, path: str) -> None:
        """timm's ``custom_load`` hook: the authors' ``.pth`` from the Hub."""
        load_authors_checkpoint(self, path, checkpoint_filter_fn)


_STEM = {"0": "0.conv", "1": "0.bn", "3": "1.conv", "4": "1.bn", "6": "2.conv", "7": "2.bn", "9": "3.conv",
         "10": "3.bn"}
_BLOCK = (("pos.", "cpe."), ("norm1.norm.", "norm1."), ("norm2.norm.", "norm2."), ("ffn.", "mlp."),
          ("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma"))


def checkpoint_filter_fn(state_dict: dict, model: RAVLT) -> dict[str, torch.Tensor]:
    """The authors' layout → ours. Takes their training checkpoint (its ``model`` entry) or a bare state_dict;
    ours passes through unchanged. Their RoPE frequencies (``layers.i.RoPE.angle``) are rebuilt, not loaded."""
    if "model" in state_dict:
        state_dict = state_dict["model"]
    if "stem.0.conv.weight" in state_dict:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "patch_embed":  # patch_embed.proj.{i}.* → stem.{conv/bn}.*
            key = f"stem.{_STEM[parts[2]]}.{'.'.join(parts[3:])}"
        elif parts[0] == "layers" and parts[2] == "RoPE":
            continue
        elif parts[0] == "layers" and parts[2] == "downsample":  # at the end of stage i → start of stage i + 1
            key = f"stages.{int(parts[1]) + 1}.downsample.{'conv' if parts[3] == 'reduction' else 'bn'}." + parts[4]
        elif parts[0] == "layers":  # layers.i.blocks.j.* → stages.i.blocks.j.*
            rest = ".".join(parts[4:])
            for old, new in _BLOCK:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    value = value.flatten() if old.startswith("gamma") else value
                    break
            key = f"stages.{parts[1]}.blocks.{parts[3]}.{rest}"
        else:  # proj, norm, head: the conv head and the classifier
            key = {"proj": "conv_head.conv", "norm": "conv_head.bn", "head": "head.fc"}[parts[0]] + "." + \
                ".".join(parts[1:])
        out[key] = value
    return out


def det_checkpoint_filter_fn(state_dict: dict, model: RAVLT) -> dict[str, torch.Tensor]:
    """The backbone of the authors' detection and segmentation checkpoints → ours (what
    :class:`attnzoo.det.AttnzooBackbone` loads from an mmdet/mmseg file). Their ``GLTA`` (detection/mmdet/models/
    backbones/RALA.py, the same in segmentation/mmseg/...) is the classification layout without the conv head and
    classifier, plus ``extra_norms.{i}.norm`` (a LayerNorm2d wrapping ``nn.LayerNorm``) on the output of stage i,
    returned as ``out_norms.{i}.*``."""
    rest, norms = split_output_norms(state_dict, r"extra_norms\.(\d+)\.norm\.")
    return {**checkpoint_filter_fn(rest, model), **norms}


def _create_ravlt(variant: str, pretrained: bool = False, **kwargs) -> RAVLT:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_checked(
        RAVLT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def _cfg(file: str) -> dict:
    # the authors' .pth files on the Hub, loaded (and converted) by RAVLT.load_pretrained
    return dict(hf_hub_id="aldjalkdf/RAVLT", hf_hub_filename=file, custom_load="hf", num_classes=1000,
                input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation="bicubic",
                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), first_conv="stem.0.conv",
                classifier="head.fc", license="mit")


default_cfgs = generate_default_cfgs({
    "ravlt_t.in1k": _cfg("RAVLT_T.pth"),
    "ravlt_s.in1k": _cfg("RAVLT_S.pth"),
    "ravlt_b.in1k": _cfg("RAVLT_B.pth"),
    "ravlt_l.in1k": _cfg("RAVLT_L.pth"),
})

# the authors' RAVLT_T/S/B/L (drop path as trained)
_MODELS = dict(
    ravlt_t=dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8), drop_path_rate=0.1,
                 layer_scales=(1.0, 1.0, 1.0, 1.0)),
    ravlt_s=dict(depths=(3, 5, 9, 3), dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), drop_path_rate=0.15,
                 layer_scales=(1.0, 1.0, 1.0, 1.0)),
    ravlt_b=dict(depths=(4, 6, 12, 6), dims=(96, 192, 384, 512), num_heads=(1, 2, 6, 8), drop_path_rate=0.4,
                 layer_scales=(1.0, 1.0, 1e-6, 1e-6)),
    ravlt_l=dict(depths=(4, 7, 19, 8), dims=(96, 192, 448, 640), num_heads=(1, 2, 7, 10), drop_path_rate=0.55,
                 layer_scales=(1e-6, 1e-6, 1e-6, 1e-6)),
)


@register_model
def ravlt_t(pretrained: bool = False, **kwargs) -> RAVLT:
    return _create_ravlt("ravlt_t", pretrained, **dict(_MODELS["ravlt_t"], **kwargs))


@register_model
def ravlt_s(pretrained: bool = False, **kwargs) -> RAVLT:
    return _create_ravlt("ravlt_s", pretrained, **dict(_MODELS["ravlt_s"], **kwargs))


@register_model
def ravlt_b(pretrained: bool = False, **kwargs) -> RAVLT:
    return _create_ravlt("ravlt_b", pretrained, **dict(_MODELS["ravlt_b"], **kwargs))


@register_model
def ravlt_l(pretrained: bool = False, **kwargs) -> RAVLT:
    return _create_ravlt("ravlt_l", pretrained, **dict(_MODELS["ravlt_l"], **kwargs))
