"""DCAL (``attnzoo.heads.dcal``) on CUB-200-2011 (fine-grained classification) or Market-1501 (person Re-ID),
with the paper's input pipelines:

- CUB: resize to 550/448 of the input size, random crop, horizontal flip (the paper: 550 → 448); test: resize and
  centre crop. Metric: top-1 of the summed SA + GLCA probabilities (also each branch alone).
- Market-1501: resize to the input size (the paper: 256×128), horizontal flip, 10-pixel pad and random crop,
  random erasing (the last three are TransReID's pipeline, our choice: the paper names none); P×K batches with
  ``--batch-size`` P identities of ``--dcal-k`` images each (the paper: 16 × 4). Metric: mAP and CMC rank-1 of
  the concatenated SA + GLCA embeddings under Euclidean distance, query against gallery. An epoch is one pass
  over the 751 identities.

The input size is the backbone's (``--img-size`` builds it at that size, e.g. 448 for CUB; ``--model-args
'{"img_size": [256, 128]}'`` for Re-ID).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.utils import accuracy
from torchvision import transforms as T

from ..common import InputError
from ..data.cub import CUB200
from ..data.market1501 import Market1501Eval, Market1501Train, flatten_identities
from ..heads.dcal import DCAL, reid_metrics
from . import Task, create_model

DEFAULT_RATIO = {"cub": 0.1, "market1501": 0.3}  # the paper's R for FGVC and Re-ID


class DCALTask(Task):
    name = "dcal"
    metric = "top1"
    collate_fn = staticmethod(flatten_identities)

    def __init__(self, args: argparse.Namespace, run):
        super().__init__(args, run)
        self.reid = args.dcal_dataset == "market1501"
        if self.reid:  # retrieval: every process ranks the whole gallery
            self.metric, self.shard_val = "mAP", False

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        a = parser.add_argument_group("dcal: dual cross-attention learning (--task dcal)")
        a.add_argument("--dcal-dataset", choices=sorted(DEFAULT_RATIO), default="cub",
                       help="the data folder's layout: CUB-200-2011 or Market-1501 (default: cub)")
        a.add_argument("--dcal-ratio", type=float, help="R, the fraction of patches that become GLCA's local "
                       "queries (default: 0.1 for cub, 0.3 for market1501)")
        a.add_argument("--dcal-k", type=int, default=4, help="Re-ID: images per identity in a batch (default: 4)")
        a.add_argument("--dcal-margin", type=float, default=0.3, help="Re-ID: triplet margin (default: 0.3)")

    def build(self):
        args = self.args
        if self.reid:
            train_set, val_set = Market1501Train(args.data, args.dcal_k), Market1501Eval(args.data)
            num_classes = len(train_set)
        else:
            train_set, val_set = CUB200(args.data, train=True), CUB200(args.data, train=False)
            num_classes = len(train_set.classes)
            self.classes = train_set.classes
        backbone = create_model(args, log=self.run.log, num_classes=num_classes,
                                **({"img_size": args.img_size} if args.img_size else {}))
        ratio = args.dcal_ratio if args.dcal_ratio is not None else DEFAULT_RATIO[args.dcal_dataset]
        try:
            self.model = DCAL(backbone, local_ratio=ratio, reid=self.reid, triplet_margin=args.dcal_margin)
        except ValueError as e:  # a backbone that is not a ViT with a class token, a ratio out of range
            raise InputError(f"--task dcal --model {args.model}: {e}") from None
        self.data_config = resolve_data_config(model=backbone)
        size = tuple(backbone.patch_embed.img_size)
        self.data_config["input_size"] = (3, *size)
        normalize = [T.ToTensor(), T.Normalize(self.data_config["mean"], self.data_config["std"])]
        if self.reid:
            train_set.transform = T.Compose([T.Resize(size), T.RandomHorizontalFlip(), T.Pad(10), T.RandomCrop(size),
                                             *normalize, T.RandomErasing(p=0.5)])
            val_set.transform = T.Compose([T.Resize(size), *normalize])
        else:
            resized = tuple(round(s * 550 / 448) for s in size)
            train_set.transform = T.Compose([T.Resize(resized), T.RandomCrop(size), T.RandomHorizontalFlip(),
                                             *normalize])
            val_set.transform = T.Compose([T.Resize(resized), T.CenterCrop(size), *normalize])
        return self.model, train_set, val_set

    def loss(self, net, batch):
        x, y = batch
        return self.model.loss(net(x), y)

    @torch.no_grad()
    def evaluate(self, model, loader):
        return self._retrieval(model, loader) if self.reid else self._classification(model, loader)

    def _classification(self, model, loader) -> dict[str, float]:
        """Top-1 (%) of SA + GLCA (the paper's prediction), of each branch alone, and the loss of the averaged
        probabilities, over the whole test split summed across processes."""
        sums = [0.0] * 5  # loss, hits (SA + GLCA), hits (SA), hits (GLCA), images
        for x, y in loader:
            x, y = x.to(self.run.device), y.to(self.run.device)
            with self.run.autocast():
                out = model(x)
            sa, glca = out["sa"].float().softmax(-1), out["glca"].float().softmax(-1)
            n = len(y)
            values = (F.nll_loss(((sa + glca) / 2).log(), y).item() * n,
                      *(accuracy(p, y, topk=(1,))[0].item() * n / 100 for p in (sa + glca, sa, glca)), n)
            for i, v in enumerate(values):
                sums[i] += v
        loss, hits, hits_sa, hits_glca, n = self.run.all_sum(sums)
        return {"val_loss": loss / n, "top1": 100 * hits / n, "top1_sa": 100 * hits_sa / n,
                "top1_glca": 100 * hits_glca / n}

    def _retrieval(self, model, loader) -> dict[str, float]:
        feats, ids, cams, is_query = [], [], [], []
        for x, pid, cam, query in loader:
            with self.run.autocast():
                feats.append(model.predict(x.to(self.run.device)).float().cpu())  # [SA CLS; GLCA CLS]
            ids.append(pid)
            cams.append(cam)
            is_query.append(query)
        feats, ids, cams, is_query = (torch.cat(t) for t in (feats, ids, cams, is_query))
        q, g = is_query, ~is_query
        metrics = reid_metrics(torch.cdist(feats[q], feats[g]), ids[q], cams[q], ids[g], cams[g])
        return {"mAP": metrics["mAP"], "rank1": metrics["rank1"]}

    def state(self):
        state = {"dcal_dataset": self.args.dcal_dataset, "data_config": self.data_config}
        if not self.reid:
            state["classes"] = self.classes
        return state
