"""Train a model: an image classifier (any model timm can build, attnzoo's included) on an ImageNet-style
folder (``DATA/train/<class>/*``, ``DATA/val/<class>/*``), a task head (``--task``, see ``attnzoo.tasks``), or
a detector/segmentor from an mmdetection config (a ``.py`` path as the first argument).

    python tools/train.py DATA --model davit_tiny --pretrained --epochs 30 --output runs/davit
    torchrun --nproc_per_node=4 tools/train.py DATA --model maxvit_tiny_tf_224 --batch-size 64
    python tools/train.py DATA --output runs/davit --resume      # continue from the last checkpoint
    python tools/train.py configs/davit/retinanet_davit_tiny_fpn_1x_coco.py --output runs/det

timm does the work: its transforms (RandAugment, random erasing), Mixup/CutMix, label smoothing, AdamW from
``create_optimizer_v2``, the cosine schedule with warmup from ``create_scheduler_v2`` (stepped per optimizer
update), ``ModelEmaV3`` and ``accuracy``. This file wires them together with DDP, AMP, gradient accumulation and
exact resumption; the task (``attnzoo.tasks``) supplies the model, the data, the loss and the metrics.

Output (``--output``): ``log.csv`` (one row per epoch; TensorBoard events too when tensorboard is installed),
``curves.png`` (loss and accuracy), ``checkpoints/step-N/`` (``model.safetensors``, ``ema.safetensors``,
``optimizer.safetensors`` with the optimizer tensors and torch RNG states, ``state.json`` with everything else)
and ``checkpoints/last.json`` naming the newest. Each checkpoint is written to a temporary folder and renamed,
and ``last.json`` is replaced only after that, so a run killed at any moment resumes from a complete one.

Resuming is exact: the data order is a function of (seed, epoch), each sample's augmentation is drawn from a
generator seeded by (seed, epoch, index), and the python/numpy/torch RNG states of every process are restored,
so a killed and resumed run reaches the same weights at step N as an uninterrupted one.

A config path hands the run to mmengine's Runner (``attnzoo.det.runner``), with the same ``--output`` and
``--resume`` behaviour.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attnzoo  # noqa: E402,F401  (registers attnzoo's models with timm)
from attnzoo.hub import InputError, atomic_dir  # noqa: E402
from attnzoo.tasks import TASKS, batch_size, get_task, to_device  # noqa: E402

# options that a resumed run may change; every other one is taken from the checkpoint
_RESUME_OVERRIDES = ("data", "output", "resume", "max_steps", "workers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", help="the task's data (classification: an ImageNet-style folder with train/ and val/, "
                                "one sub-folder per class)")
    p.add_argument("--task", default="classification", choices=sorted(TASKS), help="what to train (default: "
                   "classification)")
    p.add_argument("--output", default="runs/train", help="output folder (default: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="davit_tiny", help="timm/attnzoo name, hf-hub:ORG/NAME or local-dir:PATH")
    m.add_argument("--model-args", default="{}", type=json.loads, metavar="JSON",
                   help='extra keyword arguments for timm.create_model, e.g. \'{"embed_dims": [32, 64, 128, 256]}\'')
    m.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    m.add_argument("--pretrained-file", help="start from these weights (.safetensors) instead of the tag's")
    m.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    m.add_argument("--img-size", type=int, help="input size (default: the model's)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=30)
    o.add_argument("--max-steps", type=int,
                   help="stop after this many optimizer steps (the schedule still spans --epochs)")
    o.add_argument("--batch-size", type=int, default=64, help="per process")
    o.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--opt", default="adamw")
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--warmup-epochs", type=float, default=1.0)
    o.add_argument("--warmup-lr", type=float, default=1e-6)
    o.add_argument("--min-lr", type=float, default=1e-6)
    o.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    o.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast dtype (auto: bf16 on CUDA when supported, none on CPU)")
    o.add_argument("--ema-decay", type=float, default=0.0, help="keep an EMA of the weights with this decay (0: off)")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--workers", type=int, default=4, help="data loading processes per training process")
    r.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every STEPS optimizer steps (always at the end of each epoch)")
    for name in sorted(TASKS):
        get_task(name).add_arguments(p)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------- data order


class EpochSampler(Sampler):
    """The order of one epoch, a function of (seed, epoch) only, sharded across processes and resumable.

    Process ``rank`` of ``world`` takes every world-th index of the epoch's permutation, so one process with
    batch ``world * b`` sees, batch for batch, the union of what ``world`` processes with batch ``b`` see.
    Each index comes with the seed its augmentation draws from (see :class:`SeededSamples`).
    """

    def __init__(self, size: int, batch_size: int, rank: int, world: int, seed: int, train: bool):
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world
        self.seed, self.train = seed, train
        self.epoch = self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        if self.train:  # drop the last partial batch, evenly on every process
            return self.size // (self.world * self.batch_size)
        return math.ceil(len(range(self.rank, self.size, self.world)) / self.batch_size)

    def _indices(self) -> list[int]:
        if not self.train:
            return list(range(self.rank, self.size, self.world))
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        return order[: self.batches_per_epoch() * self.world * self.batch_size][self.rank :: self.world].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._indices()[self.start_batch * self.batch_size :]:
            yield index, int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])

    def __len__(self) -> int:
        return len(self._indices()) - self.start_batch * self.batch_size


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch's CPU generator inside the block, and put their states back after it."""
    states = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.default_generator.set_state(states[2])


class SeededSamples(Dataset):
    """Loads ``(index, seed)`` from :class:`EpochSampler` with the random transforms drawing from ``seed``: the
    same sample gets the same augmentation whatever the process, worker or resumption point."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with _seeded(seed):
            return self.dataset[index]


# ------------------------------------------------------------------------------------------------- checkpoints


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """This process's RNG states: the JSON-able ones, and the torch tensors."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}, tensors


def _set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"])


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as safetensors-able tensors ``state.<param>.<name>`` plus a JSON-able rest."""
    tensors, plain = {}, {}
    for pid, entries in state_dict["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value
            else:
                plain.setdefault(str(pid), {})[name] = value
    return tensors, {"state": plain, "param_groups": state_dict["param_groups"]}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict] = {int(pid): dict(entries) for pid, entries in plain["state"].items()}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def last_checkpoint(output: Path) -> Path | None:
    pointer = output / "checkpoints" / "last.json"
    return output / "checkpoints" / json.loads(pointer.read_text())["checkpoint"] if pointer.is_file() else None


# ----------------------------------------------------------------------------------------------------- training


class Run:
    """One training process: its place in the process group, and the pieces it trains."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.main = self.rank == 0
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        amp = args.amp
        if amp == "auto":
            amp = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
        if amp == "fp16" and self.device.type != "cuda":
            raise InputError("--amp fp16 needs a CUDA device (use bf16 or none on the CPU)")
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]

    def log(self, message: str) -> None:
        if self.main:
            print(message, flush=True)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()


def build_loaders(run: Run, task, train_set, val_set) -> tuple[DataLoader, DataLoader]:
    """Loaders whose order is a function of (seed, epoch) and whose samples draw their randomness from seeds."""
    args = run.args
    if len(train_set) < run.world * args.batch_size:
        raise InputError(f"{args.data}: the training split has {len(train_set)} samples, fewer than one batch "
                         f"({run.world} process(es) x --batch-size {args.batch_size})")
    loaders = []
    for dataset, train in ((train_set, True), (val_set, False)):
        rank, world = (run.rank, run.world) if train or task.shard_val else (0, 1)
        sampler = EpochSampler(len(dataset), args.batch_size, rank, world, args.seed, train)
        loaders.append(DataLoader(
            SeededSamples(dataset), batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
            pin_memory=run.device.type == "cuda", generator=torch.Generator().manual_seed(args.seed),
            collate_fn=task.collate_fn,
        ))
    return loaders[0], loaders[1]


class Trainer:
    def __init__(self, run: Run):
        self.run = run
        args = run.args
        self.output = Path(args.output)
        torch.manual_seed(args.seed)  # the same initial weights on every process
        self.task = get_task(args.task)(args, run)
        model, train_set, val_set = self.task.build()
        self.model = model.to(run.device)
        self.train_loader, self.val_loader = build_loaders(run, self.task, train_set, val_set)
        self.ddp = None
        if run.world > 1:
            self.ddp = DistributedDataParallel(self.model, find_unused_parameters=self.task.find_unused_parameters)
        self.optimizer = create_optimizer_v2(self.model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
        self.batches = self.train_loader.sampler.batches_per_epoch()
        self.steps_per_epoch = math.ceil(self.batches / args.accum_steps)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched="cosine", num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch,
        )
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)
        self.ema = ModelEmaV3(self.model, decay=args.ema_decay, use_warmup=True) if args.ema_decay else None
        self.step = self.epoch = self.start_batch = 0
        self.metrics: dict = {}
        random.seed(args.seed + run.rank)  # training randomness (dropout, mixup) differs across processes
        np.random.seed(args.seed + run.rank)
        torch.manual_seed(args.seed + run.rank)

    # -- checkpoints

    def save(self, epoch: int, batch: int) -> None:
        """Checkpoint the state after optimizer step ``self.step``; training continues at (epoch, batch)."""
        plain_rng, tensor_rng = _rng_state()
        if self.run.world > 1:
            gathered: list = [None] * self.run.world
            dist.all_gather_object(gathered, (plain_rng, tensor_rng))
        else:
            gathered = [(plain_rng, tensor_rng)]
        if self.run.main:
            root = self.output / "checkpoints"
            name = f"step-{self.step:08d}"
            opt_tensors, opt_plain = _split_optimizer_state(self.optimizer.state_dict())
            for rank, (_, tensors) in enumerate(gathered):
                opt_tensors.update({f"rng.{rank}.{k}": v.cpu() for k, v in tensors.items()})
            state = {
                "step": self.step, "epoch": epoch, "batch": batch, "world_size": self.run.world,
                "args": vars(self.run.args), **self.task.state(), "optimizer": opt_plain,
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": [plain for plain, _ in gathered], "metrics": self.metrics,
            }
            with atomic_dir(root / name, overwrite=True) as tmp:
                save_file(self.model.state_dict(), str(tmp / "model.safetensors"))
                if self.ema is not None:
                    save_file(self.ema.module.state_dict(), str(tmp / "ema.safetensors"))
                save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
                (tmp / "state.json").write_text(json.dumps(state, indent=1))
            _write_text_atomic(root / "last.json", json.dumps({"checkpoint": name, "step": self.step}))
            for old in root.glob("step-*"):
                if old.name != name:
                    for f in old.iterdir():
                        f.unlink()
                    old.rmdir()
        if self.run.world > 1:
            dist.barrier()

    def restore(self, folder: Path) -> None:
        state = json.loads((folder / "state.json").read_text())
        if state["world_size"] != self.run.world:
            raise InputError(f"--resume: {folder} was written by {state['world_size']} process(es); resume with "
                             f"the same number (torchrun --nproc_per_node={state['world_size']})")
        self.model.load_state_dict(load_file(folder / "model.safetensors", device=str(self.run.device)))
        if self.ema is not None:
            self.ema.module.load_state_dict(load_file(folder / "ema.safetensors", device=str(self.run.device)))
        tensors = load_file(folder / "optimizer.safetensors")
        self.optimizer.load_state_dict(_join_optimizer_state(tensors, state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.start_batch = state["step"], state["epoch"], state["batch"]
        self.metrics = state["metrics"]
        prefix = f"rng.{self.run.rank}."
        _set_rng_state(state["rng"][self.run.rank],
                       {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.scheduler.step_update(self.step)
        self.run.log(f"resumed from {folder} at step {self.step} (epoch {self.epoch}, batch {self.start_batch})")

    # -- the loop

    def train(self) -> None:
        args, run = self.run.args, self.run
        log = Log(self.output, run.main, resumed_step=self.step if args.resume else None, metric=self.task.metric)
        self.scheduler.step_update(self.step)
        total_steps = args.epochs * self.steps_per_epoch
        if args.max_steps is not None:
            total_steps = min(total_steps, args.max_steps)
        net = self.ddp or self.model
        while self.step < total_steps:
            epoch, first = self.epoch, self.start_batch
            self.train_loader.sampler.set_epoch(epoch, first)
            self.task.set_epoch(epoch)
            net.train()
            loss_sum, seen, started = 0.0, 0, time.perf_counter()
            bar = tqdm(self.train_loader, total=self.batches, initial=first, disable=not run.main,
                       desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True, leave=False)
            for i, batch in enumerate(bar, start=first):
                batch = to_device(batch, run.device)
                n = batch_size(batch)
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
                per_s = seen * run.world / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{self._lr():.2e}", img_s=f"{per_s:.1f}")
                if i + 1 == self.batches or self.step == total_steps:
                    break
                if args.checkpoint_every and self.step % args.checkpoint_every == 0:
                    self.save(epoch, i + 1)
            bar.close()
            if i + 1 < self.batches:  # stopped by --max-steps inside the epoch
                self.save(epoch, i + 1)
                break
            elapsed = time.perf_counter() - started
            self.model.eval()
            val = self.task.evaluate(self.model, self.val_loader)
            row = {"epoch": epoch + 1, "step": self.step, "lr": self._lr(),
                   "train_loss": run.all_sum([loss_sum])[0] / (seen * run.world), **val,
                   "img_per_s": seen * run.world / elapsed, "seconds": elapsed}
            if self.ema is not None:
                self.ema.module.eval()
                row.update({f"ema_{k}": v for k, v in self.task.evaluate(self.ema.module, self.val_loader).items()
                            if not k.endswith("loss")})
            self.metrics = row
            log.write(row)
            run.log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            self.epoch, self.start_batch = epoch + 1, 0
            self.save(self.epoch, 0)
        log.close()

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


class Log:
    """``log.csv`` (one row per epoch), TensorBoard when installed, and the PNG of the curves at the end."""

    def __init__(self, output: Path, main: bool, resumed_step: int | None, metric: str):
        self.main, self.csv, self.png, self.metric = main, output / "log.csv", output / "curves.png", metric
        self.rows: list[dict] = []
        self.tb = None
        if not main:
            return
        if resumed_step is not None and self.csv.is_file():  # forget rows the killed run wrote after its checkpoint
            with self.csv.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resumed_step]
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(output / "tensorboard"))
        except ImportError:
            print("tensorboard is not installed: logging to log.csv only", flush=True)

    def write(self, row: dict) -> None:
        if not self.main:
            return
        self.rows.append(row)
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.csv.with_name(".log.csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.csv)
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("epoch", "step"):
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if not self.main or not self.rows:
            return
        if self.tb is not None:
            self.tb.close()
        try:
            import matplotlib
        except ImportError:
            print("matplotlib is not installed: no curves.png", flush=True)
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        col = lambda key: [float(r[key]) for r in self.rows if r.get(key) not in (None, "")]
        epochs = col("epoch")
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        ax_loss.plot(epochs, col("train_loss"), label="train")
        if col("val_loss"):
            ax_loss.plot(epochs, col("val_loss"), label="val")
        ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
        for key in (self.metric, "top5", f"ema_{self.metric}"):
            if col(key):
                ax_acc.plot(epochs, col(key), label=key)
        ax_acc.set(xlabel="epoch", ylabel=self.metric, title=f"val {self.metric}")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        tmp = self.png.with_name(".curves.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.png)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].endswith(".py"):  # an mmdetection/mmsegmentation config
        from attnzoo.det.runner import main as train_config

        return train_config(argv)
    args = parse_args(argv)
    try:
        output = Path(args.output)
        checkpoint = last_checkpoint(output)
        if args.resume:
            if checkpoint is None:
                raise InputError(f"--resume: no checkpoint in {output}/checkpoints to resume from")
            saved = json.loads((checkpoint / "state.json").read_text())["args"]
            args = argparse.Namespace(**{**saved, **{k: getattr(args, k) for k in _RESUME_OVERRIDES}})
        elif checkpoint is not None:
            raise InputError(f"{output} already holds a run (checkpoint {checkpoint.name}); pass --resume to "
                             "continue it or choose another --output")
        run = Run(args)
        trainer = Trainer(run)
        if args.resume:
            trainer.restore(checkpoint)
        output.mkdir(parents=True, exist_ok=True)
        trainer.train()
    except InputError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    last = last_checkpoint(output)
    run.log(f"checkpoint: {last}\nlog: {output / 'log.csv'}\ncurves: {output / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
