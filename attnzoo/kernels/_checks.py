"""Argument checks shared by the ops: each failure is a ValueError naming the op, the argument and what was
expected, raised before any backend runs."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: `{name}` must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                         f"got {t.dtype}")


def check_same(op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    """`t` has the dtype and device of `ref`."""
    if t.dtype != ref.dtype:
        raise ValueError(f"{op}: `{name}` has dtype {t.dtype} but `{ref_name}` has {ref.dtype}; they must match")
    if t.device != ref.device:
        raise ValueError(f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}; they must match")


def shape_str(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_rank(op: str, name: str, t: torch.Tensor, dims: str) -> None:
    """`t` has as many dimensions as the letters of `dims` (e.g. "BHND")."""
    if t.dim() != len(dims):
        raise ValueError(f"{op}: `{name}` must be {len(dims)}-D [{', '.join(dims)}], got shape {shape_str(t.shape)}")
