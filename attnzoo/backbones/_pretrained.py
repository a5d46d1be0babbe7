"""Loading the authors' own training checkpoints, shared by the families whose authors published ``.pth`` files."""
from __future__ import annotations

import argparse

import torch
from torch import nn


def load_authors_checkpoint(model: nn.Module, path: str, filter_fn) -> None:
    """Load an authors' training checkpoint with ``weights_only=True``, allow-listing the ``argparse.Namespace``
    of their training arguments that it pickles, then convert it with ``filter_fn`` and load it strictly. A head
    of another class count than the checkpoint's is left at its initialisation."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = filter_fn(checkpoint, model)
    own = model.state_dict()
    head = [k for k in state_dict if k.startswith("head.") and k in own and state_dict[k].shape != own[k].shape]
    for k in head:
        state_dict[k] = own[k]
    model.load_state_dict(state_dict, strict=True)
