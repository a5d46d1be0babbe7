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

It also makes the Runner's checkpoints atomic. mmengine's ``CheckpointHook`` hands the serialised checkpoint to
a file backend's ``put``, which for a local path opens the final file and writes into it, so a run killed
mid-write leaves a truncated ``iter_N.pth``. :class:`AtomicCheckpointHook` is that same hook (every option kept)
writing through :class:`AtomicLocalBackend`, which writes a hidden temporary file beside the target, fsyncs it
and renames it into place. mmengine writes its ``last_checkpoint`` pointer only after the checkpoint is complete, so the
pointer never names a partial file (``attnzoo.det.runner`` reads it, falling back to the newest complete file).

The authors' checkpoints. DaViT's, L2ViT's and RAVLT's authors trained their detectors and segmentors with
mmdet 2.x / mmseg 0.x, whose checkpoints are ``{'meta': ..., 'state_dict': {'backbone.*', 'neck.*', heads},
'optimizer': ...}``. :func:`read_mm_checkpoint` reads one under ``weights_only=True`` (numpy's number and array
rebuilders allow-listed, for the scores an mmcv 1.x evaluation hook leaves in ``meta``);
``AttnzooBackbone(init_cfg=dict(type='Pretrained', checkpoint=FILE))`` loads its backbone, and
:func:`convert_mm_checkpoint` writes the whole model as a checkpoint of an attnzoo config, which
``tools/eval.py CONFIG CHECKPOINT`` (mmengine's ``load_checkpoint``) takes strictly.

Finally, resumption that reproduces the uninterrupted run. mmengine restores the weights, optimizer, schedulers
and iteration, and replays the data loader up to the resumed iteration (so the data order and the numpy-drawn
augmentations repeat), but not torch's RNG, from which stochastic depth and the RPN's sampler draw inside the
training step. :class:`SeedEachIterationHook` seeds torch before every training iteration from
``(seed, iteration)``, as ``tools/train.py`` seeds each sample's augmentation, so those draws no longer depend on
how the run got to that iteration.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import HistoryBuffer
from mmengine.registry import HOOKS

from ..common import atomic_file, atomic_write

__all__ = ["AtomicCheckpointHook", "AtomicLocalBackend", "SeedEachIterationHook", "WeightsOnlyCheckpointHook",
           "allow_mmengine_globals", "convert_mm_checkpoint", "read_mm_checkpoint", "NUMPY_GLOBALS"]

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


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend, except that ``put`` and ``put_text`` write through
    :func:`attnzoo.common.atomic_write`: a reader sees the old file or the whole new one, never part."""

    def put(self, obj: bytes, filepath: str | Path) -> None:
        atomic_write(filepath, obj)

    def put_text(self, obj: str, filepath: str | Path, encoding: str = "utf-8") -> None:
        self.put(obj.encode(encoding), filepath)


register_backend("atomic_local", AtomicLocalBackend, force=True)


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` (same options) whose checkpoints are written atomically through
    :class:`AtomicLocalBackend`; ``attnzoo.det.runner`` puts it in place of the config's ``CheckpointHook``."""

    def __init__(self, *args, backend_args: dict | None = None, **kwargs):
        if backend_args not in (None, {"backend": "atomic_local"}):
            raise ValueError(f"AtomicCheckpointHook writes local files only; got backend_args={backend_args}")
        super().__init__(*args, backend_args={"backend": "atomic_local"}, **kwargs)


@HOOKS.register_module()
class SeedEachIterationHook(Hook):
    """Seeds torch (CPU and CUDA) from ``(runner.seed, runner.iter)`` before each training iteration, so what the
    step draws (stochastic depth, proposal sampling) is the same in a resumed run (see the module docstring)."""

    priority = "VERY_HIGH"  # before any hook that could draw

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        torch.manual_seed(int(np.random.SeedSequence([runner.seed, runner.iter]).generate_state(1)[0]))


def _read(path: str | os.PathLike) -> object:
    # NUMPY_GLOBALS are allow-listed for good on importing attnzoo.det (allow_mmengine_globals); a
    # torch.serialization.safe_globals block here would remove them again on leaving it
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_mm_checkpoint(checkpoint: object) -> bool:
    state_dict = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    return isinstance(state_dict, dict) and any(isinstance(k, str) and k.startswith("backbone.") for k in state_dict)


def read_mm_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The ``state_dict`` of an mmdet/mmseg checkpoint (one with ``backbone.*`` weights) at ``path``, read with
    ``torch.load(weights_only=True)``; None for any other file, or one that this restricted load refuses (a
    ``.safetensors`` file, a classification checkpoint: their own loaders read them)."""
    if Path(path).suffix == ".safetensors":
        return None
    try:
        checkpoint = _read(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError):
        return None
    return checkpoint["state_dict"] if _is_mm_checkpoint(checkpoint) else None


def convert_mm_checkpoint(cfg, source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the authors' mmdet 2.x / mmseg 0.x checkpoint ``source`` as a checkpoint of the model of ``cfg`` (an
    attnzoo config with an ``AttnzooBackbone``, as mmengine's ``Config``) at ``out``, atomically.

    The backbone's keys go through :meth:`AttnzooBackbone.convert_mm_backbone` (``backbone.model.*``,
    ``backbone.out_norms.*``); the neck's and heads' keys carry over unchanged: mmdet 3.x / mmseg 1.x name the
    parameters of the modules in attnzoo's configs (FPN, RetinaHead, RPNHead, Shared2FCBBoxHead, FCNMaskHead,
    the cascade's lists of them, UPerHead, FPNHead, FCNHead) as mmdet 2.x / mmseg 0.x did. The result must fit the
    model exactly (an :class:`~attnzoo.hub.InputError` names the keys that do not); the classes in the source's
    ``meta`` go into ``meta.dataset_meta``."""
    from mmengine.registry import init_default_scope

    from ..common import InputError
    from ..hub import fit_report

    source = Path(source)
    if not source.is_file():
        raise InputError(f"checkpoint {source} does not exist")
    try:
        checkpoint = _read(source)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise InputError(f"checkpoint {source} cannot be read with torch.load(weights_only=True): {e}") from None
    if not _is_mm_checkpoint(checkpoint):
        raise InputError(f"checkpoint {source} is not an mmdet/mmseg checkpoint (a dict whose 'state_dict' has "
                         f"backbone.* keys)")
    init_default_scope(cfg.default_scope)
    models = __import__(f"{cfg.default_scope}.registry", fromlist=["MODELS"]).MODELS
    model_cfg = cfg.model.copy()
    model_cfg.backbone = dict(model_cfg.backbone, init_cfg=None)
    with torch.device("meta"):  # names and shapes only
        model = models.build(model_cfg)
    if not hasattr(model.backbone, "convert_mm_backbone"):
        raise InputError(f"the model of this config has a {type(model.backbone).__name__} backbone; "
                         f"convert_mm_checkpoint converts into attnzoo's AttnzooBackbone")
    state_dict = checkpoint["state_dict"]
    converted = {f"backbone.{k}": v for k, v in model.backbone.convert_mm_backbone(state_dict, str(source)).items()}
    converted.update((k, v) for k, v in state_dict.items() if not k.startswith("backbone."))
    own = model.state_dict()
    report = fit_report(own, converted)
    if report:
        raise InputError(f"checkpoint {source} does not fit the model of the config:{report}")
    meta = dict(converted_from=source.name)
    classes = (checkpoint.get("meta") or {}).get("CLASSES")
    if classes:
        meta["dataset_meta"] = dict(classes=tuple(classes))
    with atomic_file(out, "wb") as f:
        torch.save(dict(meta=meta, state_dict={k: converted[k] for k in own}), f)
    return Path(out)
