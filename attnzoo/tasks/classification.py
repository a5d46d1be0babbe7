"""Image classification on an ImageNet-style folder (``DATA/train/<class>/*``, ``DATA/val/<class>/*``), WebDataset
shards in timm's layout (:mod:`attnzoo.data.shards`) or a Hugging Face dataset (:mod:`attnzoo.data.hfds`), any model
timm can build: timm's transforms (RandAugment, random erasing), Mixup/CutMix, label smoothing, top-1/top-5."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import accuracy

from ..common import InputError
from ..data import class_names, image_folder
from ..data.hfds import hf_dataset, is_hf
from ..data.shards import is_wds, wds_dataset
from . import Task, create_model, data_config


def train_transform(args: argparse.Namespace, config: dict):
    """timm's training transform for the augmentation flags in ``args`` at the model's data ``config``."""
    try:
        return create_transform(
            config["input_size"], is_training=True, auto_augment=args.aa or None, re_prob=args.reprob,
            scale=tuple(args.scale), interpolation=config["interpolation"], mean=config["mean"], std=config["std"],
        )
    except (AssertionError, ValueError) as e:  # timm's auto-augment parser asserts on a spec it does not know
        raise InputError(f"--aa {args.aa!r}: not a timm auto-augment spec (e.g. rand-m9-mstd0.5-inc1, "
                         f"augmix-m5, original): {e}") from None


class ClassificationTask(Task):
    name = "classification"
    metric = "top1"
    publishable = True

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        a = parser.add_argument_group("classification: augmentation")
        a.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment spec ('' for none)")
        a.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), help="random-resized-crop area range")
        a.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
        a.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
        a.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
        a.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")

    def build(self):
        args = self.args
        if is_wds(args.data) or is_hf(args.data):
            read = wds_dataset if is_wds(args.data) else hf_dataset
            train_set, val_set = read(args.data, "train"), read(args.data, "val")
        else:
            train_set = image_folder(args.data, "train")
            val_set = image_folder(args.data, "val", class_to_idx=train_set.reader.class_to_idx)
        self.classes = class_names(train_set)
        model = create_model(args, log=self.run.log, num_classes=len(self.classes))
        self.data_config = data_config(args, model)
        train_set.transform = train_transform(args, self.data_config)
        val_set.transform = create_transform(**self.data_config, is_training=False)
        self.mixup = None
        if args.mixup or args.cutmix:
            if args.batch_size % 2:
                raise InputError(f"--batch-size {args.batch_size}: mixup/cutmix pair up images and need an even "
                                 "batch (or --mixup 0 --cutmix 0)")
            self.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                               num_classes=len(self.classes))
            self.criterion = SoftTargetCrossEntropy()
        elif args.smoothing:
            self.criterion = LabelSmoothingCrossEntropy(args.smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()
        return model, train_set, val_set

    def loss(self, net, batch):
        x, y = batch
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        return self.criterion(net(x), y)

    @torch.no_grad()
    def evaluate(self, model, loader):
        """Loss, top-1 and top-5 (%) over the whole val split, summed across processes."""
        sums = [0.0, 0.0, 0.0, 0.0]  # loss, top-1 hits, top-5 hits, images
        for x, y in loader:
            x, y = x.to(self.run.device), y.to(self.run.device)
            with self.run.autocast():
                out = model(x).float()
            top1, top5 = accuracy(out, y, topk=(1, 5))  # top-5 is top-all under 5 classes
            n = len(y)
            for i, v in enumerate((F.cross_entropy(out, y).item() * n, top1.item() * n / 100,
                                   top5.item() * n / 100, n)):
                sums[i] += v
        loss, hits1, hits5, n = self.run.all_sum(sums)
        return {"val_loss": loss / n, "top1": 100 * hits1 / n, "top5": 100 * hits5 / n}

    def state(self):
        return {"classes": self.classes, "data_config": self.data_config}
