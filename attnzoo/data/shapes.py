"""A procedurally generated "shapes" dataset, so the tools run with no download.

Each image shows one or two shapes of a single class (circle, square, triangle, star, cross), in random
colours, sizes, positions and rotations, that never overlap, on a textured background (noise, stripes or a
checkerboard). The class of an image is the class of its shapes, so the same images serve classification
(an ImageNet-style folder) and detection/segmentation (a COCO json with boxes and polygon masks).

Every shape is drawn as a polygon (a circle as a 48-gon), so the COCO polygon is exactly the drawn outline.
Everything is a function of ``seed``: image ``i`` of a split draws from ``np.random.default_rng([seed, split, i])``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..common import atomic_dir

CLASSES = ("circle", "square", "triangle", "star", "cross")
SPLITS = ("train", "val")
_MANIFEST = "shapes.json"


@dataclass(frozen=True)
class ShapesSpec:
    """What :func:`make_shapes_dataset` writes; stored as ``shapes.json`` so a second call can reuse the folder."""

    train_per_class: int = 60
    val_per_class: int = 20
    image_size: int = 64
    seed: int = 0


def _outline(cls: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """The polygon of a shape of circumradius ``r`` centred at (cx, cy), rotated by ``angle``."""
    if cls == "cross":  # a plus sign with arms 0.4 r wide: 12 corners
        w = 0.2 * r
        local = [(w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r),
                 (w, r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in local]
    if cls == "star":  # five points, inner radius 0.45 r
        radii = [r if j % 2 == 0 else 0.45 * r for j in range(10)]
    else:
        corners = {"circle": 48, "square": 4, "triangle": 3}[cls]
        radii = [r] * corners
    n = len(radii)
    return [
        (cx + rad * math.cos(angle + 2 * math.pi * j / n), cy + rad * math.sin(angle + 2 * math.pi * j / n))
        for j, rad in enumerate(radii)
    ]


def _polygon_area(points: list[tuple[float, float]]) -> float:
    """Shoelace formula."""
    xs, ys = np.array(points).T
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """A low-contrast texture around a random base colour (noise, stripes or a checkerboard), and its
    brightness."""
    base = rng.uniform(60, 200, size=3)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:
        pattern = rng.normal(0, 1, (size, size))
    elif kind == 1:
        theta, period = rng.uniform(0, math.pi), rng.uniform(4, 12)
        pattern = np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
    else:
        cell = int(rng.integers(4, 12))
        pattern = ((xx // cell + yy // cell) % 2) * 2 - 1
    tint = rng.uniform(-25, 25, size=3)
    img = base + pattern[..., None] * tint + rng.normal(0, 6, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8), float(base.mean())


def render(rng: np.random.Generator, cls: str, size: int) -> tuple[Image.Image, list[dict]]:
    """One image of 1-2 shapes of class ``cls``; returns it and each shape's ``polygon``, ``bbox`` and ``area``."""
    background, brightness = _background(rng, size)
    img = Image.fromarray(background)
    draw = ImageDraw.Draw(img)
    placed: list[tuple[float, float, float]] = []
    shapes = []
    for _ in range(int(rng.integers(1, 3))):
        for _attempt in range(20):  # rejection sampling: shapes stay inside the image and apart
            r = rng.uniform(0.18, 0.32) * size
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        outline = _outline(cls, cx, cy, r, rng.uniform(0, 2 * math.pi))
        # any hue, but darker than a light background or lighter than a dark one, so the outline is visible
        low, high = (0, 90) if brightness > 130 else (165, 256)
        colour = tuple(int(c) for c in rng.integers(low, high, size=3))
        draw.polygon(outline, fill=colour)
        xs, ys = zip(*outline, strict=True)
        shapes.append({
            "polygon": [round(v, 2) for point in outline for v in point],
            "bbox": [round(min(xs), 2), round(min(ys), 2), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
            "area": round(_polygon_area(outline), 2),
            "colour": colour,
        })
    return img, shapes


def _write(root: Path, spec: ShapesSpec) -> None:
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    (root / "annotations").mkdir(parents=True)
    for split_id, (split, per_class) in enumerate(zip(SPLITS, (spec.train_per_class, spec.val_per_class), strict=True)):
        images, annotations = [], []
        for label, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for j in range(per_class):
                index = label * per_class + j
                img, shapes = render(np.random.default_rng([spec.seed, split_id, index]), cls, spec.image_size)
                file_name = f"{split}/{cls}/{cls}_{j:05d}.png"
                img.save(root / file_name)
                image_id = index + 1
                images.append({"id": image_id, "file_name": file_name, "width": spec.image_size,
                               "height": spec.image_size})
                for shape in shapes:
                    annotations.append({
                        "id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                        "bbox": shape["bbox"], "area": shape["area"], "segmentation": [shape["polygon"]],
                        "iscrowd": 0,
                    })
        coco = {"info": {"description": "attnzoo shapes", **asdict(spec)}, "images": images,
                "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    (root / _MANIFEST).write_text(json.dumps(asdict(spec), indent=2))


def make_shapes_dataset(root: str | os.PathLike, spec: ShapesSpec | None = None) -> Path:
    """Write the shapes dataset under ``root`` and return it::

        root/train/<class>/*.png, root/val/<class>/*.png          ImageNet-style folders
        root/annotations/instances_{train,val}.json               COCO: boxes [x, y, w, h], polygon masks

    A folder already written with the same ``spec`` is reused; a different one is an error rather than
    overwritten. The folder is built beside ``root`` and renamed into place, so it is never half-written.
    """
    spec = spec or ShapesSpec()
    root = Path(root)
    if root.exists():
        manifest = root / _MANIFEST
        if manifest.is_file() and json.loads(manifest.read_text()) == asdict(spec):
            return root
        if any(root.iterdir()):
            raise FileExistsError(f"make_shapes_dataset: {root} exists and is not a shapes dataset made with "
                                  f"{spec}; choose another folder or delete it")
        root.rmdir()
    with atomic_dir(root) as tmp:
        _write(tmp, spec)
    return root

