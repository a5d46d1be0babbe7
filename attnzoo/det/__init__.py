"""mmdetection / mmsegmentation integration.

Importing this module (configs do it through ``custom_imports=dict(imports=['attnzoo.det'])``)

1. puts a stand-in for mmcv's compiled ops in place when only mmcv-lite is installed (:mod:`attnzoo.det.ops`),
   before mmdet or mmseg import ``mmcv.ops``;
2. registers :class:`AttnzooBackbone` (any timm / attnzoo model by name) in mmdet's and mmseg's ``MODELS``;
3. allow-lists what mmengine's checkpoints pickle, so ``Runner(resume=True)`` and ``load_checkpoint`` work under
   torch's ``weights_only=True`` default (:mod:`attnzoo.det.checkpoint`).

It needs the ``det`` extra (``pip install 'attnzoo[det]'``): without it, importing this package or any module in
it raises :class:`attnzoo.common.MissingExtraError` naming the extra. The rest of attnzoo never imports mmengine,
mmcv, mmdet or mmseg.
"""
import importlib.util

from ..common import MissingExtraError

try:
    import mmcv  # noqa: F401
    import mmengine  # noqa: F401
except ImportError as e:
    raise MissingExtraError("attnzoo.det", "det", e.name) from None

from . import ops  # noqa: E402

ops.install()

from . import checkpoint  # noqa: E402
from .backbone import AttnzooBackbone, register  # noqa: E402

checkpoint.allow_mmengine_globals()

_registries = []
for _package in ("mmdet", "mmseg"):
    if importlib.util.find_spec(_package) is not None:
        _registries.append(importlib.import_module(f"{_package}.registry").MODELS)
register(*_registries)

__all__ = ["AttnzooBackbone", "ops", "checkpoint"]
