"""What the library and the tools share: the bad-input error, model-name checks and atomic writes.

Every file or folder attnzoo writes for a user (checkpoints, Hub folders, logs, ``--out`` files, the shapes
dataset) goes through :func:`atomic_write`, :func:`atomic_file` or :func:`atomic_dir`: the content is written
under a temporary name beside the target, flushed and fsynced, renamed onto the target, and the folder holding it
fsynced, so a reader (or a run resumed after a crash or a power cut) sees the old content or the whole new one,
never part of it. Temporary names are unique per call (``tempfile``), so two processes never share one.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["InputError", "Interrupted", "MissingExtraError", "UnreadableSample", "atomic_dir", "atomic_file",
           "atomic_write", "check_model_name", "fsync_dir"]

_SOURCES = ("hf-hub:", "local-dir:")


class InputError(ValueError):
    """Bad input from the user of a tool (a missing folder, an unknown model, weights that do not fit).

    The tools print its message and exit with status 2 instead of a traceback (:func:`attnzoo.cli.tool_main`).
    """


class MissingExtraError(ImportError):
    """A module of attnzoo that needs an optional extra of ``pyproject.toml`` was imported without it; the
    message names the extra and how to install it (the tools print it and exit with status 1)."""

    def __init__(self, module: str, extra: str, missing: str | None):
        self.extra = extra
        super().__init__(f"{module} needs the '{extra}' extra ({missing or 'a dependency'} is not installed): "
                         f"pip install 'attnzoo[{extra}]'", name=missing)


class UnreadableSample(Exception):
    """A dataset's sample whose file cannot be read or decoded (a truncated JPEG, a file that is no image). The
    training loader replaces it with another sample drawn from its seed and counts it
    (:class:`attnzoo.engine.sampler.SeededSamples`); ``tools/eval.py`` leaves it out and counts it."""

    def __init__(self, path: str, reason: str):
        super().__init__(str(path), reason)  # both in args: the exception pickles across loader workers
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class Interrupted(Exception):
    """Training stopped by SIGINT or SIGTERM once the step in progress had finished and a checkpoint was written;
    the tools exit with 128 + the signal's number (130, 143)."""

    def __init__(self, signum: int, message: str):
        super().__init__(signum, message)
        self.signum, self.message = signum, message

    def __str__(self) -> str:
        return self.message


def check_model_name(name: str) -> str:
    """``name`` if timm can build it (a registered model, ``hf-hub:`` or ``local-dir:``), else an InputError
    listing the closest registered names."""
    import timm

    if name.startswith(_SOURCES):
        if name.startswith("local-dir:"):
            _check_hub_folder(name, Path(name[len("local-dir:"):]))
        return name
    if timm.is_model(name.split(".")[0]):  # "arch" or "arch.tag"
        return name
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; closest registered names: {', '.join(close)}" if close else ""
    raise InputError(f"model {name!r} is not registered with timm (nor attnzoo){hint}")


def _check_hub_folder(name: str, folder: Path) -> None:
    """An InputError naming the file unless ``folder`` is a Hub folder timm can load: a config.json that parses
    and names a registered architecture, and weights whose safetensors header is whole (read without the data)."""
    import json

    import timm
    from safetensors import SafetensorError, safe_open

    config = folder / "config.json"
    if not config.is_file():
        raise InputError(f"model {name!r}: no config.json in that folder (expected timm's Hub layout)")
    try:
        architecture = json.loads(config.read_text(encoding="utf-8")).get("architecture")
    except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, not an object
        raise InputError(f"{config} is corrupt (not a JSON object: {e})") from None
    if not isinstance(architecture, str) or not timm.is_model(architecture):
        raise InputError(f"{config}: architecture {architecture!r} is not registered with timm (nor attnzoo)")
    weights = folder / "model.safetensors"
    if weights.is_file():
        try:
            with safe_open(weights, "pt"):
                pass
        except SafetensorError as e:
            raise InputError(f"{weights} is corrupt (not a readable safetensors file: {e})") from None


# ------------------------------------------------------------------------------------------------ atomic writes


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of folder ``path`` (a rename into it, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """``open(path, mode)`` that writes a temporary file beside ``path`` and, when the block succeeds, fsyncs
    it, renames it onto ``path`` and fsyncs the folder; when the block fails, ``path`` is left as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically (:func:`atomic_file`); returns ``path``."""
    binary = isinstance(data, bytes)
    with atomic_file(path, "wb" if binary else "w", **({} if binary else {"encoding": encoding})) as f:
        f.write(data)
    return Path(path)


def _fsync_tree(folder: Path) -> None:
    for sub, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(sub, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(sub)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` that becomes ``path`` only when the block succeeds: its files
    and folders are fsynced, it is renamed onto ``path`` and the parent folder is fsynced.

    An existing non-empty ``path`` is an :class:`InputError` unless ``overwrite``; then the old folder is
    renamed aside before the new one is renamed in, and deleted after.
    """
    path = Path(path)
    if path.exists() and not overwrite and any(path.iterdir()):
        raise InputError(f"output folder {path} exists and is not empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    aside = None
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}-old-", dir=path.parent))
            os.replace(path, aside)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
