"""The training checkpoint format: safetensors for tensors, JSON for everything else, written atomically.

``OUTPUT/checkpoints/step-N/`` holds ``model.safetensors``, ``ema.safetensors`` (when the run keeps an EMA),
``optimizer.safetensors`` (the optimizer's tensors and every process's torch RNG states) and ``state.json``:
``step``, ``epoch``, ``batch`` (where training continues), ``world_size``, ``args`` (the run's options),
``optimizer``/``scheduler``/``scaler`` (their JSON-able state), ``rng`` (each process's python and numpy RNG
states), ``metrics`` (the last epoch's row) and, under the key named by ``args["task"]``, the task's own state
(:meth:`attnzoo.tasks.Task.state`). ``OUTPUT/checkpoints/last.json`` names the newest complete checkpoint.

Each checkpoint folder is written through :func:`attnzoo.common.atomic_dir` (files and folders fsynced, then
renamed in) and ``last.json`` is replaced only after it, so a run killed at any moment resumes from a
complete checkpoint. Nothing is pickled.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..common import InputError, atomic_dir, atomic_write

__all__ = ["find_checkpoint", "join_optimizer_state", "last_checkpoint", "read_state", "read_tensors",
           "rng_state", "set_rng_state", "split_optimizer_state", "task_state", "write_checkpoint"]

_POINTER = "last.json"


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """This process's RNG states: the JSON-able ones (python, numpy), and the torch tensors (CPU, CUDA)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`rng_state`."""
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"])


def split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as safetensors-able tensors ``state.<param>.<name>`` plus a JSON-able rest."""
    tensors, plain = {}, {}
    for pid, entries in state_dict["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value
            else:
                plain.setdefault(str(pid), {})[name] = value
    return tensors, {"state": plain, "param_groups": state_dict["param_groups"]}


def join_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    """Inverse of :func:`split_optimizer_state` (``tensors`` may hold other keys: they are ignored)."""
    state: dict[int, dict] = {int(pid): dict(entries) for pid, entries in plain["state"].items()}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def write_checkpoint(output: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
    """Write ``checkpoints/step-<step>/`` (``<name>.safetensors`` for each entry of ``tensors``, ``state.json``),
    point ``last.json`` at it, then delete the older checkpoints; returns the new folder."""
    root = output / "checkpoints"
    name = f"step-{step:08d}"
    with atomic_dir(root / name, overwrite=True) as tmp:
        for file, values in tensors.items():
            save_file(values, str(tmp / f"{file}.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    atomic_write(root / _POINTER, json.dumps({"checkpoint": name, "step": step}))
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old)
    return root / name


def _read_json(path: Path, keys: tuple[str, ...]) -> dict:
    """The JSON object in ``path``, which must have ``keys``; an InputError naming the file otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON (a truncated or overwritten file), not UTF-8
        raise InputError(f"{path} is corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict) or any(k not in value for k in keys):
        raise InputError(f"{path} is corrupt (expected a JSON object with {', '.join(keys)})")
    return value


def last_checkpoint(output: Path) -> Path | None:
    """The checkpoint ``output/checkpoints/last.json`` names, None when there is none."""
    pointer = output / "checkpoints" / _POINTER
    return output / "checkpoints" / _read_json(pointer, ("checkpoint",))["checkpoint"] if pointer.is_file() else None


def find_checkpoint(path: Path) -> Path:
    """``path`` as a checkpoint folder: a run folder's last checkpoint, or a checkpoint folder itself."""
    last = last_checkpoint(path)
    if last is not None:
        return last
    if (path / "state.json").is_file():
        return path
    raise InputError(f"{path} is neither a run folder of tools/train.py (with checkpoints/{_POINTER}) nor a "
                     "checkpoint folder (with state.json)")


def read_state(folder: Path) -> dict:
    """The ``state.json`` of checkpoint ``folder``."""
    return _read_json(folder / "state.json", ("step", "args"))


def read_tensors(folder: Path, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of ``<name>.safetensors`` in checkpoint ``folder``."""
    path = folder / f"{name}.safetensors"
    if not path.is_file():
        raise InputError(f"checkpoint {folder} has no {path.name}")
    try:
        return load_file(path, device=str(device))
    except SafetensorError as e:
        raise InputError(f"{path} is corrupt (not a readable safetensors file: {e})") from None


def task_state(state: dict) -> tuple[str, dict]:
    """The task that wrote checkpoint ``state`` and its own state (:meth:`attnzoo.tasks.Task.state`)."""
    name = state["args"]["task"]
    return name, state[name]
