"""Train and test an mmdetection / mmsegmentation config with mmengine's Runner: the detection half of
``tools/train.py`` and ``tools/eval.py`` (both hand over here when their first argument is a ``.py`` config;
the command-line options are theirs, :func:`train` and :func:`test` take the parsed ``argparse.Namespace``).

    python tools/train.py configs/davit/retinanet_davit-t_fpn_1x_coco.py --data-root data/coco --output runs/ret
    python tools/train.py CONFIG --output runs/ret --resume           # continue from the last checkpoint
    torchrun --nproc_per_node=8 tools/train.py CONFIG --output runs/ret
    python tools/eval.py CONFIG runs/ret/iter_90000.pth --data-root data/coco --out metrics.json

The options follow mmdetection's ``tools/train.py`` and ``tools/test.py`` (``--cfg-options``, ``--amp``,
``--auto-scale-lr``; the launcher is ``pytorch`` when torchrun sets ``WORLD_SIZE``, with ``gloo`` on the CPU)
and the classification mode's ``--output``, ``--resume`` and ``--seed``. What this module adds to mmengine:

* checkpoints are written atomically: the config's ``CheckpointHook`` becomes
  :class:`attnzoo.det.checkpoint.AtomicCheckpointHook` (same options; temp file + rename), and
  ``WeightsOnlyCheckpointHook`` is added when missing, so resuming works under ``torch.load(weights_only=True)``;
* torch is seeded from ``(seed, iteration)`` before each training iteration
  (:class:`attnzoo.det.checkpoint.SeedEachIterationHook`), so a resumed run draws what the uninterrupted one did;
* one run at a time holds ``--output``: rank 0 takes its lock (:func:`attnzoo.engine.run.output_lock`) for the
  whole run, and a second run into a held folder is an :class:`InputError` naming the holder's pid;
* ``--output`` that already holds a checkpoint needs ``--resume``, and ``--resume`` needs one there; the run
  resumes from the checkpoint ``last_checkpoint`` names (or the newest one when that pointer is unreadable);
* ``--data-root DIR`` points every dataset and COCO evaluator of the config at DIR: a COCO 2017 folder
  (``annotations/instances_{train,val}2017.json``, ``{train,val}2017/``) or a folder whose annotation files drop
  the year and name images relative to DIR (``annotations/instances_{train,val}.json``, as
  ``python -m attnzoo.data DIR`` writes the shapes set). When the annotations' categories are not the config's
  classes, the datasets take the annotations' category names and every ``num_classes`` of the model that
  counted the config's classes is set to their number (the RPN's single class is left alone).

Exact resumption: mmengine's resume restores the weights, optimizer, parameter schedulers, the iteration and the
seed, and its iteration loop replays the data loader up to the resumed iteration; with the per-iteration seed
above, a resumed run reproduces an uninterrupted one with the same ``--seed`` (tested with a RetinaNet with
stochastic depth). Not covered: augmentations that draw from torch's RNG in the data pipeline (mmdet's draw
from numpy), and an epoch-based run resumed mid-epoch (mmengine resumes those at epoch boundaries).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..common import InputError
from ..engine.run import output_lock

__all__ = ["is_main_process", "latest_checkpoint", "load_config", "test", "train"]

_LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")
_EVALUATORS = {"val_evaluator": "val_dataloader", "test_evaluator": "test_dataloader"}


# ------------------------------------------------------------------------------------------------------ config


def load_config(args: argparse.Namespace):
    """The config of ``args`` with its ``--cfg-options`` merged in; an :class:`InputError` unless it is a readable
    mmdetection/mmsegmentation config, or when a file or folder that ``args`` name does not exist."""
    from mmengine.config import Config

    import attnzoo.det  # noqa: F401  (the ops stand-in, AttnzooBackbone and the checkpoint hooks)

    path, options = args.config, args.cfg_options
    if not Path(path).is_file():
        raise InputError(f"config {path} does not exist")
    if getattr(args, "checkpoint", None) and not Path(args.checkpoint).is_file():
        raise InputError(f"checkpoint {args.checkpoint} does not exist")
    if args.data_root and not Path(args.data_root).is_dir():
        raise InputError(f"--data-root {args.data_root} does not exist or is not a folder")
    try:
        cfg = Config.fromfile(path)
        # unformatted text for the log, the dump and every checkpoint's copy: yapf takes about a second each
        # (fromfile drops format_python_code for a plain config in mmengine 0.10.7, hence the copy)
        cfg = Config(cfg.to_dict(), cfg_text=cfg.text, filename=cfg.filename, format_python_code=False)
    except Exception as e:  # mmengine raises whatever parsing or executing the file raised
        raise InputError(f"config {path} cannot be read as an mmengine config: {type(e).__name__}: {e}") from None
    scope = cfg.get("default_scope")
    if scope not in ("mmdet", "mmseg") or "model" not in cfg:
        raise InputError(f"{path} is not an mmdetection/mmsegmentation config: it needs a model and "
                         f"default_scope 'mmdet' or 'mmseg' (it has default_scope={scope!r}"
                         f"{'' if 'model' in cfg else ' and no model'})")
    try:
        cfg.merge_from_dict(options)
    except Exception as e:
        raise InputError(f"--cfg-options {options}: {e}") from None
    return cfg


def _innermost(dataset: dict) -> list[dict]:
    """The datasets that read files, inside wrappers (RepeatDataset, ClassBalancedDataset, ConcatDataset)."""
    if "dataset" in dataset:
        return _innermost(dataset["dataset"])
    if "datasets" in dataset:
        return [d for inner in dataset["datasets"] for d in _innermost(inner)]
    return [dataset]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a readable COCO annotation file: {e}") from None


def _category_names(annotations: Path) -> list[str]:
    coco = _read_json(annotations)
    if not isinstance(coco, dict) or not isinstance(coco.get("categories"), list) or not coco["categories"]:
        raise InputError(f"{annotations}: a COCO annotation file needs a non-empty 'categories' list")
    try:
        return [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    except (KeyError, TypeError):
        raise InputError(f"{annotations}: every category needs an 'id' and a 'name'") from None


def _default_classes(cfg, dataset: dict) -> tuple[str, ...]:
    if dataset.get("metainfo", {}).get("classes"):
        return tuple(dataset["metainfo"]["classes"])
    import importlib

    registry = importlib.import_module(f"{cfg.default_scope}.registry").DATASETS
    importlib.import_module(f"{cfg.default_scope}.datasets")  # fills the registry
    cls = registry.get(dataset["type"]) if isinstance(dataset["type"], str) else dataset["type"]
    return tuple(getattr(cls, "METAINFO", {}).get("classes", ()))


def _set_num_classes(node: Any, old: int, new: int) -> None:
    """Every ``num_classes`` under ``node`` that equals ``old`` becomes ``new``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "num_classes" and value == old:
                node[key] = new
            else:
                _set_num_classes(value, old, new)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _set_num_classes(value, old, new)


def _metrics(cfg, evaluator: str) -> list[dict]:
    """The metric configs of an evaluator setting (a dict or a list of them)."""
    value = cfg.get(evaluator) or []
    return [value] if isinstance(value, dict) else list(value)


def set_data_root(cfg, root: str) -> None:
    """Point every dataset and COCO evaluator of ``cfg`` at ``root`` (see the module docstring)."""
    data_root = Path(root)
    datasets = {loader: _innermost(cfg[loader]["dataset"]) for loader in _LOADERS if cfg.get(loader)}
    for dataset in (d for ds in datasets.values() for d in ds):
        dataset["data_root"] = str(data_root)
    if cfg.default_scope != "mmdet":
        return
    annotation_of: dict[str, Path] = {}  # loader -> its annotation file
    for loader, loader_datasets in datasets.items():
        for dataset in loader_datasets:
            ann = dataset["ann_file"]
            if not (data_root / ann).is_file():  # no COCO 2017 file: the year-less layout, images under DIR
                yearless = re.sub(r"(instances_[a-z]+)\d{4}", r"\1", ann)
                if not (data_root / yearless).is_file():
                    raise InputError(f"--data-root {root}: {loader} needs {data_root / ann} (COCO 2017) or "
                                     f"{data_root / yearless}; neither exists")
                dataset["ann_file"], dataset["data_prefix"] = yearless, dict(dataset.get("data_prefix", {}), img="")
            annotation_of[loader] = data_root / dataset["ann_file"]
    first = next(iter(datasets.values()))[0]
    classes = tuple(_category_names(data_root / first["ann_file"]))
    old = _default_classes(cfg, first)
    if classes != old:
        _set_num_classes(cfg.model, len(old), len(classes))
        for dataset in (d for ds in datasets.values() for d in ds):
            dataset["metainfo"] = dict(dataset.get("metainfo", {}), classes=classes)
    for evaluator, loader in _EVALUATORS.items():
        for metric in _metrics(cfg, evaluator):
            if "ann_file" in metric and loader in annotation_of:
                metric["ann_file"] = str(annotation_of[loader])


def check_data(cfg, loaders: tuple[str, ...]) -> None:
    """An :class:`InputError` naming the file when an annotation file of ``loaders`` does not exist."""
    for loader in loaders:
        for dataset in _innermost(cfg[loader]["dataset"]) if cfg.get(loader) else []:
            if dataset.get("ann_file"):
                path = Path(dataset.get("data_root") or "") / dataset["ann_file"]
                if not path.is_file():
                    raise InputError(f"{path} ({loader}) does not exist: pass --data-root with the dataset folder")


def prepare(cfg, work_dir: Path, args: argparse.Namespace) -> None:
    """The settings every run gets: work dir, data root, launcher and atomic, weights-only checkpoints."""
    cfg.work_dir = str(work_dir)
    if args.data_root:
        set_data_root(cfg, args.data_root)
    cfg.launcher = "pytorch" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"  # torchrun sets it
    if cfg.launcher == "pytorch" and not torch.cuda.is_available():
        # mmengine's pytorch launcher and DDP wrapper assume a GPU per process (cuda.set_device, device_ids):
        # on the CPU the process group is gloo's, started here (mmengine then skips its own), and DDP gets none
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        cfg.setdefault("model_wrapper_cfg", dict(
            type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False,
            find_unused_parameters=cfg.get("find_unused_parameters", False)))
    if cfg.get("visualizer"):  # mmdet/mmseg name it "visualizer": a second run in one process would reuse the
        cfg.visualizer.pop("name", None)  # first's and log into its folder; unnamed, it takes the run's name
    checkpoint = cfg.get("default_hooks", {}).get("checkpoint")
    if checkpoint and checkpoint.get("type") in ("CheckpointHook", "mmengine.hooks.CheckpointHook"):
        checkpoint["type"] = "AtomicCheckpointHook"
    custom = list(cfg.get("custom_hooks", []))
    for hook in ("WeightsOnlyCheckpointHook", "SeedEachIterationHook"):
        if not any(h.get("type") == hook for h in custom):
            custom.append(dict(type=hook))
    cfg.custom_hooks = custom


def latest_checkpoint(work_dir: Path) -> Path | None:
    """The checkpoint mmengine's ``last_checkpoint`` pointer names (looked up in ``work_dir``, so a moved run
    still resumes), else the newest ``*.pth`` in ``work_dir``, else None."""
    pointer = work_dir / "last_checkpoint"
    if pointer.is_file():
        named = work_dir / Path(pointer.read_text().strip()).name
        if named.is_file() and named.suffix == ".pth":
            return named
    saved = [p for p in work_dir.glob("*.pth") if not p.name.startswith((".", "best_"))]
    return max(saved, key=lambda p: p.stat().st_mtime_ns) if saved else None


def is_main_process() -> bool:
    """Whether this is rank 0 under torchrun (or the only process); readable after the process group is gone."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def _missing_images_are_bad_input():
    """An image that an annotation file names but the folder lacks is an InputError naming it. mmcv's loader
    raises FileNotFoundError for it; from a loader worker it comes back with the worker's traceback as its text."""
    try:
        yield
    except FileNotFoundError as e:
        found = re.findall(r"No such file or directory: '([^']+)'", str(e))
        path = e.filename or (found[-1] if found else None)
        if path is None or not str(path).lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")):
            raise
        raise InputError(f"image {path} does not exist, yet the annotation file names it (check --data-root and "
                         "the config's data_prefix)") from None


def _build_runner(cfg):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    return RUNNERS.build(cfg) if "runner_type" in cfg else Runner.from_cfg(cfg)


# -------------------------------------------------------------------------------------------------------- train


def train(args: argparse.Namespace) -> Path | None:
    """Train as ``args`` say, holding the output folder's lock throughout; returns the last checkpoint."""
    cfg = load_config(args)
    work_dir = Path(args.output or Path("runs") / Path(args.config).stem)
    with output_lock(work_dir):
        return _train(cfg, work_dir, args)


def _train(cfg, work_dir: Path, args: argparse.Namespace) -> Path | None:
    checkpoint = latest_checkpoint(work_dir) if work_dir.is_dir() else None
    if args.resume and checkpoint is None:
        raise InputError(f"--resume: no checkpoint in {work_dir} to resume from")
    if not args.resume and checkpoint is not None:
        raise InputError(f"{work_dir} already holds a run (checkpoint {checkpoint.name}); pass --resume to "
                         "continue it or choose another --output")
    prepare(cfg, work_dir, args)
    check_data(cfg, tuple(k for k in _LOADERS if k != "test_dataloader"))
    seed = args.seed if args.seed is not None else cfg.get("randomness", {}).get("seed")
    cfg.randomness = dict(cfg.get("randomness", {}), seed=0 if seed is None else seed)
    if args.amp:
        if not torch.cuda.is_available():
            raise InputError("--amp needs a CUDA device (mmengine's AmpOptimWrapper)")
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.loss_scale = "dynamic"
    if args.auto_scale_lr:
        if "base_batch_size" not in cfg.get("auto_scale_lr", {}):
            raise InputError(f"--auto-scale-lr: {args.config} sets no auto_scale_lr.base_batch_size")
        cfg.auto_scale_lr.enable = True
    cfg.resume, cfg.load_from = args.resume, str(checkpoint) if args.resume else None
    runner = _build_runner(cfg)
    with _missing_images_are_bad_input():
        runner.train()
    return latest_checkpoint(work_dir)


# --------------------------------------------------------------------------------------------------------- test


def test(args: argparse.Namespace) -> dict[str, float]:
    """The config's test evaluator on its test set, with the weights of ``args.checkpoint`` (strictly)."""
    cfg = load_config(args)
    checkpoint = Path(args.checkpoint)
    prepare(cfg, Path(args.output or Path("runs") / f"{Path(args.config).stem}-eval"), args)
    if not cfg.get("test_dataloader") or not cfg.get("test_evaluator"):
        raise InputError(f"{args.config} has no test_dataloader/test_evaluator to evaluate with")
    check_data(cfg, ("test_dataloader",))
    for metric in _metrics(cfg, "test_evaluator"):
        if metric.get("ann_file") and not Path(metric["ann_file"]).is_file():
            raise InputError(f"{metric['ann_file']} (test_evaluator) does not exist: pass --data-root")
    cfg.load_from, cfg.resume = None, False
    runner = _build_runner(cfg)
    try:
        runner.load_checkpoint(str(checkpoint), strict=True)
    except RuntimeError as e:  # mmengine lists the missing and unexpected keys, and the shape mismatches
        raise InputError(f"checkpoint {checkpoint} does not fit the model of {args.config}: {e}") from None
    except Exception as e:  # not a torch file, or one that pickles more than weights_only allows
        raise InputError(f"checkpoint {checkpoint} cannot be loaded with torch.load(weights_only=True): "
                         f"{type(e).__name__}: {e}") from None
    with _missing_images_are_bad_input():
        return runner.test()
