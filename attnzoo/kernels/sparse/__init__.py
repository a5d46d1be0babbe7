"""Instance-dependent sparse attention (Sparsifiner, Wei et al., CVPR 2023): each query attends only to the K
keys it was given, out of N.

    out_i = Σ_{j ∈ S_i} softmax_j(scale · q_i · k_j) v_j,      S_i = index[i], |S_i| = K         (one head)

``reference.py`` holds the readable formula (dense logits, the dropped keys masked) and the SDPA path;
``fused.py`` the Triton forward and backward: FlashAttention on the tensor cores with the kept pairs as a bit
mask (1 bit per query-key pair instead of SDPA's dense boolean mask); the work is that of dense attention.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_float, check_rank, check_same, shape_str
from .._op import Op, fused_module
from .reference import sparse_attention_reference, sparse_attention_sdpa

fused = fused_module(__name__)

__all__ = ["sparse_attention"]

OP = "sparse_attention"


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of each query over its own subset of the keys.

    Args:
        q: [B, H, M, D] queries.
        k, v: [B, H, N, D] keys and values (M may differ from N, e.g. the patch queries of a ViT without its
            class token). Any strides.
        index: [B, H, M, K] integer (int32 or int64) indices into the N keys, the keys query i attends to,
            distinct within a row (as ``torch.topk`` gives them; a repeated index counts once). 1 ≤ K ≤ N;
            K = N with every key is dense attention.
        scale: logit scale, default D ** -0.5.

    Returns:
        [B, H, M, D], the dtype of q. Differentiable in q, k and v (not in ``index``).
    """
    _check(q, k, v, index, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)

    return _OP(q, k, v, index, scale)


_OP = Op(OP, fused, reference=sparse_attention_reference, torch=sparse_attention_sdpa,
         unsupported=lambda q, *_: fused.unsupported(q))


@_OP.forward
def _forward(q: Tensor, k: Tensor, v: Tensor, index: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The output and the natural log-sum-exp of each row, [B·H, M] fp32."""
    return fused._forward(q, k, v, index, scale, fused._Launch(q, index))


@_OP.fake
def _(q, k, v, index, scale):
    B, H, M, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B * H, M), dtype=torch.float32)


@_OP.backward
def _backward(d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, index: Tensor, out: Tensor, lse: Tensor,
              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return fused._backward(q, k, v, index, out, lse, d_out, scale, fused._Launch(q, index))


@_OP.backward_fake
def _(d_out, q, k, v, index, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@_OP.grads(saved=(0, 1))
def _(inputs, outputs, grads, needs):
    q, k, v, index, scale = inputs
    return *_OP.backward_op(grads[0], q, k, v, index, *outputs, scale), None, None


def _check(q, k, v, index, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(OP, name, t)
        check_rank(OP, name, t, "BHND")
    for name, t in (("k", k), ("v", v)):
        check_same(OP, "q", q, name, t)
    B, H, M, D = q.shape
    N = k.shape[2]
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"{OP}: `k` and `v` must be [B, H, N, D] = [{B}, {H}, N, {D}] like `q` "
                         f"{shape_str(q.shape)}, got {shape_str(k.shape)} and {shape_str(v.shape)}")
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{OP}: `index` must be an int32 or int64 tensor of key indices, got "
                         f"{getattr(index, 'dtype', type(index).__name__)}")
    if index.device != q.device:
        raise ValueError(f"{OP}: `index` is on {index.device} but `q` is on {q.device}")
    if index.dim() != 4 or index.shape[:3] != (B, H, M) or not 1 <= index.shape[3] <= N:
        raise ValueError(f"{OP}: `index` must be [B, H, M, K] = [{B}, {H}, {M}, K] with 1 <= K <= N = {N}, got "
                         f"{shape_str(index.shape)}")
    if q.numel() == 0 or N == 0:
        raise ValueError(f"{OP}: `q` and `k` must not be empty, got {shape_str(q.shape)} and {shape_str(k.shape)}")
    # a range check reads the indices back: done where that costs no GPU sync and breaks no compiled graph
    if not index.is_cuda and not torch.compiler.is_compiling():
        lo, hi = index.min().item(), index.max().item()
        if lo < 0 or hi >= N:
            raise ValueError(f"{OP}: `index` must hold key indices in [0, {N}), got values in [{lo}, {hi}]")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"{OP}: `scale` must be a Python number or None, got {type(scale).__name__}")
