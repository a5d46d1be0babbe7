"""Triton helpers shared by the fused kernels."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import interpreting


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
