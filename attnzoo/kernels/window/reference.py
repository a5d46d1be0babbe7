"""Window attention in plain PyTorch: the readable reference and the SDPA path.

Both take validated arguments (see ``attnzoo.kernels.window``): q, k, v of shape [B, H, N, D]; ``bias`` of shape
[Gb, H or 1, N, N], window b taking ``bias[b % Gb]``; ``mask`` a boolean [Gm, N] key mask, True where a key
takes part, window b taking ``mask[b % Gm]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def window_attention_reference(q, k, v, bias, mask, scale: float) -> torch.Tensor:
    """softmax(scale·q kᵀ + bias, masked keys → -inf) v, computed in at least float32.

    A query whose keys are all masked attends to nothing: its output and gradients are zero.
    """
    B, H, N, _ = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    logits = (q.to(acc) * scale) @ k.to(acc).transpose(-2, -1)  # [B, H, N, N]
    if bias is not None:
        G = bias.shape[0]
        logits = (logits.view(B // G, G, H, N, N) + bias.to(acc)).view(B, H, N, N)
    if mask is not None:
        G = mask.shape[0]
        logits = logits.view(B // G, G, H, N, N).masked_fill(~mask[:, None, None, :], float("-inf")).view(B, H, N, N)
    dead = logits.amax(-1, keepdim=True) == float("-inf")  # rows with no key left
    attn = logits.masked_fill(dead, 0.0).softmax(-1).masked_fill(dead, 0.0)
    return (attn @ v.to(acc)).to(q.dtype)


def window_attention_sdpa(q, k, v, bias, mask, scale: float) -> torch.Tensor:
    """The same through ``F.scaled_dot_product_attention``.

    Bias and mask merge into one attention mask over G = lcm(Gb, Gm) windows, folded into SDPA's broadcasting
    by viewing the batch as [B/G, G·H]: window b = i·G + j then meets mask j.
    """
    if bias is None and mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    B, H, N, D = q.shape
    G = math.lcm(*(t.shape[0] for t in (bias, mask) if t is not None))
    if bias is None:
        attn_mask = mask.repeat(G // mask.shape[0], 1)[:, None, None, :]  # [G, 1, 1, N], True = attend
    else:
        attn_mask = bias.to(q.dtype).repeat(G // bias.shape[0], 1, 1, 1)
        if mask is not None:
            attn_mask = attn_mask.masked_fill(~mask.repeat(G // mask.shape[0], 1)[:, None, None, :], float("-inf"))
    if G == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    attn_mask = attn_mask.expand(G, H, *attn_mask.shape[2:]).reshape(G * H, *attn_mask.shape[2:])
    fold = lambda t: t.reshape(B // G, G * H, N, D)
    out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), attn_mask=attn_mask, scale=scale)
    return out.view(B, H, N, D)
