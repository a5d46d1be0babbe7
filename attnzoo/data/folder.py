"""ImageNet-style folders (``root/train/<class>/*``, ``root/val/<class>/*``) read through timm's ``ImageDataset``,
with the checks a tool needs before it starts: the folder exists, holds images, and unreadable files are
dropped and counted up front rather than met halfway through an epoch.
"""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image
from timm.data import ImageDataset
from timm.data.readers.img_extensions import get_img_extensions

from ..common import InputError


def _readable(path: str) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()  # parses the file without decoding every pixel
        return True
    except Exception:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...) for a bad file
        return False


def image_folder(root: str | os.PathLike, split: str, class_to_idx: dict[str, int] | None = None,
                 transform=None) -> tuple[ImageDataset, list[str]]:
    """timm's ``ImageDataset`` over ``root/split``, and the unreadable files it left out.

    ``class_to_idx`` fixes the labels (pass the training split's, so val uses the same indices); by default the
    sorted sub-folder names. Raises :class:`InputError` when the folder is missing or has no readable image.
    """
    root = Path(root)
    folder = root / split
    if not root.is_dir():
        raise InputError(f"data folder {root} does not exist")
    if not folder.is_dir():
        raise InputError(f"data folder {root} has no {split}/ sub-folder; expected an ImageNet-style folder: "
                         f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg")
    try:
        dataset = ImageDataset(str(folder), class_map=class_to_idx or "", transform=transform)
    except RuntimeError:  # timm's reader found no file with an image extension
        raise InputError(f"{folder} has no images (expected one sub-folder per class holding "
                         f"{', '.join(get_img_extensions())} files)") from None
    samples = dataset.reader.samples
    # timm's reader derives the classes from the files it finds: an empty class folder would silently vanish
    # (and, in train, take the val images of that class with it)
    found = {Path(path).relative_to(folder).parts[0] for path, _ in samples}
    empty = sorted(d.name for d in folder.iterdir()
                   if d.is_dir() and not d.name.startswith(".") and d.name not in found)
    if empty:
        raise InputError(f"{folder}: class folder(s) {', '.join(empty)} hold no image (expected "
                         f"{', '.join(get_img_extensions())} files in each class folder)")
    skipped = [path for path, _ in samples if not _readable(path)]
    if skipped:
        bad = set(skipped)
        dataset.reader.samples = [s for s in samples if s[0] not in bad]
    if not dataset.reader.samples:
        raise InputError(f"{folder} has no readable images ({len(skipped)} unreadable)")
    return dataset, skipped


def class_names(dataset: ImageDataset) -> list[str]:
    """The class of each label index."""
    return sorted(dataset.reader.class_to_idx, key=dataset.reader.class_to_idx.get)
