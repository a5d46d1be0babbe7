"""A stand-in for ``mmcv._ext``, the compiled ops that mmcv-lite leaves out.

mmdet and mmseg import ``mmcv.ops`` on their first model import, and ``mmcv.ops`` loads ``mmcv._ext``: without it
no model can even be built. mmcv with compiled ops has no wheel for recent torch (``make mmcv-full`` builds one in
about 20 minutes). This module provides the ops that the common detectors and segmentors call, through
torchvision's compiled ops or plain PyTorch, with the calling convention of ``mmcv._ext`` (outputs written into
the buffers that ``mmcv.ops`` allocates):

    nms                                  greedy NMS (and so ``mmcv.ops.batched_nms``): torchvision.ops.nms
    roi_align_forward / _backward        RoIAlign, average mode: torchvision.ops.roi_align
    sigmoid_focal_loss_forward / _backward   focal loss on logits (mmdet takes this path on CUDA)

Every other name of ``mmcv._ext`` resolves to a function that raises :class:`MissingOpError` naming the op and
the remedy, so ``import mmcv.ops`` succeeds and only a config that really needs, say, deformable convolution fails.

:func:`install` puts the stand-in in ``sys.modules`` and steps aside when the real compiled ops are importable.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import torch
import torch.nn.functional as F
import torchvision

__all__ = ["MissingOpError", "PROVIDED", "install", "installed"]

MODULE = "mmcv._ext"


class MissingOpError(NotImplementedError):
    """An op of ``mmcv._ext`` that the stand-in does not provide."""


def _missing(op: str, what: str | None = None) -> MissingOpError:
    what = what or "is not provided by attnzoo.det's stand-in for mmcv's compiled ops"
    return MissingOpError(
        f"{MODULE}.{op} {what} (mmcv-lite is installed, which has no compiled ops; the stand-in provides "
        f"{', '.join(sorted(PROVIDED))}). Remedy: build the full mmcv 2.1.0 with `make mmcv-full`, or choose a "
        f"config that does not use this op."
    )


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0) -> torch.Tensor:
    """Indices of the boxes kept by greedy NMS, by decreasing score.

    With ``offset=1`` box sides measure ``x2 - x1 + 1`` (pixel-inclusive boxes). Moving x2, y2 one further out
    turns every side length and overlap into the offset-0 ones, so the same kernel serves both.
    """
    if offset not in (0, 1):
        raise ValueError(f"{MODULE}.nms: `offset` must be 0 or 1, got {offset}")
    if offset:
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + offset], dim=1)
    return torchvision.ops.nms(boxes, scores, float(iou_threshold))


def _roi_align(input, rois, aligned_height, aligned_width, spatial_scale, sampling_ratio, pool_mode, aligned):
    if pool_mode != 1:
        raise _missing("roi_align_forward", "with pool_mode='max' is not provided by attnzoo.det's stand-in")
    return torchvision.ops.roi_align(
        input, rois, (aligned_height, aligned_width), spatial_scale, sampling_ratio, aligned
    )


def roi_align_forward(input, rois, output, argmax_y, argmax_x, *, aligned_height, aligned_width,
                      spatial_scale, sampling_ratio, pool_mode, aligned) -> None:
    """RoIAlign (Mask R-CNN): each RoI's bins average bilinear samples of the feature map; writes ``output``."""
    output.copy_(_roi_align(input, rois, aligned_height, aligned_width, spatial_scale, sampling_ratio,
                            pool_mode, aligned))


def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, *, aligned_height, aligned_width,
                       spatial_scale, sampling_ratio, pool_mode, aligned) -> None:
    """Gradient of :func:`roi_align_forward` with respect to the feature map; writes ``grad_input``.

    RoIAlign is linear in the feature map, so its gradient does not depend on the values: differentiate it at 0.
    """
    x = grad_input.new_zeros(grad_input.shape, requires_grad=True)
    with torch.enable_grad():
        out = _roi_align(x, rois, aligned_height, aligned_width, spatial_scale, sampling_ratio, pool_mode, aligned)
        (grad,) = torch.autograd.grad(out, x, grad_output)
    grad_input.copy_(grad)


def _sigmoid_focal_loss(input, target, weight, gamma, alpha):
    """Focal loss (Lin et al. 2017) per logit, with label ``num_classes`` meaning background:

        FL = -alpha (1 - p)^gamma log p          for the target class (p = sigmoid(x))
        FL = -(1 - alpha) p^gamma log(1 - p)     for every other class

    ``weight`` (if any) scales each row by the weight of its target class, as mmcv's kernel does.
    """
    if weight.numel():
        raise _missing("sigmoid_focal_loss_forward", "with a class `weight` is not provided by attnzoo.det's "
                       "stand-in (mmdet applies its weights outside the op)")
    positive = F.one_hot(target, input.shape[1] + 1)[:, :-1].bool()
    p = input.sigmoid()
    loss_pos = -alpha * (1 - p).pow(gamma) * F.logsigmoid(input)
    loss_neg = -(1 - alpha) * p.pow(gamma) * F.logsigmoid(-input)
    return torch.where(positive, loss_pos, loss_neg)


def sigmoid_focal_loss_forward(input, target, weight, output, *, gamma, alpha) -> None:
    output.copy_(_sigmoid_focal_loss(input, target, weight, gamma, alpha))


def sigmoid_focal_loss_backward(input, target, weight, grad_input, *, gamma, alpha) -> None:
    """d FL / d logit, elementwise (mmcv multiplies by the incoming gradient itself)."""
    x = input.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = _sigmoid_focal_loss(x, target, weight, gamma, alpha)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    grad_input.copy_(grad)


_OPS = {f.__name__: f for f in (nms, roi_align_forward, roi_align_backward, sigmoid_focal_loss_forward,
                                 sigmoid_focal_loss_backward)}
PROVIDED = frozenset(_OPS)


def _module_getattr(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise _missing(name)

    missing.__name__ = name
    return missing


def installed() -> bool:
    """True when ``mmcv._ext`` is this stand-in."""
    return getattr(sys.modules.get(MODULE), "__attnzoo_stand_in__", False)


def install() -> bool:
    """Make ``import mmcv._ext`` return the stand-in, unless the real compiled ops are installed.

    Call before the first ``import mmcv.ops`` (``import attnzoo.det`` does). Returns True when the stand-in is
    (now) in place, False when the real ops are used.
    """
    if installed():
        return True
    if importlib.util.find_spec("mmcv") is None:
        raise ImportError("attnzoo.det needs mmcv: install the det extra, `pip install -e '.[det]'`")
    if importlib.util.find_spec(MODULE) is not None:
        return False
    ext = types.ModuleType(MODULE, __doc__)
    # a spec without a loader: mmengine's mmcv_full_available() then reports False instead of crashing
    ext.__spec__ = importlib.machinery.ModuleSpec(MODULE, None)
    ext.__file__ = __file__
    ext.__attnzoo_stand_in__ = True
    ext.__dict__.update(_OPS)
    ext.__getattr__ = _module_getattr
    sys.modules[MODULE] = ext
    import mmcv

    mmcv._ext = ext
    return True
