"""Pieces every command-line tool in ``tools/`` shares: the error epilogue and the mmdetection config options."""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
from collections.abc import Callable

from .common import InputError, Interrupted, MissingExtraError

__all__ = ["add_config_arguments", "at_least", "exit_status", "fraction", "given_options", "tool_main"]


def tool_main(prog: str, body: Callable[[], object], cleanup: Callable[[], None] | None = None) -> int:
    """The exit status of a tool's ``body``: what it returns when that is an int, else 0. A failure the user can
    act on becomes one line ``PROG: error: MESSAGE`` on stderr (no traceback) and a status (:func:`exit_status`):
    2 for bad input, 1 for the environment (a full disk, a read-only or missing folder, a missing extra), 130/143
    for SIGINT/SIGTERM. ``ATTNZOO_DEBUG=1`` re-raises instead, for the traceback. ``cleanup`` runs in every case."""
    try:
        status = body()
        return status if isinstance(status, int) else 0
    except (Exception, KeyboardInterrupt) as e:
        status, message = exit_status(e)
        if status is None or os.environ.get("ATTNZOO_DEBUG", "") not in ("", "0"):
            raise
        print(f"{prog}: {message}", file=sys.stderr, flush=True)
        return status
    finally:
        if cleanup is not None:
            cleanup()


def exit_status(e: BaseException) -> tuple[int | None, str]:
    """The status and the one-line message a tool ends with on ``e``; ``(None, "")`` for a bug (a traceback).

    Input files are checked where they are read (``attnzoo.hub``, ``attnzoo.engine.checkpoint``, the datasets),
    which raise :class:`InputError` naming the file; what reaches here as an ``OSError`` is the environment.
    """
    if isinstance(e, InputError):
        return 2, f"error: {_from_worker(str(e))}"
    if isinstance(e, MissingExtraError):
        return 1, f"error: {e}"
    if isinstance(e, Interrupted):
        return 128 + e.signum, f"stopped: {e}"
    if isinstance(e, KeyboardInterrupt):
        return 128 + signal.SIGINT, "stopped: interrupted (SIGINT)"
    if isinstance(e, OSError):
        return 1, f"error: {_os_error(e)}"
    return None, ""


def _from_worker(message: str) -> str:
    """The message itself of an exception that torch's DataLoader re-raised from a worker process, whose text is
    the worker's traceback ending in ``module.Class: message``; any other message as it is."""
    if "Original Traceback (most recent call last)" not in message:
        return message
    last = message.strip().splitlines()[-1]
    name, _, text = last.partition(": ")
    return text if text and " " not in name else last


def _os_error(e: OSError) -> str:
    """``FILE: what happened (ERRNO)``, e.g. ``runs/x/log.csv: No space left on device (ENOSPC)``."""
    if e.errno is None:  # re-raised from a data-loader worker: the message is the worker's traceback
        return _from_worker(str(e)) or type(e).__name__
    what = f"{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)})"
    files = [f for f in (e.filename, e.filename2) if f is not None]
    hint = {errno.ENOSPC: ": free space or choose another folder",
            errno.EROFS: ": the file system is read-only; choose another folder",
            errno.EACCES: ": no permission; choose another folder",
            errno.EEXIST: ": a file is where a folder is needed", errno.ENOTDIR: ": not a folder"}.get(e.errno, "")
    return f"{' -> '.join(map(str, files))}: {what}{hint}" if files else f"{what}{hint}"


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a tool that takes an mmdetection/mmsegmentation config (``attnzoo.det.runner``); a
    :class:`~attnzoo.common.MissingExtraError` without the ``det`` extra."""
    importlib.import_module("attnzoo.det")  # raises MissingExtraError without the det extra
    from mmengine.config import DictAction

    p.add_argument("config", help="mmdetection/mmsegmentation config (.py)")
    p.add_argument("--data-root", help="dataset folder that replaces the config's data_root (see attnzoo.det.runner)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={}, metavar="KEY=VALUE",
                   help="override config settings, e.g. train_cfg.max_epochs=3 model.backbone.drop_path_rate=0.1")


def at_least(low: float, kind: type = int) -> Callable[[str], float]:
    """An argparse ``type``: a number of ``kind`` (int or float) that is at least ``low``; otherwise argparse's
    one-line error naming the option (status 2)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a value of at least {low}, got {text}")
        return value

    return parse


def fraction(text: str) -> float:
    """An argparse ``type``: a number in [0, 1) (a drop or decay rate)."""
    value = at_least(0.0, float)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a value in [0, 1), got {text}")
    return value


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options that ``argv`` sets itself, as opposed to those left at their defaults."""
    defaults = [(action, action.default) for action in parser._actions]
    parser_defaults, parser._defaults = parser._defaults, {}
    try:
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in defaults:
            action.default = default
        parser._defaults = parser_defaults
