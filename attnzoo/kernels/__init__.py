"""Attention ops: each a readable PyTorch reference beside a fused Triton forward and backward, chosen by
:mod:`attnzoo.kernels.dispatch`; the fused paths are registered as ``torch.ops.attnzoo.<op>``
(:mod:`attnzoo.kernels._op`)."""
from .channel import channel_attention
from .dispatch import BACKENDS, forced_backend, trace, use_backend
from .gating import ela_gate, ela_pool, subspace_attention
from .halo import halo_attention
from .linear import linear_attention
from .rollout import rollout_step
from .sparse import sparse_attention
from .window import window_attention

__all__ = [
    "BACKENDS", "channel_attention", "ela_gate", "ela_pool", "forced_backend", "halo_attention",
    "linear_attention", "rollout_step", "sparse_attention", "subspace_attention", "trace", "use_backend",
    "window_attention",
]
