"""Helpers for checking a fused kernel against its reference."""
from __future__ import annotations

import torch

# absolute error floor per dtype on O(1) values: rounding of the output alone
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_within_precision(name: str, fused: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor,
                            dtype: torch.dtype) -> None:
    """FlashAttention's rule: the fused result is at most twice as far from the fp64 result as the plain PyTorch
    computation done entirely in the same low precision `dtype`, plus a rounding floor."""
    bound = 2 * max_err(same_dtype, exact) + FLOOR[dtype]
    err = max_err(fused, exact)
    assert err <= bound, f"{name}: error {err:.3g} exceeds {bound:.3g} ({dtype})"
