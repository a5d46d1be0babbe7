"""The embedded shapes dataset: deterministic, and its COCO annotations describe the pixels drawn."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from attnzoo.data import CLASSES, ShapesSpec, make_shapes_dataset, render

SPEC = ShapesSpec(train_per_class=2, val_per_class=1, image_size=48, seed=3)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", SPEC)
    b = make_shapes_dataset(tmp_path / "b", SPEC)
    c = make_shapes_dataset(tmp_path / "c", ShapesSpec(**{**SPEC.__dict__, "seed": 4}))
    assert _digest(a) == _digest(b)
    pngs = [k for k in _digest(a) if k.endswith(".png")]
    assert sum(_digest(a)[k] != _digest(c)[k] for k in pngs) == len(pngs)


def test_folder_layout_and_reuse(tmp_path):
    root = make_shapes_dataset(tmp_path / "s", SPEC)
    for split, n in (("train", 2), ("val", 1)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(CLASSES)
        assert all(len(list((root / split / c).glob("*.png"))) == n for c in CLASSES)
    before = _digest(root)
    assert make_shapes_dataset(root, SPEC) == root and _digest(root) == before  # reused, not rewritten
    with pytest.raises(FileExistsError, match="not a shapes dataset made with"):
        make_shapes_dataset(root, ShapesSpec(seed=9))


def test_coco_polygons_cover_the_drawn_shapes(tmp_path):
    root = make_shapes_dataset(tmp_path / "s", SPEC)
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(CLASSES)
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == 2 * len(CLASSES) and len(coco["annotations"]) >= len(images)
    for ann in coco["annotations"]:
        image = images[ann["image_id"]]
        assert image["file_name"].split("/")[1] == CLASSES[ann["category_id"] - 1]
        xy = np.array(ann["segmentation"][0]).reshape(-1, 2)
        x, y, w, h = ann["bbox"]
        assert np.allclose([xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()],
                           [x, y, x + w, y + h], atol=0.02)
        # rasterise the polygon: inside it the image has one colour (the shape's), unlike the background
        mask = Image.new("L", (image["width"], image["height"]))
        ImageDraw.Draw(mask).polygon([tuple(p) for p in xy], fill=1)
        mask = np.array(mask, dtype=bool)
        pixels = np.array(Image.open(root / image["file_name"]).convert("RGB"))[mask]
        colours, counts = np.unique(pixels, axis=0, return_counts=True)
        assert counts.max() / len(pixels) > 0.8  # the edge pixels may be anti-aliased differently
        assert abs(mask.sum() - ann["area"]) < 0.25 * ann["area"] + 10


def test_render_is_a_function_of_the_generator_state():
    a, shapes_a = render(np.random.default_rng(1), "star", 40)
    b, shapes_b = render(np.random.default_rng(1), "star", 40)
    assert np.array_equal(np.array(a), np.array(b)) and shapes_a == shapes_b
    assert 1 <= len(shapes_a) <= 2
