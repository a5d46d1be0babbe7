"""Halo attention in plain PyTorch: the readable reference and the SDPA path.

Both take validated arguments (see ``attnzoo.kernels.halo``) and compute exactly what timm's ``HaloAttn``
does: the key/value map is zero-padded by the halo and cut into overlapping (b + 2h)² neighbourhoods with
``unfold``; padded keys are not masked (their logit is the relative logit alone).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def query_blocks(q: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """[B, N, Hq, Wq, D] → [B, N, nh, nw, bq·bq, D]: the bq×bq query blocks, row-major inside each block."""
    B, N, Hq, Wq, D = q.shape
    bq = Hq // nh
    return q.reshape(B, N, nh, bq, nw, bq, D).transpose(3, 4).reshape(B, N, nh, nw, bq * bq, D)


def unblock(out: torch.Tensor, bq: int) -> torch.Tensor:
    """Inverse of :func:`query_blocks`: [B, N, nh, nw, bq·bq, D] → [B, N, nh·bq, nw·bq, D]."""
    B, N, nh, nw, _, D = out.shape
    return out.reshape(B, N, nh, nw, bq, bq, D).transpose(3, 4).reshape(B, N, nh * bq, nw * bq, D)


def neighbourhoods(t: torch.Tensor, block: int, halo: int) -> torch.Tensor:
    """[B, N, H, W, D] → [B, N, nh, nw, win·win, D]: the win×win window (win = block + 2·halo) around each
    block, zero outside the image."""
    win = block + 2 * halo
    t = F.pad(t, (0, 0, halo, halo, halo, halo))
    t = t.unfold(2, win, block).unfold(3, win, block)  # [B, N, nh, nw, D, win, win]
    return t.flatten(-2).transpose(-1, -2)


def relative_logits(qb: torch.Tensor, height_rel: torch.Tensor, width_rel: torch.Tensor,
                    win: int) -> torch.Tensor:
    """Factorized relative logits, [..., bq·bq, D] → [..., bq·bq, win·win].

    Query (y, x) of a block and key (ky, kx) of its window meet through
        q · height_rel[ky − y + win − 1] + q · width_rel[kx − x + win − 1],
    timm's relative-to-absolute indexing (query and key coordinates both counted from their own top-left).
    """
    bq = int(round(qb.shape[-2] ** 0.5))
    ky, y = torch.arange(win, device=qb.device), torch.arange(bq, device=qb.device)
    offset = ky[None, :] - y[:, None] + win - 1  # [y, ky]
    qg = qb.unflatten(-2, (bq, bq))  # [..., y, x, D]
    rel_h = torch.einsum("...yxd,ykd->...yxk", qg, height_rel[offset])  # [..., y, x, ky]
    rel_w = torch.einsum("...yxd,xkd->...yxk", qg, width_rel[offset])  # [..., y, x, kx]
    return (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2).flatten(-3, -2)


def halo_attention_reference(q, k, v, height_rel, width_rel, block: int, halo: int, scale: float,
                             scale_pos_embed: bool) -> torch.Tensor:
    """softmax(scale·q kᵀ + pos) v per query block (``(q kᵀ + pos)·scale`` with scale_pos_embed), in at least
    float32."""
    acc = torch.promote_types(q.dtype, torch.float32)
    nh, nw = k.shape[2] // block, k.shape[3] // block
    qb = query_blocks(q.to(acc), nh, nw)
    kb, vb = neighbourhoods(k.to(acc), block, halo), neighbourhoods(v.to(acc), block, halo)
    pos = relative_logits(qb, height_rel.to(acc), width_rel.to(acc), block + 2 * halo)
    logits = qb @ kb.transpose(-1, -2)
    logits = (logits + pos) * scale if scale_pos_embed else logits * scale + pos
    out = logits.softmax(-1) @ vb
    return unblock(out, q.shape[2] // nh).to(q.dtype)


def halo_attention_sdpa(q, k, v, height_rel, width_rel, block: int, halo: int, scale: float,
                        scale_pos_embed: bool) -> torch.Tensor:
    """The same through ``F.scaled_dot_product_attention``, the relative logits as its additive mask."""
    nh, nw = k.shape[2] // block, k.shape[3] // block
    qb = query_blocks(q, nh, nw)
    pos = relative_logits(qb, height_rel, width_rel, block + 2 * halo)
    if scale_pos_embed:
        pos = pos * scale
    out = F.scaled_dot_product_attention(
        qb, neighbourhoods(k, block, halo), neighbourhoods(v, block, halo), attn_mask=pos, scale=scale)
    return unblock(out, q.shape[2] // nh)
