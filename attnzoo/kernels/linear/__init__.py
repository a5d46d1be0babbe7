"""Non-causal linear attention as L²ViT and RALA (RAVLT) use it, per head over all N tokens of an image:

    φ = ReLU (L²ViT) or ELU + 1 (RALA)
    k'_n = α_n φ(k_n),   α = N · softmax_n(s · mean_m φ(q_m) · φ(k_n))      (RALA's query-aware key weights;
                                                                          α ≡ 1 without them)
    den_n = φ(q_n) · Σ_m k'_m + N·eps,  optionally clamped below at clamp_min   (L²ViT: clamp_min = 100)
    out_n = ρ(φ(q_n)) · Σ_m ρ(k'_m)ᵀ v_m / den_n                              (ρ: RoPE on q and k, or none)

The D × D state Σ ρ(k')ᵀ v makes it linear in N. ``reference.py`` holds the readable formula; ``fused.py`` the
Triton forward and backward, which never write φ(k), α or k' to memory.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_float, check_rank, check_same, shape_str
from .._op import Op, fused_module
from .reference import linear_attention_reference

fused = fused_module(__name__)

__all__ = ["linear_attention"]

OP = "linear_attention"
FEATURE_MAPS = ("relu", "elu")


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str = "relu",
    *,
    reweight_keys: bool = False,
    scale: float | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    clamp_min: float | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """Linear attention over all N tokens of each (image, head).

    Args:
        q, k, v: [B, H, N, D], before the feature map (D ≤ 128 for the fused kernel). Any strides.
        feature_map: "relu" (L²ViT) or "elu" (ELU + 1, RALA).
        reweight_keys: RALA's query-aware key weights α (see the module docstring).
        scale: s in α's softmax, default D ** -0.5. Only with ``reweight_keys``.
        rope: (cos, sin), each [N, D] with D even: RoPE on adjacent channel pairs of φ(q) and k' in the state
            and numerator (not in the normalizer), ρ(x) = x·cos + (−x₁, x₀, −x₃, x₂, …)·sin. Not differentiated.
        clamp_min: lower clamp of the normalizer (L²ViT's 100), or None.
        eps: RALA's 1e-6, added per token: den = N · (φ(q) · mean k' + eps).

    Returns:
        [B, H, N, D], the dtype of q.
    """
    _check(q, k, v, feature_map, scale, rope, clamp_min, eps, reweight_keys)
    reweight_scale = None
    if reweight_keys:
        reweight_scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    cos, sin = rope if rope is not None else (None, None)
    clamp_min = None if clamp_min is None else float(clamp_min)
    return _OP(q, k, v, feature_map, reweight_scale, cos, sin, clamp_min, float(eps))


# torch: the reference formula itself (computed in at least fp32); no faster plain-PyTorch form is written yet
_OP = Op(OP, fused, reference=linear_attention_reference, torch=linear_attention_reference,
         unsupported=lambda q, *_: fused.unsupported(q))


@_OP.forward
def _forward(q: Tensor, k: Tensor, v: Tensor, feature_map: str, reweight_scale: float | None, cos: Tensor | None,
             sin: Tensor | None, clamp_min: float | None, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The output, then the state S, Σ k', mean φ(q) and α's softmax max and sum (fp32, padded to the kernels'
    BLOCK_D)."""
    return fused._forward(q, k, v, feature_map, reweight_scale, cos, sin, clamp_min, eps)


@_OP.fake
def _(q, k, v, feature_map, reweight_scale, cos, sin, clamp_min, eps):
    B, H = q.shape[:2]
    pad = fused.residual_width(q)
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(q.shape), q.new_empty((B * H, pad, pad), **f32), q.new_empty((B * H, pad), **f32),
            q.new_empty((B * H, pad), **f32), q.new_empty((B * H, 2), **f32))


@_OP.backward
def _backward(d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, feature_map: str, reweight_scale: float | None,
              cos: Tensor | None, sin: Tensor | None, clamp_min: float | None, eps: float, state: Tensor,
              k_sum: Tensor, q_mean: Tensor, stats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return fused._backward(d_out, q, k, v, feature_map, reweight_scale, cos, sin, clamp_min, eps, state, k_sum,
                           q_mean, stats)


@_OP.backward_fake
def _(d_out, q, k, v, feature_map, reweight_scale, cos, sin, clamp_min, eps, state, k_sum, q_mean, stats):
    return tuple(q.new_empty(q.shape) for _ in range(3))


@_OP.grads(saved=(1, 2, 3, 4))
def _(inputs, outputs, grads, needs):
    return *_OP.backward_op(grads[0], *inputs, *outputs), *(None,) * 6


def _check(q, k, v, feature_map, scale, rope, clamp_min, eps, reweight_keys) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(OP, name, t)
        check_rank(OP, name, t, "BHND")
    for name, t in (("k", k), ("v", v)):
        check_same(OP, "q", q, name, t)
        if t.shape != q.shape:
            raise ValueError(f"{OP}: `{name}` must have the shape of `q` [B, H, N, D] = {shape_str(q.shape)}, "
                             f"got {shape_str(t.shape)}")
    if q.numel() == 0:
        raise ValueError(f"{OP}: `q` must not be empty, got shape {shape_str(q.shape)}")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"{OP}: `feature_map` must be one of {', '.join(FEATURE_MAPS)}, got {feature_map!r}")
    for name, value in (("scale", scale), ("clamp_min", clamp_min), ("eps", eps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{OP}: `{name}` must be a Python number, got {type(value).__name__}")
    if scale is not None and not reweight_keys:
        raise ValueError(f"{OP}: `scale` only applies with `reweight_keys=True`")
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise ValueError(f"{OP}: `rope` must be a (cos, sin) pair, got {type(rope).__name__}")
        N, D = q.shape[-2:]
        if D % 2:
            raise ValueError(f"{OP}: `rope` rotates channel pairs and needs an even head dim D, got D={D}")
        for name, t in zip(("cos", "sin"), rope, strict=True):
            check_float(OP, f"rope {name}", t)
            if t.shape != (N, D):
                raise ValueError(f"{OP}: `rope` {name} must be [N, D] = {shape_str((N, D))}, got "
                                 f"{shape_str(t.shape)}")
            if t.device != q.device:
                raise ValueError(f"{OP}: `rope` {name} is on {t.device} but `q` is on {q.device}")
