"""Evaluate a model: top-1/top-5 accuracy and throughput of a classifier on an ImageNet-style folder, or the
COCO bbox/segm mAP (mIoU for a segmentor) of a detection checkpoint with its mmdetection config (a ``.py`` path
as the first argument, as in tools/train.py).

    python tools/eval.py davit_tiny DATA                          # a tag: timm's/attnzoo's pretrained weights
    python tools/eval.py local-dir:runs/demo/hub DATA             # a folder in timm's Hub layout (tools/publish.py)
    python tools/eval.py hf-hub:ORG/NAME DATA
    python tools/eval.py davit_tiny DATA --checkpoint model.safetensors --model-args '{"embed_dims": [...]}'
    python tools/eval.py configs/davit/mask-rcnn_davit-t_fpn_1x_coco.py runs/det/iter_90000.pth --data-root DIR

Labels: when the model names its classes (``label_names`` in its config, as the Hub folders written by
tools/publish.py do) the folder's sub-folders are matched to them by name; otherwise the sorted sub-folder
names are the label indices. Throughput is images per second of the model's forward pass alone (after one
warm-up batch), and of the whole loop including data loading.

A config runs mmengine's ``Runner.test`` with the config's test evaluator (``attnzoo.det.runner``); the metrics
are printed as JSON and written to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from timm.data import create_transform
from timm.utils import accuracy
from torch.utils.data import DataLoader

import attnzoo  # noqa: F401  (registers attnzoo's models with timm)
from attnzoo.cli import add_config_arguments, at_least, tool_main
from attnzoo.common import InputError, atomic_write
from attnzoo.data import Readable, class_names, collate_readable, image_folder
from attnzoo.hub import create_model, load_weights
from attnzoo.tasks import data_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="timm/attnzoo name (pretrained), hf-hub:ORG/NAME or local-dir:PATH")
    p.add_argument("data", help="ImageNet-style folder")
    p.add_argument("--split", default="val", help="sub-folder to evaluate (default: val)")
    p.add_argument("--checkpoint", help="weights (.safetensors or .pth) instead of the pretrained ones")
    p.add_argument("--model-args", default="{}", type=json.loads, metavar="JSON",
                   help="extra keyword arguments for timm.create_model")
    p.add_argument("--img-size", type=at_least(1), help="input size (default: the model's)")
    p.add_argument("--batch-size", type=at_least(1), default=64)
    p.add_argument("--workers", type=at_least(0), default=4)
    p.add_argument("--out", help="also write the results to this JSON file")
    return p.parse_args(argv)


def parse_config_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eval.py", description="Evaluate a detection/segmentation checkpoint with "
                                "its config's test evaluator (COCO bbox/segm mAP, mIoU).")
    add_config_arguments(p)
    p.add_argument("checkpoint", help="checkpoint (.pth) written by tools/train.py or mmengine")
    p.add_argument("--output", help="work dir for the logs (default: runs/<config name>-eval)")
    p.add_argument("--out", help="also write the metrics to this JSON file")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    kwargs = dict(args.model_args)
    if args.checkpoint:  # the checkpoint's head decides the classes: one per sub-folder
        model = create_model(args.model, num_classes=num_classes, **kwargs)
        load_weights(model, args.checkpoint)
        return model
    return create_model(args.model, pretrained=True, **kwargs)


def label_map(model: torch.nn.Module, folder_classes: list[str]) -> dict[str, int] | None:
    """Folder class -> model output index, by name when the model names its classes."""
    names = model.pretrained_cfg.get("label_names")
    if not names:
        if len(folder_classes) > model.num_classes:
            raise InputError(f"the folder has {len(folder_classes)} classes but model {_name(model)} predicts "
                             f"{model.num_classes}")
        return None
    index = {name: i for i, name in enumerate(names)}
    unknown = [c for c in folder_classes if c not in index]
    if unknown:
        raise InputError(f"model {_name(model)} has no class named {', '.join(unknown[:5])} "
                         f"(its classes: {', '.join(list(names)[:10])})")
    return {c: index[c] for c in folder_classes}


def _name(model: torch.nn.Module) -> str:
    return model.pretrained_cfg.get("architecture", type(model).__name__)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Over a loader of :func:`attnzoo.data.collate_readable` batches; an unreadable image is named, counted
    (``skipped``) and left out."""
    model.eval()
    hits1 = hits5 = n = 0
    skipped: list[str] = []
    model_seconds, warmup = 0.0, 1 if len(loader) > 1 else 0  # the first batch pays for one-off set-up
    started = time.perf_counter()
    for i, (batch, unreadable) in enumerate(loader):
        for e in unreadable:
            print(f"unreadable image, left out: {e}", flush=True)
        skipped += [e.path for e in unreadable]
        if batch is None:
            continue
        x, y = (t.to(device) for t in batch)
        t = time.perf_counter()
        out = model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            model_seconds += time.perf_counter() - t
        top1, top5 = accuracy(out, y, topk=(1, 5))
        hits1, hits5, n = hits1 + top1.item() * len(y) / 100, hits5 + top5.item() * len(y) / 100, n + len(y)
    if not n:
        raise InputError(f"no readable image to evaluate ({len(skipped)} unreadable, e.g. {skipped[0]})")
    timed = n - warmup * loader.batch_size
    return {"images": n, "skipped": len(skipped), "top1": 100 * hits1 / n, "top5": 100 * hits5 / n,
            "model_img_per_s": timed / model_seconds if model_seconds else float("nan"),
            "loop_img_per_s": n / (time.perf_counter() - started)}


def _write(results: dict, out: str | None) -> None:
    text = json.dumps(results, indent=2)
    print(text, flush=True)
    if out:
        atomic_write(out, text)


def evaluate_config(argv: list[str]) -> None:
    args = parse_config_args(argv)  # needs the det extra
    from attnzoo.det import runner

    metrics = runner.test(args)
    if runner.is_main_process():
        _write({"config": args.config, "checkpoint": args.checkpoint,
                "metrics": {k: float(v) for k, v in metrics.items()}}, args.out)


def evaluate_classifier(args: argparse.Namespace) -> None:
    dataset = image_folder(args.data, args.split)
    model = build_model(args, len(class_names(dataset)))
    mapping = label_map(model, class_names(dataset))
    if mapping is not None:
        dataset = image_folder(args.data, args.split, class_to_idx=mapping)
    dataset.transform = create_transform(**data_config(args, model), is_training=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = DataLoader(Readable(dataset), batch_size=args.batch_size, num_workers=args.workers,
                        pin_memory=device.type == "cuda", collate_fn=collate_readable)
    _write({"model": args.model, "data": str(Path(args.data) / args.split),
            **evaluate(model.to(device), loader, device)}, args.out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].endswith(".py"):  # an mmdetection/mmsegmentation config and its checkpoint
        from attnzoo.engine import Run

        return tool_main("eval.py", lambda: evaluate_config(argv), cleanup=Run.close)
    args = parse_args(argv)
    return tool_main("eval.py", lambda: evaluate_classifier(args))


if __name__ == "__main__":
    sys.exit(main())
