"""DCAL: Dual Cross-Attention Learning for fine-grained visual categorization and object re-identification (Zhu,
Ke, Li, Liu, Tian, Shan; CVPR 2022, https://arxiv.org/abs/2205.02151), on any timm ViT-style backbone with a
class token (timm's ``VisionTransformer``: ViT, DeiT; attnzoo's Sparsifiner).

    x_0 = patch + position embedding of I (CLS first)
    SA:    x_l = Block_l(x_{l-1}),  l = 1..L                    the backbone's blocks       -> CLS -> SA classifier
    GLCA:  r   = e_0ᵀ S̄_L S̄_{L-1} ⋯ S̄_1,  S̄_l = ½ mean_h P_{l,h} + ½ E          (Eq. 2, attention rollout)
           idx = CLS ∪ top-⌈R·N⌉ patches by r                                       R = 10 % FGVC, 30 % Re-ID
           y   = Block_glca(queries x_{L-1}[idx], keys/values all of x_{L-1})       (Eq. 3) -> CLS -> GLCA classifier
    PWCA (training only):  x'_l = Block_l(queries x'_{l-1}, keys/values [K_l(I); K_l(I₂)], [V_l(I); V_l(I₂)])
           one softmax over the 2N+2 keys (Eq. 4), the SA blocks' own weights       -> CLS -> SA classifier
    loss = ½ Σ_b (e^{-w_b} L_b + w_b) over b ∈ {SA, GLCA, PWCA}, w learnable (FairMOT's uncertainty weighting)
    inference: FGVC adds the SA and GLCA class probabilities; Re-ID concatenates the SA and GLCA CLS embeddings.

From the paper: the rollout with S̄ = 0.5 S + 0.5 E, the top-R local queries against all global keys/values, one
GLCA block with its own weights, PWCA through the SA weights with the concatenated keys/values and the target of
I₁ (I₂ only distracts), PWCA dropped at inference, R (10 % / 30 %), the uncertainty-weighted multi-task loss, CE
per branch plus triplet for Re-ID, and the two inference rules.

From the replication (``mossbee/clau_duaL_cross_attention_learning``, no official code exists): heads averaged for
the rollout and rows re-normalised after adding E (a no-op here: mean_h P and E are both row-stochastic), and the
loss written as ½(Σ e^{-w_b} L_b + w_b) with w initialised to 0 (the paper only cites FairMOT).

Our reading where the paper is silent:
- The GLCA block runs beside the last SA block: it takes that block's input x_{L-1}, its queries are chosen by the
  rollout through all L SA layers (Ŝ_L, the paper's Ŝ_i for the block the GLCA pairs with), and it starts as a
  copy of the last block (and of the final norm and the classifier).
- The CLS token is always one of GLCA's queries (its classifier reads the CLS token); the ⌈R·N⌉ local queries are
  chosen among the N patch tokens.
- PWCA's distractor I₂ is another image of the same batch (a random cyclic pairing drawn from torch's RNG, so a
  resumed run draws the same pairs); its keys and values at layer l are the ones its own SA pass computed there.
- The PWCA branch shares the SA final norm and classifier (the paper shares all SA weights with PWCA).
- Re-ID: each branch's loss is CE on its classifier plus a batch-hard triplet loss (margin 0.3, Euclidean) on its
  CLS embedding, and the three branch losses are uncertainty-weighted as in FGVC.

Every branch runs the attention of the backbone's own modules (``norm1``, ``attn.qkv``, ``attn.proj``, layer
scale, drop path, ``norm2``, ``mlp``) through ``F.scaled_dot_product_attention``, densely: on a Sparsifiner
backbone the connectivity predictor is unused, as rollout and PWCA's shared softmax need the dense attention.
The rollout never holds an N×N matrix: each step is :func:`attnzoo.kernels.rollout_step` (Pᵀr from q and k).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import rollout_step

__all__ = ["DCAL", "attention_rollout", "batch_hard_triplet_loss", "random_partners", "reid_metrics",
           "uncertainty_weighted_loss"]

BRANCHES = ("sa", "glca", "pwca")


class DCAL(nn.Module):
    """SA, GLCA and PWCA branches over a timm ``VisionTransformer`` whose classifier is already sized.

    Args:
        backbone: a ViT with a class token and ``global_pool='token'`` (e.g. ``timm.create_model(
            "deit_tiny_patch16_224", num_classes=200)``); its ``head`` is the SA (and PWCA) classifier.
        local_ratio: R, the fraction of the patch tokens that become GLCA's local queries (0.1 FGVC, 0.3 Re-ID).
        reid: Re-ID mode: a triplet loss on each branch's CLS embedding, and :meth:`predict` gives embeddings.
        triplet_margin: the batch-hard triplet margin (Re-ID).
    """

    def __init__(self, backbone: nn.Module, local_ratio: float = 0.1, reid: bool = False,
                 triplet_margin: float = 0.3):
        super().__init__()
        _check_backbone(backbone)
        if not 0.0 < local_ratio <= 1.0:
            raise ValueError(f"DCAL: `local_ratio` must be in (0, 1], got {local_ratio}")
        self.backbone = backbone
        self.local_ratio, self.reid, self.triplet_margin = local_ratio, reid, triplet_margin
        # GLCA: its own weights, initialised from the last SA block, the final norm and the classifier
        self.glca_block = copy.deepcopy(backbone.blocks[-1])
        self.glca_norm = copy.deepcopy(backbone.norm)
        self.glca_head = copy.deepcopy(backbone.head)
        self.loss_weights = nn.Parameter(torch.zeros(len(BRANCHES)))  # w_SA, w_GLCA, w_PWCA

    def num_local(self, num_patches: int) -> int:
        """GLCA's local queries besides the CLS token: ⌈R · N⌉, at least one."""
        return max(1, math.ceil(self.local_ratio * num_patches))

    def forward(self, x: torch.Tensor, partner: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Branch outputs for images ``x`` [B, 3, H, W].

        Returns a dict: ``sa``, ``glca`` (logits), ``sa_feat``, ``glca_feat`` (CLS embeddings after the final
        norms), ``local_index`` ([B, 1 + ⌈R·N⌉] token indices of GLCA's queries, CLS first) and, in training
        mode, ``pwca`` and ``pwca_feat``. ``partner`` [B] (training only) gives each image's distractor, an index
        into the batch; by default a random other image.
        """
        tokens, keys_values, queries_keys = self._self_attention(x)
        out = self._classify(self.backbone.norm, self.backbone.head, tokens[-1], "sa")

        r = attention_rollout(queries_keys)
        glca_in = tokens[-2]
        local = r[:, 1:].topk(self.num_local(r.shape[1] - 1), dim=1).indices + 1
        index = torch.cat([torch.zeros_like(local[:, :1]), local], dim=1)  # the CLS token, then the local queries
        q, k, v = _qkv(self.glca_block.attn, self.glca_block.norm1(glca_in))
        q = q.gather(2, index[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
        selected = glca_in.gather(1, index[:, :, None].expand(-1, -1, glca_in.shape[2]))
        y = _block_out(self.glca_block, selected, _attend(self.glca_block.attn, q, k, v))
        out.update(self._classify(self.glca_norm, self.glca_head, y, "glca"), local_index=index)

        if self.training:
            x = self._pwca(tokens[0], keys_values, partner)
            out.update(self._classify(self.backbone.norm, self.backbone.head, x, "pwca"))
        return out

    def _pwca(self, x: torch.Tensor, keys_values: list, partner: torch.Tensor | None) -> torch.Tensor:
        """The SA blocks again, each query of I attending over I's and its partner's keys and values at once."""
        if partner is None:
            partner = random_partners(x.shape[0], x.device)
        for block, (k2, v2) in zip(self.backbone.blocks, keys_values, strict=True):
            q, k, v = _qkv(block.attn, block.norm1(x))
            k, v = torch.cat([k, k2[partner]], dim=2), torch.cat([v, v2[partner]], dim=2)  # [B, H, 2N, D]
            x = _block_out(block, x, _attend(block.attn, q, k, v))
        return x

    def _classify(self, norm: nn.Module, head: nn.Module, x: torch.Tensor, branch: str) -> dict[str, torch.Tensor]:
        feat = norm(x)[:, 0]
        return {branch: head(self.backbone.head_drop(feat)), f"{branch}_feat": feat}

    def _self_attention(self, x: torch.Tensor) -> tuple[list, list, list]:
        """The SA branch: the input of every block and the last output; each block's keys and values (for PWCA);
        each block's detached queries, keys and scale (for the rollout)."""
        bb = self.backbone
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
        tokens, keys_values, queries_keys = [x], [], []
        for block in bb.blocks:
            q, k, v = _qkv(block.attn, block.norm1(x))
            x = _block_out(block, x, _attend(block.attn, q, k, v))
            tokens.append(x)
            keys_values.append((k, v))
            queries_keys.append((q.detach(), k.detach(), _scale(block.attn, q)))
        return tokens, keys_values, queries_keys

    @torch.no_grad()
    def rollout(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS row of the attention rollout through every SA block for images x, [B, N] (it sums to 1)."""
        return attention_rollout(self._self_attention(x)[2])

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Inference (call in eval mode): FGVC, the sum of the SA and GLCA class probabilities [B, C]; Re-ID, the
        SA and GLCA CLS embeddings concatenated [B, 2·dim]."""
        out = self(x)
        if self.reid:
            return torch.cat([out["sa_feat"], out["glca_feat"]], dim=1)
        return out["sa"].float().softmax(-1) + out["glca"].float().softmax(-1)

    def loss(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """The uncertainty-weighted sum of the branches' losses (CE, plus batch-hard triplet in Re-ID mode)."""
        losses = []
        for branch in BRANCHES:
            if branch in out:
                loss = F.cross_entropy(out[branch].float(), target)
                if self.reid:
                    loss = loss + batch_hard_triplet_loss(out[f"{branch}_feat"].float(), target, self.triplet_margin)
                losses.append(loss)
        return uncertainty_weighted_loss(torch.stack(losses), self.loss_weights[: len(losses)])


def _check_backbone(backbone: nn.Module) -> None:
    name = type(backbone).__name__
    if getattr(backbone, "cls_token", None) is None:
        raise ValueError(f"DCAL: the backbone ({name}) must be a timm VisionTransformer-style model with a class "
                         "token (`cls_token`): rollout and both classifiers read it")
    pool = getattr(backbone, "global_pool", None)
    if pool != "token" or not isinstance(getattr(backbone, "fc_norm", None), nn.Identity):
        raise ValueError(f"DCAL: the backbone ({name}) must pool its class token (global_pool='token', no fc_norm), "
                         f"got global_pool={pool!r}")
    for i, block in enumerate(backbone.blocks):
        missing = [a for a in ("norm1", "norm2", "mlp", "attn.qkv", "attn.proj", "attn.num_heads")
                   if not _has(block, a)]
        if missing or getattr(block.attn, "gate", None) is not None:
            raise ValueError(f"DCAL: backbone block {i} ({type(block).__name__}) must be a pre-norm ViT block with "
                             f"norm1, attn.qkv, attn.proj, norm2 and mlp (no gated attention); missing {missing}")


def _has(module: nn.Module, path: str) -> bool:
    for part in path.split("."):
        if not hasattr(module, part):
            return False
        module = getattr(module, part)
    return True


def _scale(attn: nn.Module, q: torch.Tensor) -> float:
    return getattr(attn, "scale", q.shape[-1] ** -0.5)


def _qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block's q, k, v [B, heads, N, head_dim] of normalised tokens x [B, N, C] (timm's layout and norms)."""
    B, N, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    identity = nn.Identity()
    return getattr(attn, "q_norm", identity)(q), getattr(attn, "k_norm", identity)(k), v


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    drop = getattr(attn, "attn_drop", None)
    p = drop.p if drop is not None and attn.training else 0.0
    return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=_scale(attn, q))


def _block_out(block: nn.Module, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of a pre-norm block after its attention: output projection, residual, MLP. ``x`` [B, M, C] are the
    query tokens, ``attended`` [B, heads, M, head_dim] their attention outputs."""
    attn, identity = block.attn, nn.Identity()
    y = attended.transpose(1, 2).flatten(2)
    y = attn.proj_drop(attn.proj(getattr(attn, "norm", identity)(y)))
    x = x + getattr(block, "drop_path1", identity)(getattr(block, "ls1", identity)(y))
    return x + getattr(block, "drop_path2", identity)(getattr(block, "ls2", identity)(block.mlp(block.norm2(x))))


def attention_rollout(layers: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """The CLS row of Ŝ_L = S̄_L ⋯ S̄_1 (Eq. 2) from each layer's (q, k, scale), q and k [B, H, N, D]; [B, N] in
    float32.

    Evaluated as a row vector from the last layer down: r ← r S̄_l = ½ r + ½ mean_h(P_{l,h}ᵀ r), one
    :func:`rollout_step` per layer, so no [N, N] matrix is formed on the fused path.
    """
    q = layers[0][0]
    r = torch.zeros(q.shape[0], q.shape[2], device=q.device, dtype=torch.float32)
    r[:, 0] = 1.0
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        for q, k, scale in reversed(layers):
            r = 0.5 * r + 0.5 * rollout_step(q, k, r, scale).float().mean(1)
    return r


def random_partners(batch: int, device: torch.device) -> torch.Tensor:
    """Each image's PWCA distractor: another image of the batch, along a random cycle through all of them."""
    if batch < 2:
        raise ValueError(f"DCAL: PWCA pairs each image with another image of the batch; got a batch of {batch}")
    order = torch.randperm(batch, device=device)
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)
    return partner


def uncertainty_weighted_loss(losses: torch.Tensor, log_vars: torch.Tensor) -> torch.Tensor:
    """½ Σ_b (e^{-w_b} L_b + w_b) (Kendall et al. 2018 as FairMOT uses it): a branch with a large loss gets a large
    w_b and a small weight, and the +w_b term keeps w from growing without bound."""
    return 0.5 * (torch.exp(-log_vars) * losses + log_vars).sum()


def batch_hard_triplet_loss(feat: torch.Tensor, labels: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017): for each anchor, its farthest same-label sample against its
    nearest other-label sample, max(0, d⁺ − d⁻ + margin) in Euclidean distance, averaged over the anchors that have
    both (0 when none has)."""
    dist = torch.cdist(feat, feat)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    hardest_pos = dist.masked_fill(~same | eye, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(1)
    valid = torch.isfinite(hardest_pos) & torch.isfinite(hardest_neg)
    if not valid.any():
        return feat.sum() * 0.0
    return F.relu(hardest_pos[valid] - hardest_neg[valid] + margin).mean()


def reid_metrics(dist: torch.Tensor, query_ids: torch.Tensor, query_cams: torch.Tensor, gallery_ids: torch.Tensor,
                 gallery_cams: torch.Tensor) -> dict[str, float]:
    """CMC rank-1 and mAP (%) of a query × gallery distance matrix under the Market-1501 protocol.

    For each query, gallery images of the same identity seen by the same camera and junk images (identity −1) are
    left out; distractors (identity 0) stay as ordinary non-matches. A query with no remaining match is skipped
    (``queries`` counts those evaluated). Equal distances keep the gallery order. AP is the mean, over the
    matches, of the precision at each match's rank.
    """
    if dist.shape != (len(query_ids), len(gallery_ids)):
        raise ValueError(f"reid_metrics: `dist` must be [queries, gallery] = [{len(query_ids)}, {len(gallery_ids)}], "
                         f"got {list(dist.shape)}")
    hits1, aps = [], []
    for i in range(len(query_ids)):
        keep = (gallery_ids != -1) & ~((gallery_ids == query_ids[i]) & (gallery_cams == query_cams[i]))
        order = torch.sort(dist[i][keep], stable=True).indices
        match = (gallery_ids[keep][order] == query_ids[i]).double()
        if not match.any():
            continue
        ranks = torch.arange(1, len(match) + 1, dtype=torch.float64, device=match.device)
        aps.append(((match.cumsum(0) / ranks) * match).sum().item() / match.sum().item())
        hits1.append(match[0].item())
    if not aps:
        raise ValueError("reid_metrics: no query has a valid match in the gallery")
    return {"rank1": 100 * sum(hits1) / len(hits1), "mAP": 100 * sum(aps) / len(aps), "queries": len(aps)}
