"""Triton helpers shared by the fused kernels."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import interpreting


def unsupported_input(t: torch.Tensor, name: str, limit: int, what: str, symbol: str) -> str | None:
    """Why a fused kernel cannot take the input ``name`` (a phrase for the op's error message), or None: the
    kernels take fp16, bf16 and fp32, and tile the last dim ``symbol`` (``what``, e.g. "a head dim") up to ``limit``."""
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"takes float16, bfloat16 or float32 `{name}`, got {t.dtype}"
    if t.shape[-1] > limit:
        return f"supports {what} {symbol} <= {limit}, got `{name}` with {symbol}={t.shape[-1]}"
    return None


def fp32_dot(dtype: torch.dtype) -> bool:
    """The `FP32` flag of :func:`dot` for inputs of `dtype`: fp32 inputs get exact products (unless torch allows
    tf32 matmuls), and bf16 goes through fp32 under Triton's interpreter, whose bf16 `tl.dot` is wrong."""
    if dtype == torch.float32:
        return not torch.backends.cuda.matmul.allow_tf32
    return dtype == torch.bfloat16 and interpreting()


@triton.jit
def dot(a, b, FP32: tl.constexpr):
    """a @ b accumulated in fp32. With FP32 both operands go in as fp32 with exact (ieee) products; otherwise
    as the caller passes them (fp16/bf16, or fp32 in tf32)."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)
