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

from .._checks import check_float, check_rank, check_same, shape_str
from ..dispatch import select_backend
from .reference import ela_gate_reference, ela_pool_reference, subspace_attention_reference

try:
    from . import fused
except ImportError:  # no triton on this platform: the torch and reference paths remain
    fused = None

__all__ = ["ela_pool", "ela_gate", "subspace_attention"]


def _backend(op: str, x: torch.Tensor) -> str:
    unsupported = fused.unsupported(x) if fused is not None else "needs triton"
    backend = select_backend(op, x, triton_supported=unsupported is None)
    if backend == "triton" and unsupported is not None:
        raise ValueError(f"{op}: the triton backend {unsupported}")
    return backend


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
    if _backend(op, x) == "triton":
        return fused.ela_pool_fused(x)
    return ela_pool_reference(x)


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
    if _backend(op, x) == "triton":
        return fused.ela_gate_fused(x, a_h, a_w)
    return ela_gate_reference(x, a_h, a_w)


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
    if _backend(op, x) == "triton":
        return fused.subspace_attention_fused(x, logits)
    return subspace_attention_reference(x, logits)


def _check_nonempty(op: str, x: torch.Tensor) -> None:
    if x.numel() == 0:
        raise ValueError(f"{op}: `x` must not be empty, got shape {shape_str(x.shape)}")
