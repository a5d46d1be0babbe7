"""Attribute-specific retrieval data in the layouts the ASEN/ASEN++ and CSN authors publish.

FashionAI, DARN and DeepFashion as in ASEN++'s ``data.zip`` (``Maryeon/asenpp``, README "Layout" and
``modules/data``), one folder per dataset, image paths relative to it::

    filenames_{train,valid,test}.txt    one image path a line; line i is image i of that split
    label_train.txt                     "i a v [a v ...]": training image i has value v of attribute a
    query_{valid,test}.txt              "i a v": image i of the split is a query of attribute a, value v
    candidate_{valid,test}.txt          "i a v": the same for the candidates it is ranked against

The attribute names and value counts come from ASEN's ``meta.json`` beside the dataset folders
(``{"FashionAI": {"ATTRIBUTES": [names], "ATTRIBUTES_NUM": {name: count}}, ...}``, read by ``Maryeon/asen``'s
``MetaLoader``/``TripletGenerator``) or from ASEN++'s ``config/<Dataset>/<Dataset>.yaml``
(``DATA.ATTRIBUTES.NAME`` and ``DATA.ATTRIBUTES.NUM``).

Zappos50K as CSN publishes it (``andreasveit/conditional-similarity-networks``, ``triplet_image_loader.py``):
``filenames.json`` (read line by line, one image path a line, as CSN's loader does), images under
``ut-zap50k-images/``, and ``tripletlists/{class,closure,gender,heel}_tripletlist_{train,val,test}.txt`` whose
lines "a b c" say that image a is closer to image c than to image b under that condition.

Training triplets are drawn as ASEN++'s ``TripletSampler`` draws them: an attribute uniformly, two of its
values, an anchor and a positive with the first value and a negative with the second. The draw uses python's
``random``, which ``tools/train.py`` seeds per sample. Unlike ASEN++ (which fails on them) we draw only values
that can supply the images: at least two for the positive value, one for the negative.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..common import InputError

__all__ = ["ZAPPOS_CONDITIONS", "AttributeImages", "AttributeTriplets", "Attributes", "ZapposTriplets",
           "read_attributes"]

ZAPPOS_CONDITIONS = ("class", "closure", "gender", "heel")  # CSN's condition order
EVAL_SPLITS = ("valid", "test")


@dataclass(frozen=True)
class Attributes:
    """The attributes of a dataset: their names and how many values each takes."""

    names: tuple[str, ...]
    num_values: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.names)


def read_attributes(path: str | os.PathLike, dataset: str) -> Attributes:
    """``dataset``'s attributes from ASEN's ``meta.json`` or ASEN++'s ``<Dataset>.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"attribute file {path} does not exist (expected ASEN's meta.json or ASEN++'s "
                         "config/<Dataset>/<Dataset>.yaml)")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            attrs = yaml.safe_load(text)["DATA"]["ATTRIBUTES"]
            names, counts = attrs["NAME"], attrs["NUM"]
        else:
            meta = json.loads(text)
            if dataset not in meta:
                raise InputError(f"{path} has no entry {dataset!r} (it has {sorted(meta)})")
            names = meta[dataset]["ATTRIBUTES"]
            counts = [meta[dataset]["ATTRIBUTES_NUM"][n] for n in names]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: malformed attribute file ({type(e).__name__}: {e}); expected "
                         '{"DATASET": {"ATTRIBUTES": [names], "ATTRIBUTES_NUM": {name: count}}} (meta.json) or '
                         "DATA: ATTRIBUTES: NAME: [names] NUM: [counts] (yaml)") from None
    if (not isinstance(names, list) or not isinstance(counts, list) or len(names) != len(counts) or not names
            or not all(isinstance(c, int) and c >= 2 for c in counts)):
        raise InputError(f"{path}: expected as many attribute names as value counts, each count an integer >= 2; "
                         f"got names {names!r} and counts {counts!r}")
    return Attributes(tuple(str(n) for n in names), tuple(counts))


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered non-blank lines of a text file that must exist."""
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, line.strip()


def read_filenames(path: Path) -> list[str]:
    """One image path a line."""
    names = [line for _, line in _lines(path)]
    if not names:
        raise InputError(f"{path} lists no images")
    return names


def _ints(path: Path, number: int, line: str, expected: str) -> list[int]:
    try:
        return [int(t) for t in line.split()]
    except ValueError:
        raise InputError(f"{path} line {number}: {line!r} is not {expected}") from None


def _check(path: Path, number: int, image: int, attribute: int, value: int, attributes: Attributes,
           num_images: int) -> None:
    if not 0 <= image < num_images:
        raise InputError(f"{path} line {number}: image index {image} is outside the {num_images} images of the "
                         "split's filenames file")
    if not 0 <= attribute < len(attributes):
        raise InputError(f"{path} line {number}: attribute {attribute} is outside 0..{len(attributes) - 1}")
    if not 0 <= value < attributes.num_values[attribute]:
        raise InputError(f"{path} line {number}: value {value} of attribute {attribute} "
                         f"({attributes.names[attribute]}) is outside 0..{attributes.num_values[attribute] - 1}")


def read_labels(path: Path, attributes: Attributes, num_images: int) -> list[tuple[int, int, int]]:
    """``label_train.txt``: each line "i a v [a v ...]" as (image, attribute, value) triples."""
    out = []
    for number, line in _lines(path):
        row = _ints(path, number, line, "'image attribute value [attribute value ...]' integers")
        if len(row) < 3 or len(row) % 2 == 0:
            raise InputError(f"{path} line {number}: {line!r} is not 'image attribute value [attribute value ...]'")
        for a, v in zip(row[1::2], row[2::2], strict=True):
            _check(path, number, row[0], a, v, attributes, num_images)
            out.append((row[0], a, v))
    return out


def read_samples(path: Path, attributes: Attributes, num_images: int) -> list[tuple[int, int, int]]:
    """``query_*.txt`` / ``candidate_*.txt``: each line "i a v"."""
    out = []
    for number, line in _lines(path):
        row = _ints(path, number, line, "'image attribute value' integers")
        if len(row) != 3:
            raise InputError(f"{path} line {number}: {line!r} is not 'image attribute value'")
        _check(path, number, *row, attributes, num_images)
        out.append((row[0], row[1], row[2]))
    if not out:
        raise InputError(f"{path} lists no images")
    return out


def load_image(path: Path, source: Path) -> Image.Image:
    """The RGB image at ``path``, listed in ``source``."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"image {path} (listed in {source}) does not exist") from None
    except OSError as e:
        raise InputError(f"image {path} (listed in {source}) cannot be read: {e}") from None


class AttributeTriplets(Dataset):
    """Training triplets (anchor, positive, negative, attribute) of an ASEN++ dataset folder, ``num_triplets`` of
    them an epoch, each drawn afresh from python's ``random`` (seeded per sample by ``tools/train.py``)."""

    def __init__(self, root: str | os.PathLike, attributes: Attributes, num_triplets: int,
                 transform: Callable | None = None):
        self.root, self.attributes, self.num_triplets, self.transform = Path(root), attributes, num_triplets, transform
        if num_triplets < 1:
            raise ValueError(f"num_triplets={num_triplets}: expected at least 1")
        self.filenames_file = self.root / "filenames_train.txt"
        self.filenames = read_filenames(self.filenames_file)
        # by_value[a][v]: the training images with value v of attribute a
        self.by_value: list[list[list[int]]] = [[[] for _ in range(n)] for n in attributes.num_values]
        for image, a, v in read_labels(self.root / "label_train.txt", attributes, len(self.filenames)):
            self.by_value[a][v].append(image)
        # per attribute, the values that can be a positive (two images) and those that can be a negative (one)
        self.positive_values = [[v for v, images in enumerate(values) if len(images) >= 2] for values in self.by_value]
        self.negative_values = [[v for v, images in enumerate(values) if images] for values in self.by_value]
        self.drawable = [a for a in range(len(attributes))
                         if self.positive_values[a] and len(self.negative_values[a]) >= 2]
        if not self.drawable:
            raise InputError(f"{self.root / 'label_train.txt'}: no attribute has a value with two images and another "
                             "value with one, so no training triplet can be drawn")

    def __len__(self) -> int:
        return self.num_triplets

    def draw(self) -> tuple[int, int, int, int]:
        """(anchor, positive, negative, attribute) image indices, as ASEN++'s TripletSampler draws them."""
        a = random.choice(self.drawable)
        vp = random.choice(self.positive_values[a])
        vn = random.choice([v for v in self.negative_values[a] if v != vp])
        values = self.by_value[a]
        anchor, positive = random.sample(values[vp], 2)
        return anchor, positive, random.choice(values[vn]), a

    def __getitem__(self, index: int):
        *images, a = self.draw()
        loaded = [load_image(self.root / self.filenames[i], self.filenames_file) for i in images]
        if self.transform is not None:
            loaded = [self.transform(img) for img in loaded]
        return (*loaded, a)


class AttributeImages(Dataset):
    """The queries, then the candidates, of an ASEN++ evaluation split: items (image, attribute, value,
    is_query); ``num_queries`` of them are queries."""

    def __init__(self, root: str | os.PathLike, attributes: Attributes, split: str = "valid",
                 transform: Callable | None = None):
        if split not in EVAL_SPLITS:
            raise ValueError(f"split={split!r}: expected one of {EVAL_SPLITS}")
        self.root, self.attributes, self.transform = Path(root), attributes, transform
        self.filenames_file = self.root / f"filenames_{split}.txt"
        self.filenames = read_filenames(self.filenames_file)
        queries = read_samples(self.root / f"query_{split}.txt", attributes, len(self.filenames))
        candidates = read_samples(self.root / f"candidate_{split}.txt", attributes, len(self.filenames))
        self.samples, self.num_queries = queries + candidates, len(queries)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image, a, v = self.samples[index]
        img = load_image(self.root / self.filenames[image], self.filenames_file)
        if self.transform is not None:
            img = self.transform(img)
        return img, a, v, index < self.num_queries


class ZapposTriplets(Dataset):
    """CSN's Zappos50K triplets of ``split`` (train, val or test): items (anchor, positive, negative, condition),
    the condition an index into :data:`ZAPPOS_CONDITIONS`. ``num_triplets`` keeps that many, chosen by a
    permutation seeded by ``seed`` (CSN keeps the first ``num_triplets`` after an unseeded shuffle)."""

    def __init__(self, root: str | os.PathLike, split: str, num_triplets: int | None = None, seed: int = 0,
                 transform: Callable | None = None):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split={split!r}: expected 'train', 'val' or 'test'")
        self.root, self.transform = Path(root), transform
        self.filenames_file = self.root / "filenames.json"
        self.filenames = read_filenames(self.filenames_file)
        triplets = []
        for c, condition in enumerate(ZAPPOS_CONDITIONS):
            path = self.root / "tripletlists" / f"{condition}_tripletlist_{split}.txt"
            for number, line in _lines(path):
                row = _ints(path, number, line, "three image indices 'anchor far close'")
                if len(row) != 3 or not all(0 <= i < len(self.filenames) for i in row):
                    raise InputError(f"{path} line {number}: {line!r} is not three image indices 'anchor far close' "
                                     f"below {len(self.filenames)}")
                anchor, far, close = row
                triplets.append((anchor, close, far, c))
        if num_triplets is not None and num_triplets < len(triplets):
            keep = np.random.default_rng(seed).permutation(len(triplets))[:num_triplets]
            triplets = [triplets[i] for i in sorted(keep)]
        self.triplets = triplets

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, index: int):
        *images, c = self.triplets[index]
        loaded = [load_image(self.root / "ut-zap50k-images" / self.filenames[i], self.filenames_file)
                  for i in images]
        if self.transform is not None:
            loaded = [self.transform(img) for img in loaded]
        return (*loaded, c)
