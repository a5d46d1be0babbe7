"""mmengine checkpoints that load under ``torch.load(weights_only=True)``, torch's default since 2.6.

mmengine 0.10.7 never passes ``weights_only``, so on recent torch its ``Runner(resume=True)`` and
``load_checkpoint`` unpickle with the restricted loader, which accepts tensors, containers and plain numbers and
refuses other globals. A Runner checkpoint holds three kinds of foreign object:

* numpy arrays and scalars (the message hub's ``eta``, the arrays inside its history buffers): their rebuilding
  functions only turn bytes and a dtype back into an array, so :func:`allow_mmengine_globals` allow-lists exactly
  those (``torch.serialization.add_safe_globals``);
* ``HistoryBuffer``, the message hub's smoothed logs. Its pickled state also carries its statistics methods, which
  pickle as ``getattr(HistoryBuffer, 'mean')``, and allow-listing ``getattr`` would let a checkpoint call any
  attribute of any allow-listed object. So :class:`WeightsOnlyCheckpointHook` (in the configs' ``custom_hooks``)
  stores each buffer as plain lists when saving and rebuilds it after loading.

Nothing here sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` or passes ``weights_only=False``.
"""
from __future__ import annotations

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.registry import HOOKS

__all__ = ["WeightsOnlyCheckpointHook", "allow_mmengine_globals", "NUMPY_GLOBALS"]

# what pickle calls to rebuild an ndarray (``_reconstruct(ndarray, shape, dtype)`` then its raw bytes) and a
# numpy scalar (``scalar(dtype, bytes)``), and the dtype classes of bool and numbers (not of Python objects)
NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np._core.multiarray.scalar, np.ndarray, np.dtype] + [
    type(np.dtype(code)) for code in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]
]

_BUFFER = "__mmengine_history_buffer__"


def allow_mmengine_globals() -> None:
    torch.serialization.add_safe_globals(NUMPY_GLOBALS)


def _encode(obj):
    """``obj`` with every HistoryBuffer replaced by plain lists, recursively."""
    if isinstance(obj, HistoryBuffer):
        log, count = obj.data
        return {_BUFFER: dict(log_history=log.tolist(), count_history=count.tolist(), max_length=obj.max_length)}
    if isinstance(obj, dict):
        return type(obj)((k, _encode(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_encode(v) for v in obj)
    return obj


def _decode(obj):
    """Inverse of :func:`_encode`."""
    if isinstance(obj, dict):
        if _BUFFER in obj:
            return HistoryBuffer(**obj[_BUFFER])
        return type(obj)((k, _decode(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_decode(v) for v in obj)
    return obj


@HOOKS.register_module()
class WeightsOnlyCheckpointHook(Hook):
    """Saves the Runner's message hub as plain data and restores it on load (see the module docstring)."""

    priority = "VERY_LOW"  # after every hook that adds to the checkpoint

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint["message_hub"] = _encode(checkpoint["message_hub"])

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if "message_hub" in checkpoint:
            checkpoint["message_hub"] = _decode(checkpoint["message_hub"])
