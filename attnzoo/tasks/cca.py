"""Attribute-specific embeddings with conditional cross-attention (``attnzoo.heads.cca``), on FashionAI, DARN or
DeepFashion in ASEN++'s layout (validated by per-attribute mAP) or Zappos50K in CSN's (triplet accuracy).

    python tools/train.py data --task cca --cca-dataset FashionAI --model vit_base_patch16_224 --pretrained
    python tools/train.py csn_data --task cca --cca-dataset Zappos50K --model vit_base_patch16_224 --pretrained

``DATA`` is ASEN++'s ``data`` folder (``meta.json`` and one folder per dataset) or CSN's ``data`` folder
(``filenames.json``, ``tripletlists/``, ``ut-zap50k-images/``). Images are resized and centre-cropped with no
other augmentation, as ASEN++'s ``GlobalTransform`` does.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timm.data import create_transform

from ..common import InputError
from ..data.asen import ZAPPOS_CONDITIONS, AttributeImages, AttributeTriplets, ZapposTriplets, read_attributes
from ..heads.cca import ConditionalCrossAttention, attribute_map, triplet_accuracy, triplet_ranking_loss
from . import Task, create_model, data_config

ASEN_DATASETS = ("FashionAI", "DARN", "DeepFashion")
ZAPPOS = "Zappos50K"


class CCATask(Task):
    name = "cca"
    metric = "mAP"  # "triplet_acc" on Zappos50K
    shard_val = False  # retrieval ranks every query against every candidate

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        a = parser.add_argument_group("cca: conditional cross-attention (--task cca)")
        a.add_argument("--cca-dataset", choices=(*ASEN_DATASETS, ZAPPOS), default="FashionAI",
                       help="ASEN++ dataset folder under DATA, or Zappos50K (DATA is CSN's data folder)")
        a.add_argument("--cca-attributes", metavar="FILE",
                       help="attribute names and value counts: ASEN's meta.json or ASEN++'s <Dataset>.yaml "
                            "(default: DATA/meta.json)")
        a.add_argument("--cca-embed-dim", type=int, default=512, help="size of each attribute-specific embedding")
        a.add_argument("--cca-heads", type=int, help="cross-attention heads (default: the backbone width / 64)")
        a.add_argument("--cca-margin", type=float, default=0.2, help="triplet ranking margin on cosine similarity")
        a.add_argument("--cca-triplets", type=int, default=100000,
                       help="training triplets per epoch (ASEN++: 100000; Zappos50K: how many of CSN's to keep)")
        a.add_argument("--cca-eval-split", choices=("valid", "test"), default="valid",
                       help="the split evaluated after each epoch")

    def build(self):
        args = self.args
        root = Path(args.data)
        if not root.is_dir():
            raise InputError(f"data folder {root} does not exist")
        if args.cca_dataset == ZAPPOS:
            self.metric, self.attribute_names = "triplet_acc", list(ZAPPOS_CONDITIONS)
            train_set = ZapposTriplets(root, "train", num_triplets=args.cca_triplets, seed=args.seed)
            val_set = ZapposTriplets(root, "val" if args.cca_eval_split == "valid" else "test")
            self.num_values = None
        else:
            attributes = read_attributes(args.cca_attributes or root / "meta.json", args.cca_dataset)
            self.attribute_names, self.num_values = list(attributes.names), list(attributes.num_values)
            folder = root / args.cca_dataset
            train_set = AttributeTriplets(folder, attributes, args.cca_triplets)
            val_set = AttributeImages(folder, attributes, args.cca_eval_split)
        backbone = create_model(args, log=self.run.log, num_classes=0)
        model = ConditionalCrossAttention(backbone, len(self.attribute_names), args.cca_embed_dim, args.cca_heads)
        self.data_config = data_config(args, backbone)
        train_set.transform = val_set.transform = create_transform(**self.data_config, is_training=False)
        return model, train_set, val_set

    def loss(self, net, batch):
        anchor, positive, negative, attribute = batch
        # one forward for the three images of each triplet, each under the triplet's attribute
        embeddings = net(torch.cat([anchor, positive, negative]), attribute.repeat(3))
        return triplet_ranking_loss(*embeddings.chunk(3), margin=self.args.cca_margin)

    @torch.no_grad()
    def evaluate(self, model, loader):
        if self.args.cca_dataset == ZAPPOS:
            return self._triplet_accuracy(model, loader)
        embeddings, attributes, values, is_query = [], [], [], []
        for x, a, v, q in loader:
            with self.run.autocast():
                embeddings.append(model(x.to(self.run.device), a.to(self.run.device)).float().cpu())
            attributes.append(a), values.append(v), is_query.append(q)
        e, a, v, q = (torch.cat(t) for t in (embeddings, attributes, values, is_query))
        total, per_attribute = attribute_map(e[q], a[q], v[q], e[~q], a[~q], v[~q], len(self.attribute_names))
        return {"mAP": 100 * total, **{f"mAP_{self.attribute_names[i]}": 100 * m for i, m in per_attribute.items()}}

    def _triplet_accuracy(self, model, loader) -> dict[str, float]:
        """Triplet prediction accuracy (%) overall and per condition, and the triplet loss."""
        embeddings, conditions = [], []
        for anchor, positive, negative, c in loader:
            x = torch.cat([anchor, positive, negative]).to(self.run.device)
            with self.run.autocast():
                embeddings.append(model(x, c.to(self.run.device).repeat(3)).float().cpu().unflatten(0, (3, -1)))
            conditions.append(c)
        e, c = torch.cat(embeddings, dim=1), torch.cat(conditions)
        out = {"val_loss": triplet_ranking_loss(*e, margin=self.args.cca_margin).item(),
               "triplet_acc": 100 * triplet_accuracy(*e)}
        for i, name in enumerate(ZAPPOS_CONDITIONS):
            if (c == i).any():
                out[f"triplet_acc_{name}"] = 100 * triplet_accuracy(*e[:, c == i])
        return out

    def state(self):
        return {"attributes": self.attribute_names, "num_values": self.num_values,
                "data_config": self.data_config}
