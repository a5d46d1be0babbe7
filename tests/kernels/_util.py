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


def past_int32_batch(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random values of ``shape`` [B >= 3, ...] in a view whose batch stride is 2**30 + 2**20 elements, so the
    offset of image 2 (b · stride) passes 2**31 and wraps in int32 arithmetic. The storage comes from
    ``torch.empty``, which the OS commits lazily: only the B images written here cost memory."""
    assert shape[0] >= 3
    inner = torch.Size(shape[1:]).numel()
    stride = 2**30 + 2**20
    storage = torch.empty((shape[0] - 1) * stride + inner, dtype=dtype)
    view = storage.as_strided(shape, (stride, *torch.empty(shape[1:]).stride()))
    view.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype))
    return view
