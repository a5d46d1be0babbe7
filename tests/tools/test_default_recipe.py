"""The default recipe of tools/train.py, with the libraries the set-up pins: nothing but DATA and --output (and a
model small enough for the CPU) trains, and the default augmentation survives an ImageNet-like stream of images."""
from __future__ import annotations

import argparse
import json
import random

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from attnzoo.tasks.classification import ClassificationTask, train_transform

from .conftest import TINY_DAVIT, load_tool

train = load_tool("train")


def _defaults() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ClassificationTask.add_arguments(parser)
    return parser.parse_args([])


def test_default_augmentation_survives_20000_images(shapes):
    """timm's RandAugment under `--aa rand-m9-mstd0.5-inc1` draws magnitudes up to 10, where PosterizeIncreasing
    keeps 0 bits; Pillow 13 raised on that about once in 1,500 images, killing an epoch within seconds."""
    args = _defaults()
    assert args.aa == "rand-m9-mstd0.5-inc1"
    transform = train_transform(args, {"input_size": (3, 32, 32), "interpolation": "bicubic",
                                       "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD})
    images = [Image.open(p).convert("RGB") for p in sorted((shapes / "train").rglob("*.png"))]
    random.seed(0)
    torch.manual_seed(0)
    for i in range(20_000):
        x = transform(images[i % len(images)])
        assert x.shape == (3, 32, 32) and torch.isfinite(x).all()


def test_default_flags_train(shapes, tmp_path):
    """Every classification flag at its default (augmentation, mixup/cutmix, label smoothing, random erasing,
    AMP choice, data workers); only the model and the image size are made small enough for a CPU test."""
    out = tmp_path / "run"
    assert train.main([str(shapes), "--output", str(out), *TINY_DAVIT, "--img-size", "32", "--batch-size", "4",
                       "--max-steps", "3"]) == 0
    state = json.loads((out / "checkpoints" / json.loads((out / "checkpoints" / "last.json").read_text())
                        ["checkpoint"] / "state.json").read_text())
    assert state["step"] == 3
