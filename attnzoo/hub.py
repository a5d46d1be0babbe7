"""Models by name and weights on disk, in timm's Hugging Face Hub layout, for the tools.

A Hub folder is what ``timm.create_model("hf-hub:ORG/NAME")`` and ``timm.create_model("local-dir:PATH")`` load:
``config.json`` (architecture, model_args, pretrained_cfg) + ``model.safetensors`` + a ``README.md`` model card.
Writing it is timm's own ``save_for_hf``; this module adds the checks and messages a command-line user needs,
records the sha256 of ``model.safetensors`` in ``config.json`` (``sha256``, checked by
:func:`attnzoo.common.verify_hub_folder` whenever attnzoo loads a ``local-dir:``), and writes the folder
atomically (:func:`attnzoo.common.atomic_dir`).
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models._hub import generate_readme, save_for_hf

from .backbones._pretrained import checkpoint_weights, read_training_checkpoint
from .common import InputError, atomic_dir, check_model_name, sha256_file

__all__ = ["create_model", "filter_fn_of", "fit_report", "load_weights", "read_state_dict", "save_hub_folder"]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt``/``.bin`` file loaded with
    ``weights_only=True``: a bare state_dict, or the weights inside a training checkpoint, its EMA entry when the
    file's name ends in ``ema`` (:func:`attnzoo.backbones._pretrained.checkpoint_weights`). A tensor file of a
    checkpoint of tools/train.py (beside its state.json) must match the sha256 recorded there."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors" and (path.parent / "state.json").is_file():
        from .engine.checkpoint import verify_checkpoint

        verify_checkpoint(path.parent, [path.name])
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except SafetensorError as e:  # truncated, or a header that is not safetensors'
            raise InputError(f"checkpoint {path} is not a readable safetensors file: {e}") from None
    try:
        checkpoint = read_training_checkpoint(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, zipfile.BadZipFile) as e:
        # refused by the weights-only unpickler, a truncated zip (RuntimeError), a file that is no torch.save
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"checkpoint {path} cannot be read with torch.load(weights_only=True): {reason}") from None
    if not isinstance(checkpoint, dict):
        raise InputError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a state_dict")
    try:
        return checkpoint_weights(checkpoint, path)
    except ValueError as e:
        raise InputError(str(e)) from None


def _key_report(label: str, keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
    return f"\n  {label}: {shown}"


def fit_report(own: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor]) -> str:
    """'' when ``state_dict`` has exactly the keys and shapes of ``own`` (a model's state_dict), else lines naming
    the keys missing from it, those the model does not have and the shape mismatches."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state_dict and state_dict[k].shape != v.shape]
    return "".join(_key_report(label, keys) for label, keys in (
        ("missing from the checkpoint", missing), ("not in the model", unexpected),
        ("shape (checkpoint vs model)", mismatched)) if keys)


def create_model(name: str, pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=pretrained, **kwargs)``, each failure a user causes an
    :class:`InputError` naming the model: a name timm does not know (:func:`~attnzoo.common.check_model_name`),
    keyword arguments the model does not take, pretrained weights that do not exist (no tag of the name has a
    file) or that cannot be fetched (no network and not in the Hugging Face cache)."""
    name = check_model_name(name)
    if pretrained and not name.startswith(("hf-hub:", "local-dir:")) and not timm.list_pretrained(
            name if "." in name else f"{name}.*"):
        tags = timm.list_pretrained(f"{name.split('.')[0]}.*")
        raise InputError(f"model {name!r} has no pretrained weights " + (
            f"(its tags with weights: {', '.join(tags)})" if tags else "(none are published for it)") +
            ": start from random weights or from a checkpoint file instead")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise InputError(f"model {name!r} does not take the arguments {kwargs}: {e}") from None
    except OSError as e:  # the Hub client's and urllib's errors (no network, offline mode, not in the cache)
        if not pretrained:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"model {name!r}: its pretrained weights cannot be fetched ({type(e).__name__}: {first}); "
                         "connect to the Hub, or point HF_HUB_CACHE at a cache that holds them") from None


def filter_fn_of(model: torch.nn.Module) -> Callable | None:
    """The ``checkpoint_filter_fn`` beside the model's class, or beside the timm class it derives from."""
    for cls in type(model).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "checkpoint_filter_fn", None)
        if fn is not None:
            return fn
    return None


def load_weights(model: torch.nn.Module, path: str | os.PathLike,
                 filter_fn: Callable[[dict, torch.nn.Module], dict] | None = None,
                 new_head: bool = False) -> list[str]:
    """Load the weights at ``path`` into ``model`` strictly (after ``filter_fn(state_dict, model)``, e.g. the
    model's ``checkpoint_filter_fn`` for the authors' layout); an InputError names the keys that do not fit.
    With ``new_head`` the classifier (``pretrained_cfg['classifier']``) may differ and keeps the model's own
    weights; returns the classifier keys that did."""
    state_dict = read_state_dict(path)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    own = model.state_dict()
    differs: list[str] = []
    head = getattr(model, "pretrained_cfg", {}).get("classifier") or ""
    under = tuple(f"{h}." for h in ([head] if isinstance(head, str) else head) if h)
    if new_head and under:
        # the classifier may differ (fine-tuning to other classes): every key under it is the model's own
        differs = sorted(k for k in {*own, *state_dict} if k.startswith(under) and
                         (k not in own or k not in state_dict or own[k].shape != state_dict[k].shape))
        if differs:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(under)}
            state_dict.update((k, v) for k, v in own.items() if k.startswith(under))
    report = fit_report(own, state_dict)
    if report:
        name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise InputError(f"checkpoint {path} does not fit model {name}:{report}")
    model.load_state_dict(state_dict)
    return differs


def save_hub_folder(model: torch.nn.Module, folder: str | os.PathLike, *, label_names: list[str] | None = None,
                    card: dict | None = None, data_config: dict | None = None, overwrite: bool = False,
                    check: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` in timm's Hub layout (config.json, model.safetensors, README.md), atomically; config.json's
    ``sha256`` records the digest of model.safetensors.

    ``card`` is timm's model-card dict (``description``, ``details`` such as ``{"Top-1": ...}``, ...).
    ``check(tmp)`` runs on the complete folder under its temporary name: when it raises, nothing is written (an
    old ``folder`` stays as it was).
    """
    folder = Path(folder)
    model_config = {"label_names": list(label_names)} if label_names else None
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        save_for_hf(model, tmp, model_config=model_config, safe_serialization=True, data_config=data_config)
        config = json.loads((tmp / "config.json").read_text())
        config["sha256"] = {"model.safetensors": sha256_file(tmp / "model.safetensors")}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "README.md").write_text(generate_readme(card or {}, folder.name), encoding="utf-8")
        if check is not None:
            check(tmp)
    return folder
