"""timm's speed switches in tools/train.py: each trains two steps, does what it says, and resumes exactly (a run
stopped after step 1 and resumed reaches the weights, optimizer and schedule of an uninterrupted one)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import dataloader

from attnzoo.engine import Run, Trainer

from .conftest import FAST, TINY_DAVIT, load_tool

train = load_tool("train")
BYOB = ["--model", "test_byobnet"]  # timm's tiny BatchNorm CNN


def _modules(trainer, cls) -> list:
    return [m for m in trainer.model.modules() if isinstance(m, cls)]


def _layer_scales(trainer) -> set[float]:
    return {g["lr_scale"] for g in trainer.optimizer.param_groups}


CASES = {
    "channels-last": (BYOB, lambda t: all(p.is_contiguous(memory_format=torch.channels_last)
                                          for p in t.model.parameters() if p.ndim == 4)),
    "grad-checkpointing": (TINY_DAVIT, lambda t: all(s.grad_checkpointing for s in t.model.stages)),
    "sync-bn": (BYOB, lambda t: _modules(t, torch.nn.SyncBatchNorm) and not [
        m for m in _modules(t, torch.nn.BatchNorm2d) if type(m) is torch.nn.BatchNorm2d]),
    "layer-decay=0.7": (TINY_DAVIT, lambda t: len(_layer_scales(t)) > 3 and max(_layer_scales(t)) == 1.0),
    "sched=step": (TINY_DAVIT, lambda t: type(t.scheduler).__name__ == "StepLRScheduler"),
    "sched=multistep": (TINY_DAVIT, lambda t: type(t.scheduler).__name__ == "MultiStepLRScheduler"),
    "compile": (TINY_DAVIT, lambda t: isinstance(t.net, torch._dynamo.eval_frame.OptimizedModule)),
    "compile+channels-last+grad-checkpointing": (BYOB, lambda t: isinstance(
        t.net, torch._dynamo.eval_frame.OptimizedModule) and t.model.grad_checkpointing and all(
        p.is_contiguous(memory_format=torch.channels_last) for p in t.model.parameters() if p.ndim == 4)),
}
SLOW = ("compile", "compile+channels-last+grad-checkpointing")  # torch.compile on the CPU: minutes
EXTRA = {"sched=step": ["--decay-epochs", "0.2"], "sched=multistep": ["--decay-milestones", "0"]}


def _flags(case: str) -> list[str]:
    flags = []
    for switch in case.split("+"):
        flag, _, value = switch.partition("=")
        flags += [f"--{flag}", *([value] if value else [])]
    return [*flags, *EXTRA.get(case, [])]


def _state(out: Path) -> tuple[dict, dict]:
    ckpt = out / "checkpoints" / json.loads((out / "checkpoints" / "last.json").read_text())["checkpoint"]
    tensors = {f"{f.stem}/{k}": v for f in ckpt.glob("*.safetensors") for k, v in load_file(f).items()}
    state = json.loads((ckpt / "state.json").read_text())
    return tensors, {k: state[k] for k in ("step", "epoch", "batch", "optimizer", "scheduler")}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_switch_trains_two_steps_and_resumes(case, shapes, tmp_path):
    model, check = CASES[case]
    common = [str(shapes), *model, *FAST, "--epochs", "2", "--drop-path", "0.1", *_flags(case)]
    args = train.parse_args([*common, "--output", str(tmp_path / "whole"), "--max-steps", "2"])
    trainer = Trainer(Run(args.amp), args)
    assert check(trainer)
    trainer.train()
    assert train.main([*common, "--output", str(tmp_path / "part"), "--max-steps", "1"]) == 0
    assert train.main([*common, "--output", str(tmp_path / "part"), "--max-steps", "2", "--resume"]) == 0
    (a, sa), (b, sb) = _state(tmp_path / "whole"), _state(tmp_path / "part")
    assert sa == sb and sa["step"] == 2
    assert a.keys() == b.keys() and [k for k in a if not k.startswith("optimizer/rng.") and
                                     not torch.equal(a[k], b[k])] == []


def test_loader_workers_are_spawned_once(shapes, tmp_path, monkeypatch):
    """Persistent workers: over two epochs (and two evaluations) one worker pool per loader, not one per epoch."""
    pools = []
    init = dataloader._MultiProcessingDataLoaderIter.__init__
    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__",
                        lambda self, loader: (pools.append(loader), init(self, loader))[1])
    out = tmp_path / "run"
    common = [str(shapes), *TINY_DAVIT, *FAST, "--epochs", "2", "--workers", "1", "--prefetch-factor", "3"]
    assert train.main([*common, "--output", str(out)]) == 0
    assert len(pools) == 2 and pools[0].prefetch_factor == 3  # the train loader's and the val loader's
    assert len((out / "log.csv").read_text().splitlines()) == 3
    pools.clear()
    assert train.main([*common, "--output", str(out), "--epochs", "2", "--resume"]) == 0  # nothing left to do
    assert train.main([*common, "--output", str(tmp_path / "stop"), "--max-steps", "3"]) == 0
    assert train.main([*common, "--output", str(tmp_path / "stop"), "--resume"]) == 0  # mid-epoch, then on
    a, _ = _state(out)
    b, _ = _state(tmp_path / "stop")
    assert [k for k in a if k.startswith("model/") and not torch.equal(a[k], b[k])] == []
