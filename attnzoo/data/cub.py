"""CUB-200-2011 (Wah et al. 2011) in its published layout::

    ROOT/images.txt               "<image_id> <path under images/>"
    ROOT/image_class_labels.txt   "<image_id> <class_id>"            class ids 1..200
    ROOT/train_test_split.txt     "<image_id> <is_training_image>"   1 train, 0 test
    ROOT/classes.txt              "<class_id> <name>"
    ROOT/images/<class folder>/<name>.jpg
    (bounding_boxes.txt, parts/, attributes/ are not used)

Every file is checked before training starts: a missing file, a malformed line (named by file and line) or an
image id that one file has and another lacks is an :class:`~attnzoo.hub.InputError`.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from ..common import InputError

__all__ = ["CUB200"]


def _read_pairs(path: Path, what: str, int_value: bool) -> dict[int, str | int]:
    """``{id: value}`` from a file of "<id> <value>" lines, the value being the rest of the line."""
    if not path.is_file():
        raise InputError(f"CUB-200-2011: {path} does not exist (expected the dataset's published layout, with "
                         f"{path.name} holding '<id> <{what}>' lines)")
    pairs: dict[int, str | int] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        try:
            key = int(parts[0])
            value = int(parts[1]) if int_value else parts[1].strip()
        except (ValueError, IndexError):
            raise InputError(f"CUB-200-2011: {path} line {n}: expected '<id> <{what}>', got {line!r}") from None
        if key in pairs:
            raise InputError(f"CUB-200-2011: {path} line {n}: id {key} appears twice")
        pairs[key] = value
    return pairs


class CUB200(Dataset):
    """The train or test split of CUB-200-2011: ``(image, label)`` with labels 0..199 (the class id − 1).

    Args:
        root: the folder holding images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/.
        train: the training split (5,994 images) or the test split (5,794).
        transform: applied to the RGB PIL image.
    """

    def __init__(self, root: str | os.PathLike, train: bool, transform: Callable | None = None):
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"CUB-200-2011: data folder {root} does not exist")
        paths = _read_pairs(root / "images.txt", "path", int_value=False)
        labels = _read_pairs(root / "image_class_labels.txt", "class_id", int_value=True)
        split = _read_pairs(root / "train_test_split.txt", "is_training_image", int_value=True)
        classes = _read_pairs(root / "classes.txt", "name", int_value=False)
        if sorted(classes) != list(range(1, len(classes) + 1)):
            raise InputError(f"CUB-200-2011: {root / 'classes.txt'} must number its classes 1..{len(classes)}")
        for name, other in (("image_class_labels.txt", labels), ("train_test_split.txt", split)):
            missing = paths.keys() - other.keys()
            if missing:
                raise InputError(f"CUB-200-2011: {root / name} has no line for image id {min(missing)} of images.txt "
                                 f"({len(missing)} missing)")
        bad = [i for i in paths if not 1 <= labels[i] <= len(classes)]
        if bad:
            raise InputError(f"CUB-200-2011: {root / 'image_class_labels.txt'}: image id {bad[0]} has class "
                             f"{labels[bad[0]]}, not one of classes.txt's 1..{len(classes)}")
        self.classes = [str(classes[c]) for c in range(1, len(classes) + 1)]
        self.samples = [(root / "images" / str(paths[i]), int(labels[i]) - 1) for i in sorted(paths)
                        if split[i] == int(train)]
        absent = [str(p) for p, _ in self.samples if not p.is_file()]
        if absent:
            raise InputError(f"CUB-200-2011: {len(absent)} image(s) listed in images.txt are missing, e.g. {absent[0]}")
        if not self.samples:
            raise InputError(f"CUB-200-2011: {root / 'train_test_split.txt'} puts no image in the "
                             f"{'train' if train else 'test'} split")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as img:
            img = img.convert("RGB")
        return (self.transform(img) if self.transform is not None else img), label
