"""Sparsifiner: learning sparse instance-dependent attention for efficient vision transformers (Wei et al., CVPR
2023, https://arxiv.org/abs/2303.13755), ported from the authors' ``lim142857/Sparsifiner`` onto timm's DeiT.

    DeiT block, its attention replaced by:
        q, k, v = qkv(x)
        index   = connectivity predictor(q, k)            the ceil(keep_rate · N) keys each patch query keeps
        out     = sparse_attention(q_patches, k, v, index) ∪ dense attention of the cls query

The connectivity predictor (the authors' ``MaskPredictor``, a low-rank attention per head) on the q, k the block
already computed:
    q_r, k_r  = proj_c_q(q), proj_c_k(k)                     channels hd → hd / reduce_c
    k_basis   = k_rᵀ proj_n                                  tokens N → n = N // reduce_n basis tokens
    coef      = softmax(num_heads^-½ · q_r k_basis)          [N−1, n] (cls row dropped; the authors scale by
                                                              num_heads, not hd: kept as in their code)
    coef      = its basis_topk largest entries per row, the rest 0
    basis     = |proj_back_n|ᵀ with entries ≤ 0.02 set to 0  [n, N], a sparse up-projection
    index     = top-k of coef · basis per row, k = ceil(keep_rate · N)     (no gradient flows through it)
The attention of a patch query then runs over its kept keys only (:func:`attnzoo.kernels.sparse_attention`,
whose fused kernel gathers them, so the time falls with the keep rate); the cls query attends to every key.

The state_dict is timm's DeiT plus ``blocks.i.attn.mask_predictor.{proj_c_q, proj_c_k, proj_n, proj_back_n}``
(the authors' names), so ``pretrained=True`` under the ``.deit_init`` tag loads timm's DeiT weights into the
shared parts and initialises the predictor, as the paper's recipe starts. The authors released no Sparsifiner
weights. ``proj_n`` and ``proj_back_n`` have one row per token: the model takes only its built input size.

Training recipe (the authors' ``sparsifiner_default_config.yaml``): 5 epochs of predictor reconstruction
(:meth:`Sparsifiner.set_attn_recon`, :func:`attn_recon_loss` against :func:`attention_maps` of the dense DeiT
teacher, weight 0.01), then 45 epochs of :func:`distill_loss` from that teacher.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import vision_transformer as timm_vit
from timm.models._registry import generate_default_cfgs, register_model

from ..kernels import sparse_attention
from ._common import build_checked, check_image_batch

__all__ = ["Sparsifiner", "SparsifinerAttention", "ConnectivityPredictor", "attn_recon_loss", "distill_loss",
           "attention_maps"]


class ConnectivityPredictor(nn.Module):
    """Low-rank approximation of each head's attention, and from it the keys each patch query keeps."""

    def __init__(self, dim: int, num_heads: int, num_tokens: int, keep_rate: float = 0.25, basis_topk: int = 8,
                 reduce_n_factor: int = 6, reduce_c_factor: int = 2, basis_threshold: float = 0.02,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        head_dim = dim // num_heads
        reduced_n = num_tokens // reduce_n_factor
        if not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"Sparsifiner: `keep_rate` must be in (0, 1], got {keep_rate}")
        if not 1 <= basis_topk <= reduced_n:
            raise ValueError(f"Sparsifiner: `basis_topk` must be in [1, {reduced_n}] (the {reduced_n} basis tokens "
                             f"of {num_tokens} // reduce_n_factor {reduce_n_factor}), got {basis_topk}")
        self.scale = num_heads ** -0.5
        self.num_keep = math.ceil(keep_rate * num_tokens)
        self.basis_topk = basis_topk
        self.basis_threshold = basis_threshold
        self.proj_c_q = nn.Linear(head_dim, head_dim // reduce_c_factor, **dd)
        self.proj_c_k = nn.Linear(head_dim, head_dim // reduce_c_factor, **dd)
        self.proj_n = nn.Parameter(torch.empty(num_tokens, reduced_n, **dd))
        self.proj_back_n = nn.Parameter(torch.empty(num_tokens, reduced_n, **dd))
        for p in (self.proj_n, self.proj_back_n):
            trunc_normal_(p, std=0.02)

    def approx_attention(self, q: torch.Tensor, k: torch.Tensor, sparse: bool = True) -> torch.Tensor:
        """coef · basis, [B, H, N−1, N] for the patch queries. ``sparse=False`` is the reconstruction phase's
        form: every coefficient and the raw basis, so the loss reaches all of them."""
        k_basis = self.proj_c_k(k).transpose(-2, -1) @ self.proj_n  # [B, H, c, n]
        coef = ((self.proj_c_q(q) @ k_basis) * self.scale)[..., 1:, :].softmax(-1)  # [B, H, N−1, n]
        basis = self.proj_back_n.t()
        if sparse:
            basis = F.threshold(basis.abs(), self.basis_threshold, 0.0)
            top = coef.topk(self.basis_topk, dim=-1)
            coef = torch.zeros_like(coef).scatter_(-1, top.indices, top.values)
        return coef @ basis

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """[B, H, N−1, num_keep] indices of the keys each patch query keeps."""
        with torch.no_grad():
            return self.approx_attention(q, k).topk(self.num_keep, dim=-1, sorted=False).indices


class SparsifinerAttention(nn.Module):
    """timm's ``Attention`` (same ``qkv`` and ``proj``) with the connectivity predictor choosing the keys."""

    def __init__(self, dim: int, num_heads: int, num_tokens: int, qkv_bias: bool = True, proj_drop: float = 0.0,
                 device=None, dtype=None, **predictor_args):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.mask_predictor = ConnectivityPredictor(dim, num_heads, num_tokens, **predictor_args, **dd)
        # reconstruction phase: dense attention, the predictor's approximation and the dense map kept for the loss
        self.attn_recon = False
        self.approx_attn: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("Sparsifiner: attention takes no `attn_mask` or `is_causal`; the connectivity "
                             "predictor chooses the keys")
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        every_key = torch.arange(N, device=x.device).expand(B, self.num_heads, 1, N)
        if self.attn_recon and self.training:
            self.approx_attn = self.mask_predictor.approx_attention(q, k, sparse=False)
            x = sparse_attention(q, k, v, every_key.expand(B, self.num_heads, N, N))
        else:
            index = self.mask_predictor(q, k)
            x = torch.cat([sparse_attention(q[:, :, :1], k, v, every_key),  # the cls row stays dense
                           sparse_attention(q[:, :, 1:], k, v, index)], dim=2)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Sparsifiner(timm_vit.VisionTransformer):
    """timm's ``VisionTransformer`` (DeiT) with :class:`SparsifinerAttention` in every block.

    Args (beyond timm's ``VisionTransformer``'s):
        keep_rate: fraction of the N keys each patch query keeps (the authors' ``ATTN_KEEP_RATE``, 0.25).
        basis_topk: basis coefficients kept per query (``BASIS_COEF.TOPK``, 8).
        reduce_n_factor, reduce_c_factor: the predictor's token and channel reductions (6 and 2).
        basis_threshold: entries of |proj_back_n| at or below it are dropped from the basis (0.02).
    """

    def __init__(self, keep_rate: float = 0.25, basis_topk: int = 8, reduce_n_factor: int = 6,
                 reduce_c_factor: int = 2, basis_threshold: float = 0.02, img_size: int = 224, device=None,
                 dtype=None, **kwargs):
        for arg in ("dynamic_img_size", "no_embed_class", "reg_tokens"):
            if kwargs.get(arg):
                raise ValueError(f"Sparsifiner: `{arg}` is not supported: the predictor has one weight per token "
                                 f"of a fixed layout (cls token, then the patches)")
        if kwargs.get("attn_drop_rate"):
            raise ValueError("Sparsifiner: `attn_drop_rate` is not supported (the fused attention has no dropout)")
        if not kwargs.get("class_token", True):
            raise ValueError("Sparsifiner: needs the class token (`class_token=True`), whose attention row stays "
                             "dense")
        super().__init__(img_size=img_size, device=device, dtype=dtype, **kwargs)
        num_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        for block in self.blocks:
            dense = block.attn
            block.attn = SparsifinerAttention(
                self.embed_dim, dense.num_heads, num_tokens, qkv_bias=dense.qkv.bias is not None,
                keep_rate=keep_rate, basis_topk=basis_topk, reduce_n_factor=reduce_n_factor,
                reduce_c_factor=reduce_c_factor, basis_threshold=basis_threshold, device=device, dtype=dtype)
            block.attn.qkv, block.attn.proj = dense.qkv, dense.proj  # timm's layers and initialisation
            block.attn.proj_drop = dense.proj_drop
            block.attn.mask_predictor.apply(_init_linear)

    def set_attn_recon(self, enable: bool = True) -> None:
        """The first phase of the recipe: in training mode every block attends densely and keeps the predictor's
        approximation (``blocks[i].attn.approx_attn``) for :func:`attn_recon_loss`."""
        for block in self.blocks:
            block.attn.attn_recon = enable
            block.attn.approx_attn = None

    def approx_attentions(self) -> list[torch.Tensor]:
        """The predictors' approximations of the last forward in the reconstruction phase, one per block."""
        maps = [block.attn.approx_attn for block in self.blocks]
        if any(m is None for m in maps):
            raise RuntimeError("Sparsifiner: no approximations recorded; call set_attn_recon(True) and run a "
                               "forward in training mode first")
        return maps

    def _check_input(self, x: torch.Tensor) -> None:
        size = tuple(self.patch_embed.img_size)
        check_image_batch(self, x, self.patch_embed.proj.in_channels, "Sparsifiner", size, why=(
            f"the connectivity predictor was built for its {size[0]}×{size[1]} token layout"))

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        self._check_input(x)
        return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        self._check_input(x)
        return super().forward_intermediates(x, *args, **kwargs)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


def attention_maps(vit: timm_vit.VisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """The dense attention probabilities [B, H, N, N] of every block of a timm ``VisionTransformer`` (the
    teacher of :func:`attn_recon_loss`), computed without gradients."""
    maps = []
    with torch.no_grad():
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for block in vit.blocks:
            attn = block.attn
            y = block.norm1(tokens)
            B, N, C = y.shape
            q, k, _ = attn.qkv(y).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
            maps.append((attn.q_norm(q) * attn.scale @ attn.k_norm(k).transpose(-2, -1)).softmax(-1))
            tokens = block(tokens)
    return maps


def attn_recon_loss(approx_attns: list[torch.Tensor], teacher_attns: list[torch.Tensor]) -> torch.Tensor:
    """The predictor's reconstruction loss (the authors' ``ATTN_RECON``, MSE criterion): per block the summed
    squared error between the approximation [B, H, N−1, N] and the teacher's attention of the patch queries,
    averaged over blocks. The recipe weighs it by 0.01."""
    if len(approx_attns) != len(teacher_attns):
        raise ValueError(f"attn_recon_loss: one teacher map per block is needed, got {len(teacher_attns)} for "
                         f"{len(approx_attns)} blocks")
    total = sum(F.mse_loss(a, t[..., 1:, :], reduction="sum") for a, t in zip(approx_attns, teacher_attns,
                                                                               strict=True))
    return total / len(approx_attns)


def distill_loss(logits: torch.Tensor, tokens: torch.Tensor, teacher_logits: torch.Tensor,
                 teacher_tokens: torch.Tensor, target: torch.Tensor, base_criterion=F.cross_entropy,
                 cls_weight: float = 1.0, cls_distill_weight: float = 0.5,
                 token_distill_weight: float = 0.5) -> torch.Tensor:
    """The second phase's loss (the authors' ``NewLoss`` with its default weights): ``base_criterion`` on the
    labels, plus KL(teacher ‖ student) of the class predictions (batch mean), plus the MSE between the final
    normed patch tokens [B, N−1, C] of student and dense teacher (``forward_features(x)[:, 1:]``)."""
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), reduction="batchmean",
                  log_target=True)
    return (cls_weight * base_criterion(logits, target) + cls_distill_weight * kl
            + token_distill_weight * F.mse_loss(tokens, teacher_tokens))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: Sparsifiner) -> dict[str, torch.Tensor]:
    """timm's ViT conversion (DeiT checkpoints, position-embedding resize); a DeiT checkpoint has no predictor,
    which then keeps the model's own initialisation."""
    state_dict = timm_vit.checkpoint_filter_fn(state_dict, model)
    for key, value in model.state_dict().items():
        if ".mask_predictor." in key and key not in state_dict:
            state_dict[key] = value
    return state_dict


def _create_sparsifiner(variant: str, pretrained: bool = False, **kwargs) -> Sparsifiner:
    # features_only: the last three blocks (timm's ViT default), all of them in a shallower model
    out_indices = kwargs.pop("out_indices", min(3, kwargs["depth"]))
    return build_checked(
        Sparsifiner, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _deit_init(hub_id: str) -> dict:
    """The authors' starting point: timm's published DeiT weights for the shared parts, a fresh predictor."""
    return dict(hf_hub_id=hub_id, num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875,
                interpolation="bicubic", fixed_input_size=True, mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225), first_conv="patch_embed.proj", classifier="head", license="apache-2.0")


default_cfgs = generate_default_cfgs({
    "sparsifiner_deit_small_patch16_224.deit_init": _deit_init("timm/deit_small_patch16_224.fb_in1k"),
    "sparsifiner_deit_base_patch16_224.deit_init": _deit_init("timm/deit_base_patch16_224.fb_in1k"),
})


@register_model
def sparsifiner_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> Sparsifiner:
    """Sparsifiner-S: DeiT-S (the authors' ``main.py`` for ``--model sparsifiner``) with their default predictor."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_sparsifiner("sparsifiner_deit_small_patch16_224", pretrained=pretrained,
                               **dict(model_args, **kwargs))


@register_model
def sparsifiner_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> Sparsifiner:
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_sparsifiner("sparsifiner_deit_base_patch16_224", pretrained=pretrained,
                               **dict(model_args, **kwargs))
