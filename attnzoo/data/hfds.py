"""Hugging Face datasets as classification data: ``hfds/NAME`` (timm's spelling; a Hub dataset such as
``ILSVRC/imagenet-1k``, read from the local cache, so ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`` work), a local
folder of parquet files (``train-*.parquet``, ``validation-*.parquet``: what the Hub serves) or a folder written
by ``DatasetDict.save_to_disk``.

Map-style (an Arrow table indexed by row), so the engine's sampler keeps its exact order. The image column is the
one with an ``Image`` feature, the label the ``ClassLabel`` one (its names are the classes). It needs the ``data``
extra (``pip install 'attnzoo[data]'``); without it :func:`hf_dataset` raises
:class:`~attnzoo.common.MissingExtraError` naming the extra.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

from timm.data.readers.reader import Reader

from ..common import InputError, MissingExtraError
from .folder import StrictImageDataset

__all__ = ["HF_PREFIX", "HfReader", "hf_dataset", "is_hf"]

HF_PREFIX = "hfds/"
# attnzoo's split names and the names a Hugging Face dataset may give them (ImageNet's say "validation")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation")}


def _is_saved(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file()  # DatasetDict.save_to_disk


def is_hf(data: str | os.PathLike) -> bool:
    """``hfds/NAME``, a save_to_disk folder or a folder holding parquet files."""
    root = Path(data)
    return str(data).startswith(HF_PREFIX) or (root.is_dir() and (
        _is_saved(root) or any(root.glob("*.parquet")) or any(root.glob("*/*.parquet"))))


def _load(data: str):
    try:
        import datasets
    except ImportError as e:
        raise MissingExtraError("attnzoo.data.hfds", "data", e.name) from None
    if data.startswith(HF_PREFIX):
        name = data[len(HF_PREFIX):]
        try:
            return datasets.load_dataset(name)
        except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
            raise InputError(f"{data}: no Hugging Face dataset {name!r} in the local cache nor on the Hub ({e})") \
                from None
    if _is_saved(Path(data)):
        return datasets.load_from_disk(data)
    return datasets.load_dataset(data)  # a folder of parquet files (split names from the file names)


class HfReader(Reader):
    """timm ``Reader`` over one split of a Hugging Face dataset: ``reader[i]`` is ``(file-like image, label)``."""

    def __init__(self, dataset, data: str):
        import datasets

        super().__init__()
        features = dataset.features
        images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
        labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
        if not images or not labels:
            raise InputError(f"{data}: expected an Image column and a ClassLabel column, found "
                             f"{', '.join(f'{k} ({type(f).__name__})' for k, f in features.items())}")
        self.image_key, self.label_key = images[0], labels[0]
        # the image undecoded: bytes (or a path), opened by the dataset like a file
        self.dataset = dataset.cast_column(self.image_key, datasets.Image(decode=False))
        self.class_to_idx = {name: i for i, name in enumerate(features[self.label_key].names)}

    def __getitem__(self, index: int):
        item = self.dataset[index]
        image = item[self.image_key]
        return (io.BytesIO(image["bytes"]) if image.get("bytes") else open(image["path"], "rb")), item[self.label_key]

    def __len__(self) -> int:
        return len(self.dataset)

    def _filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        return self.dataset[index][self.image_key].get("path") or f"{self.label_key}[{index}]"


def hf_dataset(data: str | os.PathLike, split: str, transform=None) -> StrictImageDataset:
    """:class:`~attnzoo.data.StrictImageDataset` (an unreadable image is named and replaced) over split
    ``split`` (``train``/``val``) of ``data`` (see the module)."""
    data = str(data)
    splits = _load(data)
    names = SPLIT_NAMES.get(split, (split,))
    name = next((n for n in names if n in splits), None)
    if name is None:
        raise InputError(f"{data}: no {' or '.join(names)} split (it has: {', '.join(splits) or 'none'})")
    return StrictImageDataset(data, reader=HfReader(splits[name], data), transform=transform)
