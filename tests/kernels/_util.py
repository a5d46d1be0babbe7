"""Helpers for checking a fused kernel against its reference."""
from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_within_precision(name: str, fused: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor,
                            dtype: torch.dtype) -> None:
    """FlashAttention's rule: the fused result is at most twice as far from the fp64 result as the plain PyTorch
    computation done entirely in the same low precision `dtype`, plus twice the error of merely rounding the
    exact result to `dtype` at its own magnitude (FA's ``2 * (ref + 0.3 - 0.3 - ref)`` floor)."""
    e = exact.double()
    floor = 2 * ((e + 0.3).to(dtype).double() - 0.3 - e).abs().max().item()
    bound = 2 * max_err(same_dtype, exact) + floor
    err = max_err(fused, exact)
    assert err <= bound, f"{name}: error {err:.3g} exceeds {bound:.3g} ({dtype})"


def past_int32_batch(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, dim: int = 0) -> torch.Tensor:
    """Random values of ``shape`` in a view whose stride along ``dim`` (the batch by default; shape[dim] >= 3)
    is 2**30 + 2**20 elements, so the offset of index 2 along it (2 · stride) passes 2**31 and wraps in int32
    arithmetic. The other dims are laid out contiguously. The storage comes from ``torch.empty``, which the OS
    commits lazily: only the elements written here cost memory."""
    assert shape[dim] >= 3
    rest = shape[:dim] + shape[dim + 1:]
    stride = 2**30 + 2**20
    strides = list(torch.empty(rest).stride())
    strides.insert(dim, stride)
    storage = torch.empty((shape[dim] - 1) * stride + torch.Size(rest).numel(), dtype=dtype)
    view = storage.as_strided(shape, strides)
    view.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype))
    return view
