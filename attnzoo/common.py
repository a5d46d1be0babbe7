"""What the library and the tools share: the bad-input error, model-name checks and atomic writes.

Every file or folder attnzoo writes for a user (checkpoints, Hub folders, logs, ``--out`` files, the shapes
dataset) goes through :func:`atomic_write`, :func:`atomic_file` or :func:`atomic_dir`: the content is written
under a temporary name beside the target, flushed and fsynced, renamed onto the target, and the folder holding it
fsynced, so a reader (or a run resumed after a crash or a power cut) sees the old content or the whole new one,
never part of it. Temporary names are unique per call (``tempfile``), so two processes never share one, and what a
killed writer leaves is finished or rolled back by the next writer of the same target (:func:`recover`).
"""
from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["InputError", "Interrupted", "MissingExtraError", "UnreadableSample", "atomic_dir", "atomic_file",
           "atomic_write", "check_model_name", "fsync_dir", "fsync_tree", "recover", "sha256_file",
           "verify_hub_folder"]

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
            folder = Path(name[len("local-dir:"):])
            if not folder.exists():
                recover(folder.parent, folder.name)  # a replace that a kill interrupted
            _check_hub_folder(name, folder)
            verify_hub_folder(folder)
        return name
    if timm.is_model(name.split(".")[0]):  # "arch" or "arch.tag"
        return name
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; closest registered names: {', '.join(close)}" if close else ""
    raise InputError(f"model {name!r} is not registered with timm (nor attnzoo){hint}")


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_hub_folder(folder: str | os.PathLike) -> None:
    """Check the files of a Hub folder against the digests its ``config.json`` records (``sha256``: file name ->
    hex digest, as :func:`attnzoo.hub.save_hub_folder` writes); an InputError naming a file that does not match.
    A folder that records none (written by another tool) passes."""
    folder = Path(folder)
    try:
        digests = json.loads((folder / "config.json").read_text()).get("sha256") or {}
    except (ValueError, AttributeError) as e:  # bad JSON, bad UTF-8, not an object
        raise InputError(f"{folder / 'config.json'} is corrupt ({type(e).__name__}: {e})") from None
    for file, digest in digests.items():
        path = folder / file
        if not path.is_file():
            raise InputError(f"{path} is missing (its config.json records its sha256)")
        if sha256_file(path) != digest:
            raise InputError(f"{path} is corrupt: its sha256 differs from the one {folder / 'config.json'} records")


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
#
# A write in progress is ``.NAME.TOKEN.tmp`` beside its target NAME (TOKEN: tempfile's 8 random characters), held
# under an exclusive flock for as long as its writer lives (the kernel drops it on kill -9). A folder replace
# renames the old folder to ``.NAME.TOKEN.old`` (the same TOKEN) only once the new one is complete and fsynced,
# then renames the new one in and deletes the old one. So whatever a kill interrupts, :func:`recover` can tell
# from the names left what to do: an ``.old`` beside the target means the replace was done (delete it), an
# ``.old`` without the target but with its ``.tmp`` means the new one was complete (rename it in), an ``.old``
# alone means roll back (rename it back); a ``.tmp`` without an ``.old`` was never complete (delete it).

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<token>[a-z0-9_]{8})\.(?P<kind>tmp|old)$")


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError raised in the block that names no file names ``path``; so does safetensors' error for a failed
    write, which carries only the OS's message ("... (os error 28)"): it becomes that OSError."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:  # (without an errno, str(e) would lose the message)
            e.filename = str(path)
        raise
    except Exception as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if type(e).__name__ != "SafetensorError" or code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from e


def _named(path: Path, make, **kwargs):
    """``make(**kwargs)`` (tempfile's), whose OSError names ``path`` rather than the temporary name it tried."""
    try:
        return make(**kwargs)
    except OSError as e:
        if e.errno is not None:
            e.filename = str(path)
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of folder ``path`` (a rename into it, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _abandoned(path: Path) -> bool:
    """Whether no living process writes the temporary file or folder ``path`` (its writer holds a flock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # renamed or deleted meanwhile (its writer is at work), or not ours to open
        return False
    try:
        _lock(fd)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops the lock just taken


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def recover(folder: str | os.PathLike, name: str | None = None) -> list[str]:
    """Finish or roll back what killed writers left in ``folder`` (for target ``name`` only, when given): see the
    comment above. Writes still in progress are left alone. Returns one line per action, for a log."""
    folder = Path(folder)
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return []
    found: dict[tuple[str, str], dict[str, Path]] = {}
    for entry in entries:
        m = _TEMP.match(entry)
        if m and (name is None or m["name"] == name):
            found.setdefault((m["name"], m["token"]), {})[m["kind"]] = folder / entry
    done = []
    for (target_name, _), kinds in sorted(found.items()):
        target, tmp, old = folder / target_name, kinds.get("tmp"), kinds.get("old")
        if tmp is not None and not _abandoned(tmp):
            continue
        if old is None:
            _remove(tmp)
            done.append(f"removed {tmp.name}, left incomplete by a killed writer")
        elif os.path.lexists(target):
            _remove(old)
            if tmp is not None:
                _remove(tmp)
            done.append(f"removed {old.name}, the folder {target_name} replaced")
        elif tmp is not None:
            os.replace(tmp, target)
            _remove(old)
            done.append(f"finished replacing {target_name} (a killed writer had renamed the old one aside)")
        else:
            os.replace(old, target)
            done.append(f"restored {target_name} from {old.name}")
    if done:
        fsync_dir(folder)
    return done


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """``open(path, mode)`` that writes a temporary file beside ``path`` and, when the block succeeds, fsyncs
    it, renames it onto ``path`` and fsyncs the folder; when the block fails, ``path`` is left as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path.parent, path.name)
    fd, tmp = _named(path, tempfile.mkstemp, prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _lock(fd)
        with _naming(path), os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # under the lock: a recover() sees the temporary file held, or gone
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


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under ``folder`` (and itself)."""
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
    and folders are fsynced, it is renamed onto ``path`` and the parent folder is fsynced. What a killed earlier
    writer of ``path`` left is finished or rolled back first (:func:`recover`).

    An existing non-empty ``path`` is an :class:`InputError` unless ``overwrite``; then the old folder is
    renamed aside before the new one is renamed in, and deleted after: a kill at any point leaves the old folder
    or the new one at ``path`` (or their parts under temporary names, which :func:`recover` puts back).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path.parent, path.name)
    if path.exists() and not overwrite and any(path.iterdir()):
        raise InputError(f"output folder {path} exists and is not empty")
    tmp = Path(_named(path, tempfile.mkdtemp, prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    held = os.open(tmp, os.O_RDONLY)  # the lock stays on the folder through its renames
    aside = None
    try:
        _lock(held)
        with _naming(path):
            yield tmp
        fsync_tree(tmp)
        if path.exists():
            aside = tmp.with_suffix(".old")
            os.replace(path, aside)
            fsync_dir(path.parent)
        try:
            os.replace(tmp, path)
        except OSError:
            if aside is not None and not path.exists():  # put the old one back
                os.replace(aside, path)
                aside = None
            raise
        fsync_dir(path.parent)
    finally:
        os.close(held)
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
