"""Elementwise gates of the CNN attention modules, which are memory-bound: each reads the feature map once or
twice and does a handful of flops per element, so fusing them saves whole passes over the map.

    ELA (Xu & Wan 2024):   x_h = mean_W(x), x_w = mean_H(x)                     ``ela_pool``
                           y = x · a_h[..., None] · a_w[..., None, :]             ``ela_gate``
    ULSAM (Saini et al. 2020), per channel subspace g:
                           y = x · softmax_{H·W}(logits_g) + x                    ``subspace_attention``

The small convolutions and norms between the pooling and the gate (ELA's Conv1d + GroupNorm + sigmoid,
ULSAM's 1×1 convs, BN, ReLU and max-pool) stay in PyTorch. ``reference.py`` holds the formulas, ``fused.py``
the Triton forwards and backwards.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_float, check_rank, check_same, shape_str
from .._op import Op, fused_module
from .reference import ela_gate_reference, ela_pool_reference, subspace_attention_reference

fused = fused_module(__name__)

__all__ = ["ela_pool", "ela_gate", "subspace_attention"]


def _unsupported(x: Tensor, *_) -> str | None:
    return fused.unsupported(x)


def ela_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ELA's strip pooling: the mean of x along each row and along each column.

    Args:
        x: [B, C, H, W] feature map, any strides.

    Returns:
        (x_h, x_w): [B, C, H] (mean over W) and [B, C, W] (mean over H), the dtype of x.
    """
    op = "ela_pool"
    check_float(op, "x", x)
    check_rank(op, "x", x, "BCHW")
    _check_nonempty(op, x)
    return _ELA_POOL(x)


def ela_gate(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """ELA's output: x scaled by a row gate and a column gate, ``x · a_h[..., None] · a_w[..., None, :]``.

    Args:
        x: [B, C, H, W].
        a_h: [B, C, H], the gate of each row (ELA: sigmoid(GN(Conv1d(x_h)))).
        a_w: [B, C, W], the gate of each column.

    Returns:
        [B, C, H, W], the dtype of x.
    """
    op = "ela_gate"
    check_float(op, "x", x)
    check_rank(op, "x", x, "BCHW")
    _check_nonempty(op, x)
    B, C, H, W = x.shape
    for name, t, want in (("a_h", a_h, (B, C, H)), ("a_w", a_w, (B, C, W))):
        check_float(op, name, t)
        check_same(op, "x", x, name, t)
        if tuple(t.shape) != want:
            raise ValueError(f"{op}: `{name}` must have shape {shape_str(want)} for `x` of shape "
                             f"{shape_str(x.shape)}, got {shape_str(t.shape)}")
    return _ELA_GATE(x, a_h, a_w)


def subspace_attention(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """ULSAM's subspace gating: the C channels of x form G equal subspaces; subspace g is scaled by the
    softmax of ``logits[:, g]`` over all H·W positions and added to itself, ``x · a + x``.

    Args:
        x: [B, C, H, W], C divisible by G.
        logits: [B, G, H, W], one attention map per subspace (ULSAM: ReLU(BN(pointwise conv))). Differentiable.

    Returns:
        [B, C, H, W], the dtype of x.
    """
    op = "subspace_attention"
    check_float(op, "x", x)
    check_rank(op, "x", x, "BCHW")
    check_float(op, "logits", logits)
    check_rank(op, "logits", logits, "BGHW")
    check_same(op, "x", x, "logits", logits)
    _check_nonempty(op, x)
    B, C, H, W = x.shape
    G = logits.shape[1]
    if (logits.shape[0], logits.shape[2], logits.shape[3]) != (B, H, W) or G == 0 or C % G:
        raise ValueError(f"{op}: `logits` must have shape [B, G, H, W] = [{B}, G, {H}, {W}] with G dividing "
                         f"C={C}, got {shape_str(logits.shape)}")
    return _SUBSPACE(x, logits)


def _check_nonempty(op: str, x: torch.Tensor) -> None:
    if x.numel() == 0:
        raise ValueError(f"{op}: `x` must not be empty, got shape {shape_str(x.shape)}")


# The formulas are the fastest plain-PyTorch paths (in the input dtype), so torch and reference are the same.
# The fused kernels take contiguous maps and return contiguous results.

_ELA_POOL = Op("ela_pool", fused, reference=ela_pool_reference, torch=ela_pool_reference,
               unsupported=_unsupported, outputs=2)


@_ELA_POOL.forward
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return fused._ela_pool_forward(x)


@_ELA_POOL.fake
def _(x):
    B, C, H, W = x.shape
    return x.new_empty((B, C, H)), x.new_empty((B, C, W))


@_ELA_POOL.backward
def _(dx_h: Tensor, dx_w: Tensor) -> Tensor:
    return fused._ela_pool_backward(dx_h, dx_w)


@_ELA_POOL.backward_fake
def _(dx_h, dx_w):
    return dx_h.new_empty((*dx_h.shape, dx_w.shape[-1]))


@_ELA_POOL.grads(inputs=False)  # the backward needs only the gradients' shapes
def _(inputs, outputs, grads, needs):
    return (_ELA_POOL.backward_op(*grads),)


_ELA_GATE = Op("ela_gate", fused, reference=ela_gate_reference, torch=ela_gate_reference,
               unsupported=_unsupported)


@_ELA_GATE.forward
def _(x: Tensor, a_h: Tensor, a_w: Tensor) -> Tensor:
    return fused._ela_gate_forward(x, a_h, a_w)


@_ELA_GATE.fake
def _(x, a_h, a_w):
    return x.new_empty(x.shape)


@_ELA_GATE.backward
def _(x: Tensor, a_h: Tensor, a_w: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return fused._ela_gate_backward(x, a_h, a_w, dy)


@_ELA_GATE.backward_fake
def _(x, a_h, a_w, dy):
    return x.new_empty(x.shape), a_h.new_empty(a_h.shape), a_w.new_empty(a_w.shape)


@_ELA_GATE.grads()
def _(inputs, outputs, grads, needs):
    return _ELA_GATE.backward_op(*inputs, grads[0])


_SUBSPACE = Op("subspace_attention", fused, reference=subspace_attention_reference,
               torch=subspace_attention_reference, unsupported=_unsupported)


@_SUBSPACE.forward
def _(x: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """y and the log-sum-exp of each (image, subspace) map, [B·G] fp32."""
    return fused._subspace_forward(x, logits)


@_SUBSPACE.fake
def _(x, logits):
    return x.new_empty(x.shape), x.new_empty(logits.shape[0] * logits.shape[1], dtype=torch.float32)


@_SUBSPACE.backward
def _(x: Tensor, logits: Tensor, lse: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    return fused._subspace_backward(x, logits, lse, dy)


@_SUBSPACE.backward_fake
def _(x, logits, lse, dy):
    return x.new_empty(x.shape), logits.new_empty(logits.shape)


@_SUBSPACE.grads(saved=(1,))
def _(inputs, outputs, grads, needs):
    return _SUBSPACE.backward_op(*inputs, *outputs, grads[0])
