"""Pieces every command-line tool in ``tools/`` shares: the error epilogue and the mmdetection config options."""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from .common import InputError, MissingExtraError

__all__ = ["add_config_arguments", "tool_main"]


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
