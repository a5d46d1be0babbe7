"""What ``tools/train.py`` can train: one :class:`Task` per kind of model and data.

The engine (:mod:`attnzoo.engine`) owns the loop (data order, DDP, AMP, gradient accumulation, EMA, atomic
checkpoints, exact resumption, the CSV/TensorBoard log and the curves). A task owns the rest: which model, which
datasets (with their transforms), the loss of a training batch and the validation metrics. ``--task NAME`` picks
one; only that task's module is imported, and it adds its own command-line options in
:meth:`Task.add_arguments`.
"""
from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..common import InputError

if TYPE_CHECKING:
    from ..engine.run import Run

__all__ = ["TASKS", "Batch", "Task", "check_input_size", "create_model", "data_config", "get_task"]

# what a task's loader yields: tensors, possibly nested in tuples, lists and dicts (moved to the device whole)
Batch = torch.Tensor | Sequence["Batch"] | Mapping[str, "Batch"] | str | int | float | None

# name -> "module:Class", imported on first use so a task's optional dependencies load only when it runs
TASKS: dict[str, str] = {
    "classification": "attnzoo.tasks.classification:ClassificationTask",
    "oat": "attnzoo.tasks.oat:OATTask",
    "dcal": "attnzoo.tasks.dcal:DCALTask",
    "sparsifiner": "attnzoo.tasks.sparsifiner:SparsifinerTask",
    "cca": "attnzoo.tasks.cca:CCATask",
}


class Task:
    """One kind of training. Subclasses set ``name`` and ``metric`` and implement :meth:`build`, :meth:`loss`
    and :meth:`evaluate`.

    ``run`` is the training process (:class:`attnzoo.engine.Run`: ``run.device``, ``run.rank``, ``run.world``,
    ``run.main``, ``run.autocast()``, ``run.all_sum(values)`` and ``run.log(message)``).
    """

    name: ClassVar[str]
    metric: ClassVar[str]  # the validation metric the log, the plot and the progress line lead with
    shard_val: ClassVar[bool] = True  # False: every process evaluates the whole val split (retrieval, decoding)
    collate_fn: ClassVar[Callable | None] = None  # for batches that torch's default collate cannot make
    find_unused_parameters: ClassVar[bool] = False  # DDP: True when some parameters get no gradient in a step
    # its model is a timm classifier and its state() has "classes" and "data_config": tools/publish.py exports it
    publishable: ClassVar[bool] = False

    def __init__(self, args: argparse.Namespace, run: Run):
        self.args, self.run = args, run

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add this task's options (in a group of their own, prefixed with the task's name)."""

    def build(self) -> tuple[nn.Module, Dataset, Dataset]:
        """The model and the (train, val) datasets, their transforms set; called once, after seeding."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch (also a resumed one): for recipes whose phases change by epoch."""

    def loss(self, net: nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar loss of one training batch (already on ``run.device``). ``net`` is the model, or its DDP
        wrapper: call ``net(...)`` for the forward so that DDP synchronises the gradients."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Validation metrics over the val loader (each process's share when ``shard_val``)."""
        raise NotImplementedError

    def state(self) -> dict:
        """JSON-able facts a checkpoint keeps next to the weights (class names, input config, ...), under the
        task's name (``state.json``'s ``state[task.name]``)."""
        return {}


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise InputError(f"--task {name!r}: unknown task; choose one of {sorted(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_model(args: argparse.Namespace, log: Callable[[str], None] = print, **kwargs) -> nn.Module:
    """``timm.create_model(args.model, ...)`` with the common model options (``--model-args``, ``--drop-path``,
    ``--pretrained``, ``--pretrained-file``) and ``kwargs`` (e.g. ``num_classes``), each failure an
    :class:`InputError` that names the model. ``--pretrained-file`` loads strictly (through the family's
    checkpoint converter): a key that does not fit is an error naming it, and a new classifier, the only allowed
    difference, is said through ``log``."""
    from .. import hub

    kwargs = {**args.model_args, **kwargs}
    if args.drop_path:
        kwargs["drop_path_rate"] = args.drop_path
    if args.pretrained_file:
        from pathlib import Path

        if not Path(args.pretrained_file).is_file():
            raise InputError(f"--pretrained-file {args.pretrained_file} does not exist")
    model = hub.create_model(args.model, pretrained=args.pretrained, **kwargs)
    if args.pretrained_file:
        head = hub.load_weights(model, args.pretrained_file, filter_fn=hub.filter_fn_of(model), new_head=True)
        if head:
            log(f"--pretrained-file {args.pretrained_file}: a new classifier ({', '.join(head)} keep their "
                f"initialisation: the file's do not fit the {getattr(model, 'num_classes', '?')} classes)")
    return model


def data_config(args: argparse.Namespace, model: nn.Module) -> dict:
    """timm's data config of ``model`` (input size, interpolation, mean, std, crop): the size the model was built
    for when it takes only one (e.g. ``--model-args '{"img_size": 32}'``), else its pretrained one; ``--img-size``
    when given (an :class:`InputError` when the model does not take that size: :func:`check_input_size`)."""
    from timm.data import resolve_input_data_config

    config = resolve_input_data_config(model)
    if args.img_size:
        config["input_size"] = (3, args.img_size, args.img_size)
        check_input_size(model, config["input_size"], f"--img-size {args.img_size}")
    return config


@torch.no_grad()
def check_input_size(model: nn.Module, input_size: tuple[int, int, int], what: str) -> None:
    """An :class:`InputError` naming ``what`` unless ``model`` takes images of ``input_size`` (C, H, W): timm's
    fixed-size check, then the model's own, by a forward of one zero image in eval mode (attnzoo's families
    check their input before computing anything: a refused size costs nothing, an accepted one a forward)."""
    from timm.data import resolve_input_data_config

    name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    training = model.training
    try:
        resolve_input_data_config(model, args={"input_size": tuple(input_size)})
        param = next(model.parameters(), None)
        model.eval()(torch.zeros(1, *input_size, device=param.device if param is not None else None))
    except ValueError as e:
        raise InputError(f"{what}: model {name} does not take {input_size[1]}x{input_size[2]} images: {e}") from None
    finally:
        model.train(training)
