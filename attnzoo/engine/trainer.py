"""The training loop: a :class:`attnzoo.tasks.Task` trained with timm's optimizer (layer-wise lr decay),
schedules and EMA, under DDP and AMP, with timm's speed switches (torch.compile, channels-last, gradient
checkpointing, SyncBatchNorm), gradient accumulation, persistent loader workers, periodic checkpoints, exact
resumption and the throughput in the log (images/s, the share of time waiting for data).

Resuming is exact: the data order is a function of (seed, epoch) (:class:`~attnzoo.engine.sampler.EpochSampler`),
each sample's augmentation draws from a generator seeded by (seed, epoch, index)
(:class:`~attnzoo.engine.sampler.SeededSamples`), and the python/numpy/torch RNG states of every process are in
the checkpoint, so a killed and resumed run reaches the same weights at step N as an uninterrupted one. A
mid-epoch checkpoint also keeps the epoch's running sums, so the resumed epoch's log.csv row is the same too.

A sample whose file cannot be decoded is replaced by another drawn from its seed (the same on resume), named once
in the output and counted in log.csv (``unreadable``, ``val_unreadable``). SIGINT or SIGTERM stops the loop after
the step in progress, with a checkpoint (:class:`StopSignals`, :class:`~attnzoo.common.Interrupted`).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from ..common import InputError, Interrupted
from ..tasks import Task, get_task
from .checkpoint import (
    join_optimizer_state,
    last_checkpoint,
    read_state,
    read_tensors,
    resume_checkpoint,
    rng_state,
    set_rng_state,
    split_optimizer_state,
    write_checkpoint,
)
from .log import Log, Throughput
from .run import Run, output_lock
from .sampler import EpochSampler, SeededLoader, SeededSamples, collate_with_unreadable

__all__ = ["RESUME_OVERRIDES", "SCHEDULES", "StopSignals", "Trainer", "batch_size", "build_loaders",
           "resolve_resume", "resumed_options", "speed_switches", "to_device", "train"]

# options of the command line that a resumed run goes with (where the data and the run are, where this invocation
# stops, how the loader and the log run); every other one is the run's own (the model, the data order, the
# schedule that --epochs spans, the checkpoint interval) and is taken from the checkpoint
RESUME_OVERRIDES = ("data", "output", "resume", "max_steps", "workers", "prefetch_factor", "log_interval")
# timm's fixed schedules (create_scheduler_v2); its plateau scheduler is left out: timm deprecates it because its
# metric-driven state is not checkpointed, so a resumed run could not be exact
SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "wsd", "rsqrt", "constant")

B = TypeVar("B")


def to_device(batch: B, device: torch.device, channels_last: bool = False) -> B:
    """``batch`` with every tensor in it (nested in tuples, lists and dicts) moved to ``device``; with
    ``channels_last`` the 4-d floating-point ones (images) in that memory format."""
    if torch.is_tensor(batch):
        if channels_last and batch.ndim == 4 and batch.is_floating_point():
            return batch.to(device, memory_format=torch.channels_last, non_blocking=True)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


def batch_size(batch: object) -> int:
    """The number of samples in ``batch``: the length of its first tensor."""
    if torch.is_tensor(batch):
        return len(batch)
    items = batch.values() if isinstance(batch, dict) else batch
    return next(batch_size(b) for b in items if torch.is_tensor(b) or isinstance(b, (tuple, list, dict)))


def build_loaders(run: Run, task: Task, args: argparse.Namespace, train_set: Dataset,
                  val_set: Dataset) -> tuple[DataLoader, DataLoader]:
    """Loaders whose order is a function of (seed, epoch) and whose samples draw their randomness from seeds."""
    if len(train_set) < run.world * args.batch_size:
        raise InputError(f"{args.data}: the training split has {len(train_set)} samples, fewer than one batch "
                         f"({run.world} process(es) x --batch-size {args.batch_size})")
    loaders = []
    for dataset, train in ((train_set, True), (val_set, False)):
        rank, world = (run.rank, run.world) if train or task.shard_val else (0, 1)
        sampler = EpochSampler(len(dataset), args.batch_size, rank, world, args.seed, train)
        workers = dict(persistent_workers=True, prefetch_factor=args.prefetch_factor) if args.workers else {}
        loaders.append(SeededLoader(  # persistent workers: spawned once, not at every epoch
            SeededSamples(dataset), batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
            pin_memory=run.device.type == "cuda", generator=torch.Generator().manual_seed(args.seed),
            collate_fn=functools.partial(collate_with_unreadable, collate=task.collate_fn or default_collate),
            worker_init_fn=_leave_signals_to_the_trainer, **workers,
        ))
    return loaders[0], loaders[1]


def speed_switches(model: torch.nn.Module, args: argparse.Namespace, run: Run) -> torch.nn.Module:
    """``model`` on ``run.device`` with timm's switches: ``--grad-checkpointing``, ``--channels-last``,
    ``--sync-bn`` (SyncBatchNorm; a single process falls back to plain BatchNorm)."""
    if args.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise InputError(f"--grad-checkpointing: model {args.model!r} has no set_grad_checkpointing")
        model.set_grad_checkpointing(True)
    model = model.to(run.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.sync_bn:
        if run.world > 1 and run.device.type == "cpu":
            raise InputError("--sync-bn needs CUDA devices (torch's SyncBatchNorm does not sync CPU tensors)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _leave_signals_to_the_trainer(worker: int) -> None:
    """In a loader worker: Ctrl-C (sent to the whole process group) and SIGTERM are the trainer's to handle
    (:class:`StopSignals`); a worker that died of them would fail the step the trainer is finishing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopSignals:
    """Inside the block, SIGINT and SIGTERM ask the loop to stop (:attr:`signum`) instead of killing it; the first
    one puts the previous handlers back, so a second one stops the process at once (checkpoints are atomic)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, run: Run):
        self.run, self.signum, self.previous = run, 0, {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        self._restore()
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint (again to stop now)",
              file=sys.stderr, flush=True)

    def requested(self) -> int:
        """The signal every process stops for (0: go on); all processes agree, so they checkpoint together."""
        if self.run.world == 1:
            return self.signum
        counts = self.run.all_sum([float(self.signum == s) for s in self.SIGNALS])
        return next((int(s) for s, n in zip(self.SIGNALS, counts, strict=True) if n), 0)


class Trainer:
    """Builds the task's model and data on ``run``, then :meth:`train` runs (or, after :meth:`restore`,
    continues) the loop. ``args`` are the engine's options (``tools/train.py``) and the task's."""

    def __init__(self, run: Run, args: argparse.Namespace):
        self.run, self.args = run, args
        self.output = Path(args.output)
        torch.manual_seed(args.seed)  # the same initial weights on every process
        self.task = get_task(args.task)(args, run)
        model, train_set, val_set = self.task.build()
        self.model = speed_switches(model, args, run)
        self.train_loader, self.val_loader = build_loaders(run, self.task, args, train_set, val_set)
        self.ddp = None
        if run.world > 1:
            self.ddp = DistributedDataParallel(self.model, find_unused_parameters=self.task.find_unused_parameters)
        # what the loop calls for the forward: DDP's wrapper, compiled with --compile (timm's order)
        self.net = self.ddp or self.model
        if args.compile:
            self.net = torch.compile(self.net, mode=args.compile_mode)
        self.optimizer = create_optimizer_v2(self.model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                             layer_decay=args.layer_decay)  # by the model's group_matcher
        self.batches = self.train_loader.sampler.batches_per_epoch()
        self.steps_per_epoch = math.ceil(self.batches / args.accum_steps)
        # per update, not per epoch, so a run resumed mid-epoch has the lr it had
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr, min_lr=args.min_lr, decay_epochs=args.decay_epochs,
            decay_milestones=args.decay_milestones, decay_rate=args.decay_rate, step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch,
        )
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)
        self.ema = ModelEmaV3(self.model, decay=args.ema_decay, use_warmup=True) if args.ema_decay else None
        self.step = self.epoch = self.start_batch = 0
        self.metrics: dict = {}
        self.resumed_sums = [0.0, 0, 0, 0.0]  # the epoch's sums at a mid-epoch checkpoint (Trainer.train)
        self.named: set[str] = set()  # the unreadable files already named in the log
        random.seed(args.seed + run.rank)  # training randomness (dropout, mixup) differs across processes
        np.random.seed(args.seed + run.rank)
        torch.manual_seed(args.seed + run.rank)

    # -- checkpoints

    def save(self, epoch: int, batch: int, sums: list[float] | None = None) -> None:
        """Checkpoint the state after optimizer step ``self.step``; training continues at (epoch, batch), with
        this process's sums of the epoch so far (mid-epoch)."""
        gathered = self.run.gather((rng_state(), sums or [0.0, 0, 0, 0.0]))
        if self.run.main:
            opt_tensors, opt_plain = split_optimizer_state(self.optimizer.state_dict())
            for rank, ((_, tensors), _) in enumerate(gathered):
                opt_tensors.update({f"rng.{rank}.{k}": v.cpu() for k, v in tensors.items()})
            state = {
                "step": self.step, "epoch": epoch, "batch": batch, "world_size": self.run.world,
                "args": vars(self.args), self.task.name: self.task.state(), "optimizer": opt_plain,
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": [plain for (plain, _), _ in gathered], "metrics": self.metrics,
                "epoch_sums": [sums for _, sums in gathered],  # each process's, for the epoch's log.csv row
            }
            tensors = {"model": self.model.state_dict()}
            if self.ema is not None:
                tensors["ema"] = self.ema.module.state_dict()
            tensors["optimizer"] = opt_tensors
            # safetensors stores contiguous tensors only (--channels-last weights and their optimizer moments)
            tensors = {file: {k: v.contiguous() for k, v in values.items()} for file, values in tensors.items()}
            write_checkpoint(self.output, self.step, tensors, state)
        self.run.barrier()

    def restore(self, folder: Path) -> None:
        state = read_state(folder)
        if state["world_size"] != self.run.world:
            raise InputError(f"--resume: {folder} was written by {state['world_size']} process(es); resume with "
                             f"the same number (torchrun --nproc_per_node={state['world_size']})")
        self.model.load_state_dict(read_tensors(folder, "model", self.run.device))
        if self.ema is not None:
            self.ema.module.load_state_dict(read_tensors(folder, "ema", self.run.device))
        tensors = read_tensors(folder, "optimizer")
        self.optimizer.load_state_dict(join_optimizer_state(tensors, state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.start_batch = state["step"], state["epoch"], state["batch"]
        self.metrics = state["metrics"]
        if "epoch_sums" in state:  # (checkpoints written before the sums were kept: the row covers the rest)
            self.resumed_sums = state["epoch_sums"][self.run.rank]
        prefix = f"rng.{self.run.rank}."
        set_rng_state(state["rng"][self.run.rank],
                      {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.scheduler.step_update(self.step)
        self.run.log(f"resumed from {folder} at step {self.step} (epoch {self.epoch}, batch {self.start_batch})")

    # -- the loop

    def train(self) -> None:
        """Run the loop to ``--max-steps`` or the last epoch. SIGINT/SIGTERM stop it after the step in progress,
        with a checkpoint: an :class:`~attnzoo.common.Interrupted` (the tools exit 130/143)."""
        with StopSignals(self.run) as self.stop:
            self._loop()

    def _loop(self) -> None:
        args, run = self.args, self.run
        log = Log(self.output, run.main, resumed_step=self.step if args.resume else None, metric=self.task.metric)
        self.scheduler.step_update(self.step)
        total_steps = args.epochs * self.steps_per_epoch
        if args.max_steps is not None:
            total_steps = min(total_steps, args.max_steps)
        if self.step >= total_steps:
            run.log(f"nothing to do: the run is at step {self.step}, its end (--epochs {args.epochs}, --max-steps "
                    f"{args.max_steps}); resume with a larger --max-steps to go on")

        def sums() -> list[float]:  # the epoch's so far, for a mid-epoch checkpoint
            return [loss_sum, seen, unreadable, before + time.perf_counter() - started]

        net = self.net
        while self.step < total_steps:
            epoch, first = self.epoch, self.start_batch
            self.train_loader.sampler.set_epoch(epoch, first)
            self.task.set_epoch(epoch)
            net.train()
            # the epoch's sums (loss x samples, samples, replaced samples, seconds): the checkpoint's mid-epoch
            loss_sum, seen, unreadable, before = self.resumed_sums if first else (0.0, 0, 0, 0.0)
            started = time.perf_counter()
            bar = tqdm(self.train_loader, total=self.batches, initial=first, disable=not run.main,
                       desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True, leave=False)
            epoch_meter, meter = Throughput(), Throughput()  # the epoch's, the log interval's
            for i, batch in enumerate(epoch_meter.timed(meter.timed(bar)), start=first):
                unreadable += self._name_unreadable(self.train_loader)
                batch = to_device(batch, run.device, args.channels_last)
                n = batch_size(batch)
                meter.images, epoch_meter.images = meter.images + n, epoch_meter.images + n
                group_start = i - i % args.accum_steps
                group_end = min(group_start + args.accum_steps, self.batches)
                update = i + 1 == group_end
                with (contextlib.nullcontext() if update or self.ddp is None else self.ddp.no_sync()):
                    with run.autocast():
                        loss = self.task.loss(net, batch)
                    self.scaler.scale(loss / (group_end - group_start)).backward()
                loss_sum, seen = loss_sum + loss.item() * n, seen + n
                if not update:
                    continue
                if args.clip_grad:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.scheduler.step_update(self.step)
                if self.ema is not None:
                    self.ema.update(self.model, step=self.step)
                speed = meter.report(run.world)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{self._lr():.2e}",
                                img_s=f"{speed['img_per_s']:.1f}", data_wait=f"{speed['data_wait']:.0%}")
                if args.log_interval and self.step % args.log_interval == 0:  # the loader or the model the limit?
                    log.scalars(self.step, {"train_loss": loss_sum / seen, "lr": self._lr(), **speed})
                    if run.main:
                        bar.write(f"step {self.step} loss {loss_sum / seen:.4g} lr {self._lr():.3g} "
                                  f"img/s {speed['img_per_s']:.1f} data_wait {speed['data_wait']:.0%}")
                    meter.reset()
                if i + 1 == self.batches or self.step == total_steps:
                    break
                if signum := self.stop.requested():
                    bar.close()
                    self.save(epoch, i + 1, sums())
                    raise self._interrupted(signum)
                if args.checkpoint_every and self.step % args.checkpoint_every == 0:
                    self.save(epoch, i + 1, sums())
            bar.close()
            if i + 1 < self.batches:  # stopped by --max-steps inside the epoch
                self.save(epoch, i + 1, sums())
                break
            elapsed, speed = before + time.perf_counter() - started, epoch_meter.report(run.world)
            self.model.eval()
            self.val_loader.unreadable.clear()
            val = self.task.evaluate(self.model, self.val_loader)
            row = {"epoch": epoch + 1, "step": self.step, "lr": self._lr(),
                   "train_loss": run.all_sum([loss_sum])[0] / (seen * run.world), **val,
                   **speed, "seconds": elapsed}
            row.update(self._unreadable_counts(unreadable))
            if self.ema is not None:
                self.ema.module.eval()
                row.update({f"ema_{k}": v for k, v in self.task.evaluate(self.ema.module, self.val_loader).items()
                            if not k.endswith("loss")})
            self.metrics = row
            log.write(row)
            run.log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            self.epoch, self.start_batch = epoch + 1, 0
            self.save(self.epoch, 0)
            if self.step < total_steps and (signum := self.stop.requested()):
                raise self._interrupted(signum)
        log.close()

    def _name_unreadable(self, loader: SeededLoader) -> int:
        """How many samples ``loader`` replaced since the last call; each file is named the first time."""
        unreadable, loader.unreadable[:] = list(loader.unreadable), []
        for path, reason in unreadable:
            if path not in self.named:
                self.named.add(path)
                where = f" (rank {self.run.rank})" if self.run.world > 1 else ""
                print(f"unreadable image{where}, replaced by another sample: {path}: {reason}", flush=True)
        return len(unreadable)

    def _unreadable_counts(self, unreadable: int) -> dict[str, int]:
        """log.csv's counts of the epoch: training samples replaced (``unreadable``, this process's), val ones."""
        val = self._name_unreadable(self.val_loader)
        train, val_sum = self.run.all_sum([unreadable, val])
        return {"unreadable": int(train), "val_unreadable": int(val_sum if self.task.shard_val else val)}

    def _interrupted(self, signum: int) -> Interrupted:
        last = last_checkpoint(self.output)
        return Interrupted(signum, f"{signal.Signals(signum).name} after step {self.step}: checkpoint {last}; "
                                   f"continue with --resume --output {self.output}")

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def resolve_resume(args: argparse.Namespace,
                   given: Collection[str] = ()) -> tuple[argparse.Namespace, Path | None]:
    """The options a run goes with, and the checkpoint it resumes from: with ``--resume``, the checkpoint's
    options and those of the command line allowed to change (:func:`resumed_options`); without, an
    :class:`InputError` if ``--output`` holds a run."""
    output = Path(args.output)
    if args.resume:
        main = int(os.environ.get("RANK", "0")) == 0
        checkpoint = resume_checkpoint(output, print if main else lambda _: None, main)
        if checkpoint is None:
            raise InputError(f"--resume: no checkpoint in {output}/checkpoints to resume from")
        saved = read_state(checkpoint)["args"]
        return resumed_options(args, saved, given), checkpoint
    checkpoint = last_checkpoint(output)
    if checkpoint is not None:
        raise InputError(f"{output} already holds a run (checkpoint {checkpoint.name}); pass --resume to "
                         "continue it or choose another --output")
    return args, None


def resumed_options(args: argparse.Namespace, saved: dict, given: Collection[str] = ()) -> argparse.Namespace:
    """The options of a resumed run: the ``saved`` ones (the checkpoint's), except those of
    :data:`RESUME_OVERRIDES`, which are this command line's. Each difference that matters is said in one line: an
    option of :data:`RESUME_OVERRIDES` whose value is not the run's (the new one is used), and an option that the
    command line gives (``given``) but is the run's own (ignored)."""
    kept = {**vars(args), **saved, **{k: getattr(args, k) for k in RESUME_OVERRIDES}}
    say = print if os.environ.get("RANK", "0") == "0" else lambda *_, **__: None
    show = lambda value: "unset" if value is None else value
    changeable = ", ".join("DATA" if k == "data" else "--" + k.replace("_", "-") for k in RESUME_OVERRIDES
                           if k != "resume")
    for key in sorted({*RESUME_OVERRIDES, *given} - {"resume"}):
        new, old = getattr(args, key), saved.get(key)
        if new == old or key not in saved:  # the same, or an option newer than the run
            continue
        flag = "DATA" if key == "data" else "--" + key.replace("_", "-")
        if key in RESUME_OVERRIDES:
            say(f"resume: {flag} {show(new)} from this command line (the run had {show(old)})", flush=True)
        else:
            say(f"resume: {flag} {new} ignored: the run's {old} is kept (a resumed run may change only "
                f"{changeable})", flush=True)
    return argparse.Namespace(**kept)


def train(args: argparse.Namespace, given: Collection[str] = ()) -> Path | None:
    """Train (or, with ``--resume``, continue) the run ``args`` describe; returns its last checkpoint. ``given``:
    the options the command line set (:func:`attnzoo.cli.given_options`), which a resumed run compares with its
    own. The caller leaves the process group (:meth:`Run.close`) whatever happens. The run holds ``--output``'s
    lock throughout (:func:`~attnzoo.engine.run.output_lock`): one run at a time writes there."""
    with output_lock(args.output):
        return _train(args, given)


def _train(args: argparse.Namespace, given: Collection[str]) -> Path | None:
    args, checkpoint = resolve_resume(args, given)
    run = Run(args.amp)
    trainer = Trainer(run, args)
    if checkpoint is not None:
        trainer.restore(checkpoint)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    trainer.train()
    last = last_checkpoint(Path(args.output))
    run.log(f"checkpoint: {last}\nlog: {Path(args.output) / 'log.csv'}\ncurves: {Path(args.output) / 'curves.png'}")
    return last
