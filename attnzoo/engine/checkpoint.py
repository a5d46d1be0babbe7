"""The training checkpoint format: safetensors for tensors, JSON for everything else, written atomically.

``OUTPUT/checkpoints/step-N/`` holds ``model.safetensors``, ``ema.safetensors`` (when the run keeps an EMA),
``optimizer.safetensors`` (the optimizer's tensors and every process's torch RNG states) and ``state.json``:
``step``, ``epoch``, ``batch`` (where training continues), ``world_size``, ``args`` (the run's options),
``optimizer``/``scheduler``/``scaler`` (their JSON-able state), ``rng`` (each process's python and numpy RNG
states), ``metrics`` (the last epoch's row) and, under the key named by ``args["task"]``, the task's own state
(:meth:`attnzoo.tasks.Task.state`). ``OUTPUT/checkpoints/last.json`` names the newest complete checkpoint.

``state.json`` also records the sha256 of each tensor file (``sha256``: file name -> hex digest) and of its own
content (``state_sha256``: over its canonical JSON without that key, so a flipped digit that leaves valid JSON is
caught), checked on resume and publish (:func:`verify_checkpoint`). A ``state.json`` without ``state_sha256``
(written before it was recorded) has only its tensor files checked.

Each checkpoint folder is written through :func:`attnzoo.common.atomic_dir` (files and folders fsynced, then
renamed in) and ``last.json`` is replaced only after it, so a run killed at any moment resumes from a
complete checkpoint. The checkpoint before the newest is kept too: a resume whose newest checkpoint fails its
digests falls back to it (:func:`resume_checkpoint`). Only the run holding the output folder's lock
(:func:`attnzoo.engine.run.output_lock`) writes there. Nothing is pickled.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..common import InputError, atomic_dir, atomic_write, sha256_file

__all__ = ["find_checkpoint", "join_optimizer_state", "last_checkpoint", "read_state", "read_tensors",
           "resume_checkpoint", "rng_state", "set_rng_state", "split_optimizer_state", "task_state",
           "verify_checkpoint", "write_checkpoint"]

_POINTER = "last.json"
_SELF = "state_sha256"  # the key of state.json's digest of its own content


def _state_digest(state: dict) -> str:
    """The sha256 of ``state`` (as read from JSON) without its own digest, as canonical JSON: sorted keys, no
    spaces (a float's repr reads back to the same float, so writing and reading agree)."""
    body = {k: v for k, v in state.items() if k != _SELF}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


def _step(folder: Path) -> int:
    return int(folder.name[len("step-"):])


def _checkpoints(root: Path) -> list[Path]:
    """The ``step-N`` folders of ``root`` (never temporary ones), newest first."""
    return sorted((p for p in root.glob("step-*") if p.name[len("step-"):].isdigit()), key=_step, reverse=True)


def write_checkpoint(output: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
    """Write ``checkpoints/step-<step>/`` (``<name>.safetensors`` for each entry of ``tensors``, ``state.json``
    with their digests), point ``last.json`` at it, then delete every other checkpoint but the one ``last.json``
    named before (the fallback of :func:`resume_checkpoint`); returns the new folder."""
    root = output / "checkpoints"
    name = f"step-{step:08d}"
    previous = _pointer(root)
    with atomic_dir(root / name, overwrite=True) as tmp:
        digests = {}
        for file, values in tensors.items():
            save_file(values, str(tmp / f"{file}.safetensors"))
            digests[f"{file}.safetensors"] = sha256_file(tmp / f"{file}.safetensors")
        plain = json.loads(json.dumps({**state, "sha256": digests}))  # as a reader sees it: tuples are lists
        plain[_SELF] = _state_digest(plain)
        (tmp / "state.json").write_text(json.dumps(plain, indent=1))
    atomic_write(root / _POINTER, json.dumps({"checkpoint": name, "step": step}))
    for old in _checkpoints(root):
        if old.name not in (name, previous):
            shutil.rmtree(old)
    return root / name


def _pointer(root: Path) -> str | None:
    """The checkpoint name ``root/last.json`` holds, None without one; an InputError when it is unreadable."""
    pointer = root / _POINTER
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, bad UTF-8, no "checkpoint"
        raise InputError(f"{pointer} is corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(name, str) or not re.fullmatch(r"step-\d+", name):
        raise InputError(f"{pointer} is corrupt (checkpoint {name!r} is not a folder name)")
    return name


def last_checkpoint(output: Path) -> Path | None:
    """The checkpoint ``output/checkpoints/last.json`` names, None when there is none."""
    name = _pointer(output / "checkpoints")
    return None if name is None else output / "checkpoints" / name


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
    """The ``state.json`` of checkpoint ``folder``; an InputError naming it when it is missing or corrupt."""
    path = folder / "state.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"checkpoint {folder} has no state.json") from None
    except ValueError as e:  # bad JSON or bad UTF-8
        raise InputError(f"{path} is corrupt ({type(e).__name__}: {e})") from None


def verify_checkpoint(folder: Path, files: Iterable[str] | None = None) -> dict:
    """The state of checkpoint ``folder`` once its ``state.json`` matches its own digest and ``files`` (default:
    every tensor file it records) match the sha256 digests it records; an InputError naming the first file that
    does not."""
    state = read_state(folder)
    if _SELF in state and (actual := _state_digest(state)) != state[_SELF]:
        raise InputError(f"{folder / 'state.json'} is corrupt: the sha256 of its content is {actual}, it records "
                         f"{state[_SELF]}")
    digests = state.get("sha256")
    if not isinstance(digests, dict):
        raise InputError(f"{folder / 'state.json'} records no sha256 digests of the tensor files (written by an "
                         "older attnzoo: its files cannot be checked)")
    for file in digests if files is None else files:
        path = folder / file
        if file not in digests:
            raise InputError(f"{folder / 'state.json'} records no sha256 digest for {file}")
        if not path.is_file():
            raise InputError(f"{path} is missing")
        actual = sha256_file(path)
        if actual != digests[file]:
            raise InputError(f"{path} is corrupt: its sha256 is {actual}, {folder / 'state.json'} records "
                             f"{digests[file]}")
    return state


def resume_checkpoint(output: Path, warn: Callable[[str], None], main: bool = True) -> Path | None:
    """The newest intact checkpoint of run folder ``output`` (None without any): the one ``last.json`` names,
    else (``warn`` says why) the newest older one whose digests match, which ``last.json`` then names (written by
    the ``main`` process only). An InputError when none is intact."""
    root = output / "checkpoints"
    try:
        name = _pointer(root)
    except InputError as e:
        warn(f"warning: {e}; looking for the newest intact checkpoint")
        name = ""
    candidates = _checkpoints(root)
    if name is None:
        return None
    if name:
        candidates = [root / name, *(c for c in candidates if _step(c) < _step(root / name))]
    problems = []
    for folder in candidates:
        try:
            verify_checkpoint(folder)
        except InputError as e:
            problems.append(str(e))
            continue
        if problems:
            warn(f"warning: {problems[0]}; resuming from the previous intact checkpoint {folder.name} instead")
        if folder.name != name and main:
            atomic_write(root / _POINTER, json.dumps({"checkpoint": folder.name, "step": _step(folder)}))
        return folder
    raise InputError(f"no intact checkpoint in {root} to resume from: " + ("; ".join(problems) or "none there"))


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
