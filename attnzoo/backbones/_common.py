"""Small pieces shared by the backbone families: the one input check (:func:`check_image_batch`, which every
family's ``forward_features`` and ``forward_intermediates`` call, and :func:`build_checked`, which every family
builds through so that timm's ``features_only`` wrappers check too), and timm's ``device=``/``dtype=``
constructor arguments for the families built from plain torch modules."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from timm.models import build_model_with_cfg
from timm.models._features import FeatureDictNet, FeatureHookNet, FeatureListNet
from torch import nn


def model_name(model: nn.Module, family: str) -> str:
    """The registered name of ``model`` (timm's ``pretrained_cfg``), else ``family``."""
    return getattr(model, "pretrained_cfg", {}).get("architecture", family)


@torch.jit.ignore
def check_image_batch(model: nn.Module, x: torch.Tensor, in_chans: int, family: str,
                      size: tuple[int, int] | None = None, why: str = "") -> None:
    """A ValueError naming the model, the argument and what it expects unless ``x`` is a floating-point image
    batch [B, in_chans, H, W] (with (H, W) == ``size`` for the models built for one input size; ``why`` says
    why in the message).

    Every family calls it on entry to ``forward_features`` and ``forward_intermediates`` (``forward`` and
    ``features_only`` go through them). It steps aside where shapes are not known: under ``torch.fx`` symbolic
    tracing (``x`` is a Proxy) and TorchScript (``torch.jit.ignore``); under ``torch.compile`` it only reads
    static shape facts, so it adds guards, not graph breaks.
    """
    if isinstance(x, torch.fx.Proxy):
        return
    name = model_name(model, family)
    expected = f"[B, {in_chans}, {size[0]}, {size[1]}]" if size else f"[B, {in_chans}, H, W] (in_chans={in_chans})"
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != in_chans or \
            (size is not None and tuple(x.shape[2:]) != tuple(size)):
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: input `x` must be {'' if size else 'an image batch '}{expected}"
                         f"{': ' + why if why else ''}; got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: input `x` must be a floating-point image batch, got {x.dtype}")


def build_checked(model_cls: type[nn.Module], variant: str, pretrained: bool, **kwargs) -> nn.Module:
    """timm's ``build_model_with_cfg``. With ``features_only=True``, timm's module-by-module wrappers run the
    model's modules past ``forward_features``; those get :func:`check_image_batch` as a forward pre-hook."""
    model = build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    if isinstance(model, (FeatureListNet, FeatureDictNet, FeatureHookNet)):
        in_chans = kwargs.get("in_chans", 3)
        model.register_forward_pre_hook(lambda m, args: check_image_batch(m, args[0], in_chans, variant))
    return model


class CheckedInput:
    """Mixin for timm CNNs (which keep ``in_chans``): :func:`check_image_batch` before the first conv, naming the
    model (``self.name``)."""

    name: str
    in_chans: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(self, x, self.in_chans, self.name)
        return super().forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        check_image_batch(self, x, self.in_chans, self.name)
        return super().forward_intermediates(x, *args, **kwargs)


@contextlib.contextmanager
def _factory_defaults(device: torch.device | str | None, dtype: torch.dtype | None) -> Iterator[None]:
    previous = torch.get_default_dtype()
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def takes_device_dtype(init: Callable[..., None]) -> Callable[..., None]:
    """Give a model's ``__init__`` timm's ``device=`` and ``dtype=``: its parameters and buffers are created on
    ``device`` (``"meta"`` builds without memory) with floating-point ``dtype``."""

    @functools.wraps(init)
    def wrapper(self, *args, device: torch.device | str | None = None, dtype: torch.dtype | None = None, **kwargs):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"{type(self).__name__}: `dtype` must be a floating-point dtype, got {dtype}")
        with _factory_defaults(device, dtype):
            init(self, *args, **kwargs)

    return wrapper
