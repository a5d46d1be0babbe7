"""HaloNet's blocked local attention (Vaswani et al. 2021), as timm's ``HaloAttn`` computes it.

The key/value map is cut into b×b blocks; the queries of a block attend to the (b + 2h)² neighbourhood of keys
around it (the block plus a halo of h, zero-padded at the image border), with factorized relative logits:

    out_i = Σ_j softmax_j(scale·q_i·k_j + pos_ij) v_j,
    pos_ij = q_i·height_rel[ky_j − y_i + win − 1] + q_i·width_rel[kx_j − x_i + win − 1],   win = b + 2h

((y_i, x_i) the query's place in its block, (ky_j, kx_j) the key's in the window). With ``scale_pos_embed``
the logits are ``scale·(q_i·k_j + pos_ij)`` instead.

``reference.py`` holds the readable formula and the SDPA path; ``fused.py`` the Triton forward and backward,
which gathers each neighbourhood from the key/value maps inside the kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_float, check_rank, check_same, shape_str
from .._op import Op, fused_module
from .reference import halo_attention_reference, halo_attention_sdpa

fused = fused_module(__name__)

__all__ = ["halo_attention"]

OP = "halo_attention"


def halo_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    height_rel: torch.Tensor,
    width_rel: torch.Tensor,
    block_size: int,
    halo_size: int,
    scale: float | None = None,
    scale_pos_embed: bool = False,
) -> torch.Tensor:
    """Blocked local attention with a halo and factorized relative logits.

    Args:
        q: query map [B, N, Hq, Wq, Dqk] (N heads, channels last, any strides). The queries may be strided
            (Hq = H / s): each of the (H/b)·(W/b) blocks then holds (b/s)² queries.
        k: key map [B, N, H, W, Dqk], H and W multiples of ``block_size``.
        v: value map [B, N, H, W, Dv].
        height_rel, width_rel: relative embeddings [2·win − 1, Dqk], win = block_size + 2·halo_size, shared by
            all heads (timm's ``PosEmbedRel.height_rel`` / ``width_rel``). Differentiable.
        block_size: b, the key block size; halo_size: h, the halo around it.
        scale: logit scale, default Dqk ** -0.5.
        scale_pos_embed: scale the relative logits too (timm's ``scale_pos_embed``).

    Returns:
        [B, N, Hq, Wq, Dv], the dtype of q.
    """
    _check(q, k, v, height_rel, width_rel, block_size, halo_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _OP(q, k, v, height_rel, width_rel, block_size, halo_size, scale, bool(scale_pos_embed))


def _torch(*args) -> Tensor:
    """SDPA with the relative logits as its mask on CUDA; on the CPU the eager formula (the reference), whose
    two matmuls beat SDPA there (0.8-0.9x forward on HaloNet-26t's shapes, tools/benchmark.py)."""
    return halo_attention_sdpa(*args) if args[0].is_cuda else halo_attention_reference(*args)


_OP = Op(OP, fused, reference=halo_attention_reference, torch=_torch,
         unsupported=lambda q, k, v, hr, wr, block, halo, *_: fused.unsupported(q, v, block, halo))


@_OP.forward
def _forward(q: Tensor, k: Tensor, v: Tensor, height_rel: Tensor, width_rel: Tensor, block_size: int,
             halo_size: int, scale: float, scale_pos_embed: bool) -> tuple[Tensor, Tensor]:
    """The output, then the base-2 log-sum-exp of each query's logits (fp32 [B, N, Hq, Wq])."""
    return fused._forward(q, k, v, height_rel, width_rel, block_size, halo_size, scale, scale_pos_embed)


@_OP.fake
def _(q, k, v, height_rel, width_rel, block_size, halo_size, scale, scale_pos_embed):
    B, N, Hq, Wq, _ = q.shape
    out = q.new_empty(B, N, v.shape[-1], Hq, Wq).permute(0, 1, 3, 4, 2)  # the kernel's layout
    return out, q.new_empty(B, N, Hq, Wq, dtype=torch.float32)


@_OP.backward
def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, height_rel: Tensor, width_rel: Tensor, out: Tensor,
              lse: Tensor, block_size: int, halo_size: int, scale: float,
              scale_pos_embed: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return fused._backward(do, q, k, v, height_rel, width_rel, out, lse, block_size, halo_size, scale,
                           scale_pos_embed)


@_OP.backward_fake
def _(do, q, k, v, height_rel, width_rel, out, lse, block_size, halo_size, scale, scale_pos_embed):
    return torch.empty_like(q), *(t.new_empty(t.shape) for t in (k, v, height_rel, width_rel))


@_OP.grads(saved=(0, 1))
def _(inputs, outputs, grads, needs):
    q, k, v, height_rel, width_rel, *config = inputs
    return *_OP.backward_op(grads[0], q, k, v, height_rel, width_rel, *outputs, *config), None, None, None, None


def _check(q, k, v, height_rel, width_rel, block_size, halo_size) -> None:
    for name, size, least in (("block_size", block_size, 1), ("halo_size", halo_size, 0)):
        if isinstance(size, bool) or not isinstance(size, int) or size < least:
            raise ValueError(f"{OP}: `{name}` must be an int >= {least}, got {size!r}")
    for name, t in (("q", q), ("k", k), ("v", v), ("height_rel", height_rel), ("width_rel", width_rel)):
        check_float(OP, name, t)
        if name != "q":
            check_same(OP, "q", q, name, t)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_rank(OP, name, t, "BNHWD")
    B, N, H, W, D = k.shape
    if q.shape[:2] != (B, N) or q.shape[-1] != D:
        raise ValueError(f"{OP}: `q` must be [B, N, Hq, Wq, Dqk] with the B, N and Dqk of `k` "
                         f"{shape_str(k.shape)}, got {shape_str(q.shape)}")
    if v.shape[:4] != (B, N, H, W):
        raise ValueError(f"{OP}: `v` must be [B, N, H, W, Dv] with the B, N, H, W of `k` "
                         f"{shape_str(k.shape)}, got {shape_str(v.shape)}")
    if H % block_size or W % block_size:
        raise ValueError(f"{OP}: the key map {H}x{W} of `k` must be a multiple of block_size={block_size} in "
                         "both dimensions")
    nh, nw = H // block_size, W // block_size
    Hq, Wq = q.shape[2:4]
    if Hq % nh or Wq % nw or Hq // nh != Wq // nw:
        raise ValueError(f"{OP}: `q` must hold square query blocks, one per key block ({nh}x{nw} blocks), "
                         f"i.e. Hq = {nh}·bq and Wq = {nw}·bq; got a {Hq}x{Wq} query map")
    rel = (2 * (block_size + 2 * halo_size) - 1, D)
    for name, t in (("height_rel", height_rel), ("width_rel", width_rel)):
        if tuple(t.shape) != rel:
            raise ValueError(f"{OP}: `{name}` must be [2·(block_size + 2·halo_size) − 1, Dqk] = "
                             f"{shape_str(rel)}, got {shape_str(t.shape)}")
