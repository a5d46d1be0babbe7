"""ImageNet-style folders (``root/train/<class>/*``, ``root/val/<class>/*``) read through timm's folder reader,
with the checks a tool needs before it starts: the folder exists and every class folder holds images.

Nothing is opened up front (timm's reader only lists names): an image is decoded when it is first read, and one
that cannot be (a truncated JPEG, a file that is no image) raises :class:`~attnzoo.common.UnreadableSample`
naming it, which the training loader replaces and counts (:class:`attnzoo.engine.sampler.SeededSamples`) and
``tools/eval.py`` leaves out and counts (:class:`Readable`, :func:`collate_readable`).
"""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image
from timm.data import ImageDataset
from timm.data.readers.img_extensions import get_img_extensions
from torch.utils.data import Dataset, default_collate

from ..common import InputError, UnreadableSample

__all__ = ["Readable", "StrictImageDataset", "class_names", "collate_readable", "image_folder"]


class StrictImageDataset(ImageDataset):
    """timm's ``ImageDataset`` (over any timm reader: a folder's, shards', a Hugging Face dataset's) whose
    unreadable image raises :class:`UnreadableSample` naming it; timm's own logs a warning and silently returns
    the next index's image instead."""

    def __getitem__(self, index: int):
        try:
            file, target = self.reader[index][:2]  # an open file (or bytes) and the label
            with file, Image.open(file) as image:
                img = image.convert(self.input_img_mode)  # decodes every pixel: a truncated file fails here
        except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...) for a bad file
            raise UnreadableSample(self.reader.filename(index, absolute=True), f"{type(e).__name__}: {e}") from None
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def image_folder(root: str | os.PathLike, split: str, class_to_idx: dict[str, int] | None = None,
                 transform=None) -> StrictImageDataset:
    """:class:`StrictImageDataset` over ``root/split``.

    ``class_to_idx`` fixes the labels (pass the training split's, so val uses the same indices); by default the
    sorted sub-folder names. Raises :class:`InputError` when the folder is missing, has no image or has an empty
    class folder.
    """
    root = Path(root)
    folder = root / split
    if not root.is_dir():
        raise InputError(f"data folder {root} does not exist")
    if not folder.is_dir():
        raise InputError(f"data folder {root} has no {split}/ sub-folder; expected an ImageNet-style folder: "
                         f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg")
    try:
        dataset = StrictImageDataset(str(folder), class_map=class_to_idx or "", transform=transform)
    except RuntimeError:  # timm's reader found no file with an image extension
        raise InputError(f"{folder} has no images (expected one sub-folder per class holding "
                         f"{', '.join(get_img_extensions())} files)") from None
    # timm's reader derives the classes from the files it finds: an empty class folder would silently vanish
    # (and, in train, take the val images of that class with it)
    prefix = len(str(folder)) + 1  # the reader's paths are os.path.join(folder, class, ...): strings, cheaper than Path
    found = {path[prefix:].split(os.sep, 1)[0] for path, _ in dataset.reader.samples}
    empty = sorted(d.name for d in folder.iterdir()
                   if d.is_dir() and not d.name.startswith(".") and d.name not in found)
    if empty:
        raise InputError(f"{folder}: class folder(s) {', '.join(empty)} hold no image (expected "
                         f"{', '.join(get_img_extensions())} files in each class folder)")
    return dataset


def class_names(dataset: ImageDataset) -> list[str]:
    """The class of each label index."""
    return sorted(dataset.reader.class_to_idx, key=dataset.reader.class_to_idx.get)


class Readable(Dataset):
    """``dataset``'s samples, an unreadable one as its :class:`UnreadableSample` (for :func:`collate_readable`)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except UnreadableSample as e:
            return e


def collate_readable(items: list) -> tuple[object | None, list[UnreadableSample]]:
    """The batch of the readable samples of ``items`` (None when there is none) and the unreadable ones."""
    bad = [item for item in items if isinstance(item, UnreadableSample)]
    good = [item for item in items if not isinstance(item, UnreadableSample)]
    return (default_collate(good) if good else None), bad
