"""timm's model surface for the hierarchical families built from plain torch modules (L²ViT, RAVLT): a stem, a
``stages`` sequence of NCHW stages (4×, 8×, 16×, 32× reductions), a final ``norm``, a ``conv_head`` and a timm
``ClassifierHead``. A subclass builds those modules (``norm``/``conv_head`` may be ``nn.Identity``) in an
``__init__`` decorated with :func:`._common.takes_device_dtype`, and sets ``family`` for its messages."""
from __future__ import annotations

from typing import ClassVar

import torch
from timm.models._features import feature_take_indices
from torch import nn

from ._common import check_image_batch

__all__ = ["StagedNet"]


class StagedNet(nn.Module):
    family: ClassVar[str]
    in_chans: int
    num_classes: int
    stem: nn.Module
    stages: nn.Sequential
    norm: nn.Module
    conv_head: nn.Module
    head: nn.Module

    def stage_feature_info(self, dims: tuple[int, ...]) -> list[dict]:
        return [dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}") for i, dim in enumerate(dims)]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            (r"^(norm|conv_head)", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """The stages' NCHW outputs at ``indices`` (the last one through ``norm`` when asked), and the final
        features unless ``intermediates_only``."""
        if output_fmt != "NCHW":
            raise ValueError(f"{self.family}: forward_intermediates supports output_fmt='NCHW', got {output_fmt!r}")
        check_image_batch(self, x, self.in_chans, self.family)
        take, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages if not stop_early else self.stages[:max_index + 1]):
            x = stage(x)
            if i in take:
                intermediates.append(self.norm(x) if norm and i == len(self.stages) - 1 else x)
        return intermediates if intermediates_only else (self.norm(x), intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the norm and head when asked), as timm's models do
        for a features-only use; returns the kept indices."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.conv_head = nn.Identity()
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(self, x, self.in_chans, self.family)
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(self.conv_head(x), pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
