"""Triton helpers shared by the fused kernels: the GPU target a launch is configured for, the fp32-exact dot,
the input check, and constants.

The launch configuration of every kernel (block sizes, warps, the number of programs) is one function of the
shapes, the dtype and the :class:`Target`. On a GPU the target is that GPU; on the CPU (Triton's interpreter, or
a shape capture on the meta device) it is :data:`SM90` unless :func:`use_target` says otherwise, so the CPU tests
run exactly the configurations an H100 would launch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from .dispatch import interpreting

LOG2E = 1.4426950408889634  # log2(e): the kernels work in base 2 (exp2), as FlashAttention's do


@dataclasses.dataclass(frozen=True)
class Target:
    """What a launch configuration depends on: the compute capability (80 = A100, 90 = H100), the number of
    SMs (to size grids that must fill the GPU) and the shared memory one program may use, in bytes."""

    arch: int
    num_sms: int
    max_shared: int

    @property
    def name(self) -> str:
        return f"sm_{self.arch}a" if self.arch >= 90 else f"sm_{self.arch}"


SM80 = Target(arch=80, num_sms=108, max_shared=166_912)   # A100: 163 KiB of opt-in shared memory per block
SM90 = Target(arch=90, num_sms=132, max_shared=232_448)   # H100 SXM: 227 KiB
TARGETS = (SM80, SM90)

_forced_target: Target | None = None


@contextlib.contextmanager
def use_target(target: Target) -> Iterator[None]:
    """Configure every launch inside the block for ``target`` (tests and the ahead-of-time compile check)."""
    global _forced_target
    previous, _forced_target = _forced_target, target
    try:
        yield
    finally:
        _forced_target = previous


@functools.cache
def _cuda_target(device_index: int) -> Target:
    props = torch.cuda.get_device_properties(device_index)
    shared = getattr(props, "shared_memory_per_block_optin", SM90.max_shared)
    return Target(arch=props.major * 10 + props.minor, num_sms=props.multi_processor_count, max_shared=shared)


def target_of(t: torch.Tensor) -> Target:
    """The target a launch on tensor ``t`` is configured for: the forced one, else ``t``'s GPU, else SM90."""
    if _forced_target is not None:
        return _forced_target
    if t.is_cuda:
        return _cuda_target(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return SM90


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
def dot(a, b, FP32: tl.constexpr, acc=None, K_CHUNK: tl.constexpr = 0):
    """acc + a @ b accumulated in fp32 (acc, fp32, optional). With FP32 both operands go in as fp32 with exact
    (ieee) products; otherwise as the caller passes them (fp16/bf16, or fp32 in tf32).

    K_CHUNK (a power of two ≥ 16, FP32 only): the exact product summed over slices of K_CHUNK of the inner
    dimension, one after another. Triton's fp32 dot runs on the FMA units with each thread's rows of ``a`` and
    columns of ``b`` held in registers over the whole inner dimension, (rows + columns)·K values per thread:
    at K = 64 that alone can pass the 255 registers a thread has. The slices are K's even and odd halves,
    halved again until they are K_CHUNK wide."""
    if FP32 and K_CHUNK != 0 and a.shape[1] > K_CHUNK:
        M: tl.constexpr = a.shape[0]
        K: tl.constexpr = a.shape[1]
        N: tl.constexpr = b.shape[1]
        a0, a1 = tl.split(tl.reshape(a, [M, K // 2, 2]))
        b0, b1 = tl.split(tl.permute(tl.reshape(b, [K // 2, 2, N]), [0, 2, 1]))
        return dot(a1, b1, FP32, dot(a0, b0, FP32, acc, K_CHUNK), K_CHUNK)
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def load_rows(ptr, rows, cols, R, C, s_row, s_col):
    """The [len(rows), len(cols)] tile of an [R, C] matrix at ``ptr`` (strides ``s_row``, ``s_col``), 0 outside.
    The row offsets are int64: rows · s_row passes 2³¹ in a view whose row stride is large."""
    return tl.load(ptr + rows.to(tl.int64)[:, None] * s_row + cols[None, :] * s_col,
                   mask=(rows < R)[:, None] & (cols < C)[None, :], other=0.0)
