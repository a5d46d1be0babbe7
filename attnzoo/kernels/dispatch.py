"""The one place that chooses how an attention op runs.

Backends:
    ``triton``     the fused Triton kernels (forward and backward). Chosen automatically for CUDA tensors when
                   triton is importable and the op supports the shape; on CPU tensors it runs only under
                   Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is first imported).
    ``torch``      the fastest plain-PyTorch path, e.g. ``F.scaled_dot_product_attention`` where it computes
                   the same thing. The automatic choice everywhere else. For ``linear_attention`` and
                   ``rollout_step`` it is the reference formula itself (computed in at least fp32; no faster
                   plain-PyTorch form is written: fp16 would overflow linear attention's normaliser), and for
                   ``halo_attention`` on the CPU the eager formula (the reference), which beats SDPA there.
    ``reference``  the readable formula each op is tested against.

How an op declares its backends and registers its fused path as ``torch.ops.attnzoo.<op>``:
:mod:`attnzoo.kernels._op`.

Forcing one: the environment variable ``ATTNZOO_BACKEND=torch|triton|reference``, or the context manager
:func:`use_backend`, which takes precedence over the variable::

    with attnzoo.kernels.use_backend("reference"):
        y = model(x)

:func:`trace` records which backend each op call took, so a test or a user can check what really ran.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

__all__ = ["BACKENDS", "use_backend", "forced_backend", "select_backend", "triton_available", "trace"]

BACKENDS = ("torch", "triton", "reference")
ENV_VAR = "ATTNZOO_BACKEND"

# Plain module globals rather than context variables: torch.compile guards on them without a graph break.
_forced: str | None = None
_trace: list[tuple[str, str]] | None = None


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not an attnzoo backend; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every attnzoo op inside the block onto backend ``name`` (overrides ``ATTNZOO_BACKEND``)."""
    global _forced
    previous, _forced = _forced, _check_name(name, "use_backend")
    try:
        yield
    finally:
        _forced = previous


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``ATTNZOO_BACKEND``, or None for the automatic choice."""
    if _forced is not None:
        return _forced
    name = os.environ.get(ENV_VAR, "").strip().lower()
    return _check_name(name, ENV_VAR) if name else None


_TRITON = importlib.util.find_spec("triton") is not None  # looked up once: dynamo then reads a plain global


def triton_available() -> bool:
    return _TRITON


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_backend(op: str, *tensors: torch.Tensor, triton_supported: bool = True) -> str:
    """The backend op ``op`` runs on for these tensors.

    ``triton_supported`` is the op's own verdict on whether its fused kernel handles these shapes and dtypes;
    when it does not, the automatic choice falls back to ``torch`` and a forced ``triton`` is left for the op
    to reject with a message naming the argument.
    """
    backend = forced_backend()
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: the triton backend was requested but triton is not installed")
        if not (all(t.is_cuda for t in tensors) or interpreting()):
            raise RuntimeError(
                f"{op}: the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                f"first imported to run the kernels on the CPU; got tensors on {tensors[0].device}"
            )
    elif backend is None:
        on_cuda = all(t.is_cuda for t in tensors)
        backend = "triton" if on_cuda and triton_supported and triton_available() else "torch"
    if _trace is not None:
        _trace.append((op, backend))
    return backend


@contextlib.contextmanager
def trace() -> Iterator[list[tuple[str, str]]]:
    """Record ``(op, backend)`` for every op call inside the block::

        with trace() as calls:
            window_attention(q, k, v)
        assert calls == [("window_attention", "torch")]
    """
    global _trace
    previous, _trace = _trace, []
    try:
        yield _trace
    finally:
        _trace = previous
