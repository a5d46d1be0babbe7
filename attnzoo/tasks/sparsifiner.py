"""Sparsifiner's two-phase recipe (Wei et al., CVPR 2023; the authors' ``main.py`` and default config) as a
``tools/train.py`` task on an ImageNet-style folder.

1. Reconstruction (``--sparsifiner-recon-epochs``, 5 in the default recipe): only the connectivity predictors
   train; every block attends densely and the loss is 0.01 × :func:`attn_recon_loss` against the dense
   teacher's attention maps.
2. Distillation (the remaining epochs): the predictors are frozen and choose the keys; the rest of the network
   trains on :func:`distill_loss`: the label loss + 0.5 × KL to the teacher's predictions + 0.5 × MSE to its
   final patch tokens.

The teacher is the dense DeiT with the student's starting weights (the authors start both from the same
published DeiT). Where they keep a separate optimizer and cosine schedule per phase, this task toggles
``requires_grad`` and runs one AdamW and one cosine schedule over all the epochs (a frozen parameter gets no
gradient, so AdamW leaves it and its moments alone).
"""
from __future__ import annotations

import argparse
import inspect

import timm
import torch

from ..backbones.sparsifiner import Sparsifiner, attention_maps, attn_recon_loss, distill_loss
from ..common import InputError
from .classification import ClassificationTask

RECON_WEIGHT = 0.01  # the authors' LOSS.ATTN_RECON.WEIGHT


class SparsifinerTask(ClassificationTask):
    name = "sparsifiner"
    find_unused_parameters = True  # one part of the network trains in each phase

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        ClassificationTask.add_arguments(parser)  # the classification recipe's augmentation options
        g = parser.add_argument_group("sparsifiner: the two-phase recipe (--task sparsifiner)")
        g.add_argument("--sparsifiner-recon-epochs", type=int, default=5,
                       help="epochs of predictor reconstruction before the distillation phase (default 5)")

    def build(self):
        model, train_set, val_set = super().build()
        if not isinstance(model, Sparsifiner):
            raise InputError(f"--task sparsifiner: --model {self.args.model} is not a Sparsifiner (e.g. "
                             "sparsifiner_deit_small_patch16_224.deit_init)")
        dense_name = model.pretrained_cfg["architecture"].removeprefix("sparsifiner_")
        predictor_args = set(inspect.signature(Sparsifiner).parameters) - {"device", "dtype", "kwargs"}
        dense_args = {k: v for k, v in self.args.model_args.items() if k not in predictor_args}
        self.teacher = timm.create_model(dense_name, num_classes=model.num_classes,
                                         img_size=model.patch_embed.img_size, **dense_args)
        shared = {k: v for k, v in model.state_dict().items() if ".mask_predictor." not in k}
        self.teacher.load_state_dict(shared)
        self.teacher.requires_grad_(False).eval().to(self.run.device)
        self.student = model
        self.tokens = None
        model.norm.register_forward_hook(lambda _m, _i, out: setattr(self, "tokens", out))
        return model, train_set, val_set

    def set_epoch(self, epoch: int) -> None:
        recon = epoch < self.args.sparsifiner_recon_epochs
        self.student.set_attn_recon(recon)
        for name, p in self.student.named_parameters():
            p.requires_grad_((".mask_predictor." in name) == recon)

    def loss(self, net, batch):
        x, y = batch
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        logits = net(x)
        if self.student.blocks[0].attn.attn_recon:
            return RECON_WEIGHT * attn_recon_loss(self.student.approx_attentions(), attention_maps(self.teacher, x))
        with torch.no_grad():
            teacher_tokens = self.teacher.forward_features(x)
            teacher_logits = self.teacher.forward_head(teacher_tokens)
        return distill_loss(logits, self.tokens[:, 1:], teacher_logits, teacher_tokens[:, 1:], y,
                            base_criterion=self.criterion)
