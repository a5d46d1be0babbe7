"""Conditional Cross Attention (CCA): attribute-specific embeddings from a single network.

Song, Hwang, Yoon, Choi, Gu, "Conditional Cross Attention Network for Multi-Space Embedding without Entanglement
in Only a SINGLE Network", ICCV 2023 (arXiv 2307.13254). No official code was published.

From the paper: one ViT backbone; a learned *condition embedding* per attribute; a cross-attention block that
fuses the condition with the image tokens and so switches which attribute-specific embedding space the output
lives in; one network for all attributes; a triplet ranking loss per attribute. The evaluation protocol is
ASEN/ASEN++'s (Ma et al., AAAI 2020; Dong et al., TIP 2021; code ``Maryeon/asenpp``): per-attribute mAP of
queries against candidates ranked by the dot product of L2-normalised embeddings, and their mean weighted by the
number of queries of each attribute (``modules/engine/evaluation.py``); the loss is ``MarginRankingLoss`` on the
cosine similarities with margin 0.2 (``modules/loss/build.py``); on Zappos50K the CSN/ASEN line reports triplet
prediction accuracy instead (``andreasveit/conditional-similarity-networks``, ``main.py: accuracy``).

Our reading, where the paper's text we could check does not pin it down: the cross-attention block sits after
the backbone's last block and final norm (the backbone itself is left untouched, so any timm/attnzoo model that
returns tokens works, a CNN's last feature map read as H*W tokens); each condition is a *single* query token
(nn.Embedding(A, C)) attending over all the backbone's tokens (its CLS token included, no shared CLS query);
the block is a pre-norm transformer block (cross-attention + MLP, each with a residual on the query); a final
norm and a linear projection to ``embed_dim``, L2-normalised.

All A embeddings of an image come from one backbone pass: the A condition queries go through the cross-attention
together (seq_q = A), and as attention treats each query independently this equals A single-query passes.
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import nn

__all__ = ["ConditionalCrossAttention", "attribute_map", "average_precision", "mean_average_precision",
           "triplet_accuracy", "triplet_ranking_loss"]


class ConditionCrossAttentionBlock(nn.Module):
    """``q + Attn(LN(q), LN(x))`` then ``+ MLP(LN(.))``: condition queries [B, M, C] over image tokens [B, N, C]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the backbone's width {dim}")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        B, M, C = query.shape
        N, h = tokens.shape[1], self.num_heads
        q = self.q(self.norm_q(query)).reshape(B, M, h, C // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(tokens)).reshape(B, N, 2, h, C // h).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, M, C)
        x = query + self.proj(attended)
        return x + self.mlp(self.norm_mlp(x))


class ConditionalCrossAttention(nn.Module):
    """A backbone and a condition-queried cross-attention head giving one L2-normalised embedding per attribute.

    Args:
        backbone: a timm/attnzoo model (built with ``num_classes=0``) or a name for ``timm.create_model``; its
            ``forward_features`` returns tokens [B, N, C] (ViT-style) or a feature map [B, C, H, W] / [B, H, W, C].
        num_attributes: A, the number of conditions.
        embed_dim: E, the size of each attribute-specific embedding.
        num_heads: heads of the cross-attention (default: C // 64, at least 1).
        backbone_kwargs: for ``timm.create_model`` when ``backbone`` is a name.

    ``forward(x)`` returns [B, A, E] (every attribute, one backbone pass); ``forward(x, attributes)`` with
    ``attributes`` [B] returns [B, E], the embedding of each image under its own attribute (a single query each).
    """

    def __init__(self, backbone: nn.Module | str, num_attributes: int, embed_dim: int = 512,
                 num_heads: int | None = None, mlp_ratio: float = 4.0, backbone_kwargs: dict | None = None):
        super().__init__()
        if isinstance(backbone, str):
            backbone = timm.create_model(backbone, num_classes=0, **(backbone_kwargs or {}))
        if num_attributes < 1:
            raise ValueError(f"num_attributes={num_attributes}: expected at least one attribute")
        self.backbone = backbone
        self.num_attributes, self.embed_dim = num_attributes, embed_dim
        dim = backbone.num_features
        self.conditions = nn.Embedding(num_attributes, dim)
        self.block = ConditionCrossAttentionBlock(dim, num_heads or max(1, dim // 64), mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, embed_dim)
        for m in [self.conditions, *self.block.modules(), self.proj]:
            if isinstance(m, (nn.Linear, nn.Embedding)):
                trunc_normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's output as tokens [B, N, C]."""
        feats = self.backbone.forward_features(x)
        C = self.backbone.num_features
        if feats.ndim == 3:
            return feats
        if feats.ndim == 4 and feats.shape[1] == C:  # NCHW
            return feats.flatten(2).transpose(1, 2)
        if feats.ndim == 4 and feats.shape[-1] == C:  # NHWC (e.g. Swin)
            return feats.flatten(1, 2)
        raise ValueError(f"backbone {type(self.backbone).__name__}: forward_features gave {tuple(feats.shape)}; "
                         f"expected tokens [B, N, {C}] or a feature map with {C} channels")

    def embed(self, tokens: torch.Tensor, attributes: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of backbone tokens [B, N, C]: [B, A, E] for every attribute, or [B, E] for ``attributes``."""
        B = tokens.shape[0]
        if attributes is None:
            query = self.conditions.weight.unsqueeze(0).expand(B, -1, -1)  # [B, A, C]: seq_q = A
        else:
            if attributes.shape != (B,):
                raise ValueError(f"attributes has shape {tuple(attributes.shape)}; expected [{B}] (one per image)")
            query = self.conditions(attributes).unsqueeze(1)  # [B, 1, C]
        out = self.proj(self.norm(self.block(query, tokens)))
        out = F.normalize(out, dim=-1)
        return out if attributes is None else out.squeeze(1)

    def forward(self, x: torch.Tensor, attributes: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed(self.tokens(x), attributes)


# ------------------------------------------------------------------------------------------------ loss, metrics


def triplet_ranking_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                         margin: float = 0.2) -> torch.Tensor:
    """ASEN++'s triplet loss: ``mean(max(0, margin - cos(a, p) + cos(a, n)))`` over [B, E] embeddings."""
    sim_p = F.cosine_similarity(anchor, positive, dim=-1)
    sim_n = F.cosine_similarity(anchor, negative, dim=-1)
    return F.margin_ranking_loss(sim_p, sim_n, torch.ones_like(sim_p), margin=margin)


def triplet_accuracy(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> float:
    """CSN's triplet prediction accuracy: the fraction of triplets with the positive strictly closer to the anchor
    (cosine similarity, which ranks like CSN's Euclidean distance on L2-normalised embeddings)."""
    sim_p = F.cosine_similarity(anchor, positive, dim=-1)
    sim_n = F.cosine_similarity(anchor, negative, dim=-1)
    return (sim_p > sim_n).float().mean().item()


def average_precision(relevant: torch.Tensor) -> torch.Tensor:
    """AP of rankings [..., K] of 0/1 relevance, best first: the mean over the relevant items of the precision at
    their rank, 0 for a ranking with nothing relevant (ASEN++'s ``APScorer``)."""
    relevant = relevant.float()
    ranks = torch.arange(1, relevant.shape[-1] + 1, device=relevant.device)
    precision_at_hits = relevant.cumsum(-1) / ranks * relevant
    return precision_at_hits.sum(-1) / relevant.sum(-1).clamp(min=1)


def mean_average_precision(queries: torch.Tensor, candidates: torch.Tensor, query_values: torch.Tensor,
                           candidate_values: torch.Tensor) -> float:
    """Mean AP of queries [Q, E] ranking candidates [K, E] by dot product; relevant = the same attribute value."""
    order = (queries @ candidates.T).argsort(dim=1, descending=True, stable=True)
    relevant = candidate_values[order] == query_values[:, None]
    return average_precision(relevant).mean().item()


def attribute_map(query_embeddings: torch.Tensor, query_attributes: torch.Tensor, query_values: torch.Tensor,
                  candidate_embeddings: torch.Tensor, candidate_attributes: torch.Tensor,
                  candidate_values: torch.Tensor, num_attributes: int) -> tuple[float, dict[int, float]]:
    """ASEN's per-attribute mAP and their mean weighted by the number of queries of each attribute ("Total
    MeanAP"). Each image's embedding [E] is the one of its own attribute; queries of attribute a rank only the
    candidates of attribute a. Attributes without queries or candidates are left out."""
    per_attribute, weights = {}, {}
    for a in range(num_attributes):
        q, c = query_attributes == a, candidate_attributes == a
        if q.any() and c.any():
            per_attribute[a] = mean_average_precision(query_embeddings[q], candidate_embeddings[c],
                                                      query_values[q], candidate_values[c])
            weights[a] = int(q.sum())
    if not per_attribute:
        raise ValueError("attribute_map: no attribute has both queries and candidates")
    total = sum(per_attribute[a] * weights[a] for a in per_attribute) / sum(weights.values())
    return total, per_attribute
