"""Fused Triton window attention (work in progress in this session)."""
import torch

MAX_N, MAX_D = 256, 128


def unsupported(q: torch.Tensor) -> str | None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"takes float16, bfloat16 or float32 `q`, got {q.dtype}"
    if q.shape[-1] > MAX_D:
        return f"supports a head dim D <= {MAX_D}, got `q` with D={q.shape[-1]}"
    if q.shape[-2] > MAX_N:
        return f"supports windows of N <= {MAX_N} tokens, got `q` with N={q.shape[-2]}"
    return None


def window_attention_fused(q, k, v, bias, mask, scale):
    raise NotImplementedError
