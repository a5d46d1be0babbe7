"""Loading the authors' own training checkpoints, shared by the families whose authors published ``.pth`` files."""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import torch
from torch import nn

# where training scripts keep the weights in a checkpoint dict: the plain ones first, then the EMA's
WEIGHT_ENTRIES = ("state_dict", "model")
EMA_ENTRIES = ("state_dict_ema", "model_ema")


def read_training_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load(path, weights_only=True)``, allow-listing the ``argparse.Namespace`` of training arguments that
    the authors' scripts (ConvNeXt-style ``save_model``, DeiT's, timm's) pickle beside the weights."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_weights(checkpoint: dict, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict inside a training checkpoint, chosen by the file's name.

    Such a checkpoint holds the plain weights and, when the run kept one, an EMA of them. The ConvNeXt-derived
    scripts (L²ViT's ``classification/main.py``) write ``checkpoint-best.pth`` when the plain weights reach their
    best accuracy and ``checkpoint-best-ema.pth`` when the EMA's do, each file holding both: so a file whose name
    ends in ``ema`` gives its EMA entry, any other its plain one. A bare state_dict is returned as it is."""
    entries = [k for k in (*WEIGHT_ENTRIES, *EMA_ENTRIES) if isinstance(checkpoint.get(k), dict)]
    if not entries:
        return checkpoint
    if Path(path).stem.lower().endswith("ema"):
        ema = [k for k in EMA_ENTRIES if k in entries]
        if not ema:
            raise ValueError(f"{path}: the file name says EMA weights, but the checkpoint has only {entries}")
        return checkpoint[ema[0]]
    return checkpoint[entries[0]]


def load_authors_checkpoint(model: nn.Module, path: str, filter_fn) -> None:
    """Load an authors' training checkpoint (:func:`read_training_checkpoint`, :func:`checkpoint_weights`), convert
    it with ``filter_fn`` and load it strictly. A head of another class count than the checkpoint's is left at its
    initialisation."""
    state_dict = filter_fn(checkpoint_weights(read_training_checkpoint(path), path), model)
    own = model.state_dict()
    head = [k for k in state_dict if k.startswith("head.") and k in own and state_dict[k].shape != own[k].shape]
    for k in head:
        state_dict[k] = own[k]
    model.load_state_dict(state_dict, strict=True)


def split_output_norms(state_dict: dict, pattern: str) -> tuple[dict, dict]:
    """(the rest, the output norms as ``out_norms.{i}.*``) of an authors' detection backbone's state_dict, whose
    norm on the output of stage i has the keys matching ``pattern`` (a regex with the level as its one group,
    e.g. ``r"norm(\\d+)\\."``) followed by the parameter name."""
    rest, norms = {}, {}
    for key, value in state_dict.items():
        match = re.match(pattern, key)
        if match:
            norms[f"out_norms.{match[1]}.{key[match.end():]}"] = value
        else:
            rest[key] = value
    return rest, norms
