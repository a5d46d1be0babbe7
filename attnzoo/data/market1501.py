"""Market-1501 (Zheng et al., ICCV 2015) in its published layout::

    ROOT/bounding_box_train/   12,936 images of 751 identities (training)
    ROOT/bounding_box_test/    19,732 gallery images: 750 identities, plus distractors (0000) and junk (-1)
    ROOT/query/                 3,368 query images

Names are ``PPPP_cCsS_FFFFFF_NN.jpg``: identity PPPP (``-1`` junk, ``0000`` distractor), camera C, sequence S,
frame, box number, e.g. ``0002_c1s1_000451_03.jpg``. The evaluation protocol (:func:`attnzoo.heads.dcal.
reid_metrics`) ignores junk and same-camera same-identity gallery images; distractors count as non-matches.

Training batches are P identities × K images (P×K sampling): :class:`Market1501Train` has one item per identity,
K of its images drawn from the sample's seeded generator, so ``tools/train.py``'s sampler (a function of the seed
and epoch) keeps resumption exact; :func:`flatten_identities` turns the [P, K, ...] batch into P·K images.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ..common import InputError

__all__ = ["Market1501Eval", "Market1501Train", "flatten_identities", "read_market_folder"]

NAME = re.compile(r"^(-1|\d+)_c(\d+)s\d+_\d+_\d+\.jpg$")


def read_market_folder(folder: Path) -> list[tuple[Path, int, int]]:
    """``(path, identity, camera)`` of every .jpg in ``folder``, sorted by name; identities as written (-1, 0, ...)."""
    if not folder.is_dir():
        raise InputError(f"Market-1501: {folder} does not exist (expected the published layout: bounding_box_train/, "
                         "bounding_box_test/ and query/ under the data folder)")
    samples = []
    for path in sorted(folder.glob("*.jpg")):
        match = NAME.match(path.name)
        if match is None:
            raise InputError(f"Market-1501: {path}: the name does not read as <identity>_c<camera>s<seq>_<frame>_"
                             "<box>.jpg (e.g. 0002_c1s1_000451_03.jpg)")
        samples.append((path, int(match.group(1)), int(match.group(2))))
    if not samples:
        raise InputError(f"Market-1501: {folder} has no .jpg images")
    return samples


def _load(path: Path, transform: Callable | None):
    with Image.open(path) as img:
        img = img.convert("RGB")
    return transform(img) if transform is not None else img


class Market1501Train(Dataset):
    """One item per training identity: K of its images (without replacement when it has K or more) and K copies of
    its label, 0..P-1 in the order of the identity numbers. Junk and distractor names (-1, 0000) are left out."""

    def __init__(self, root: str | os.PathLike, images_per_identity: int = 4, transform: Callable | None = None):
        if images_per_identity < 1:
            raise ValueError(f"Market-1501: `images_per_identity` must be >= 1, got {images_per_identity}")
        by_id: dict[int, list[Path]] = {}
        for path, pid, _ in read_market_folder(Path(root) / "bounding_box_train"):
            if pid > 0:
                by_id.setdefault(pid, []).append(path)
        self.identities = sorted(by_id)
        self.images = [by_id[pid] for pid in self.identities]
        self.k, self.transform = images_per_identity, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        paths = self.images[index]
        if len(paths) >= self.k:
            chosen = torch.randperm(len(paths))[: self.k]
        else:
            chosen = torch.randint(len(paths), (self.k,))
        images = torch.stack([_load(paths[i], self.transform) for i in chosen.tolist()])
        return images, torch.full((self.k,), index, dtype=torch.long)


class Market1501Eval(Dataset):
    """The query images then the gallery: ``(image, identity, camera, is_query)`` per item."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None):
        root = Path(root)
        query = read_market_folder(root / "query")
        gallery = read_market_folder(root / "bounding_box_test")
        self.samples = [(p, pid, cam, True) for p, pid, cam in query] + \
                       [(p, pid, cam, False) for p, pid, cam in gallery]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, pid, cam, is_query = self.samples[index]
        return _load(path, self.transform), pid, cam, is_query


def flatten_identities(batch: list):
    """Collate: training items [K, 3, H, W] images with [K] labels become one batch of P·K images; other items
    (evaluation) collate as usual."""
    out = default_collate(batch)
    if out[0].dim() == 5:
        return out[0].flatten(0, 1), out[1].flatten()
    return out
