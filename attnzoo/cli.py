"""Pieces every command-line tool in ``tools/`` shares: the error epilogue and the mmdetection config options."""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from .common import InputError, MissingExtraError

__all__ = ["add_config_arguments", "at_least", "fraction", "tool_main"]


def tool_main(prog: str, body: Callable[[], object], cleanup: Callable[[], None] | None = None) -> int:
    """The exit status of a tool's ``body``: what it returns when that is an int, else 0. An
    :class:`~attnzoo.common.InputError` becomes one line ``PROG: error: MESSAGE`` on stderr and status 2, a
    :class:`~attnzoo.common.MissingExtraError` the same with status 1. ``cleanup`` runs in every case."""
    try:
        status = body()
        return status if isinstance(status, int) else 0
    except (InputError, MissingExtraError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, InputError) else 1
    finally:
        if cleanup is not None:
            cleanup()


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
