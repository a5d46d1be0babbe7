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
