"""halo_attention: the fused Triton path (under the interpreter on CPU) and the SDPA path against the
reference, forward and all gradients; the reference against autograd's numerical gradients; argument
checks."""
from __future__ import annotations

import pytest
import torch

from attnzoo.kernels import halo_attention, trace, use_backend
from attnzoo.kernels.halo.reference import halo_attention_reference

BLOCK = 4
# the fused kernels run on CUDA when there is a GPU, else on CPU tensors through Triton's interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(halo: int, stride: int, dtype: torch.dtype, seed: int = 0, dqk: int = 24, dv: int = 16):
    """B=1, 2 heads, an 8×8 map (2×2 blocks of 4), queries strided by `stride`. q, k, v are the non-contiguous
    views a model takes of its 1×1-conv outputs: channels-last permutes, k and v split from one kv tensor."""
    g = torch.Generator().manual_seed(seed)
    B, N, H, W = 1, 2, 8, 8
    win = BLOCK + 2 * halo
    q = torch.randn(B, N, dqk, H // stride, W // stride, generator=g).to(dtype).permute(0, 1, 3, 4, 2)
    kv = torch.randn(B, N, dqk + dv, H, W, generator=g).to(dtype).permute(0, 1, 3, 4, 2)
    k, v = kv[..., :dqk], kv[..., dqk:]
    rel = [(0.3 * torch.randn(2 * win - 1, dqk, generator=g)).to(dtype) for _ in range(2)]
    grad_out = torch.randn(B, N, H // stride, W // stride, dv, generator=g).to(dtype)
    return [t.to(DEVICE).detach().requires_grad_() for t in (q, k, v, *rel)], grad_out.to(DEVICE)


def run(backend: str, inputs, grad_out, halo: int, scale_pos_embed: bool):
    """Output and the gradients of q, k, v, height_rel, width_rel, and the backends the call took."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    with use_backend(backend), trace() as calls:
        out = halo_attention(*inputs, BLOCK, halo, scale_pos_embed=scale_pos_embed)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return [out, *grads], calls


CASES = [(2, 1, False), (3, 1, True), (3, 2, False)]  # (halo, query stride, scale_pos_embed)
NAMES = ["out", "dq", "dk", "dv", "dheight_rel", "dwidth_rel"]


@pytest.mark.parametrize("halo,stride,scale_pos_embed", CASES)
def test_fused_matches_reference_fp32(halo, stride, scale_pos_embed):
    inputs, grad_out = make_inputs(halo, stride, torch.float32)
    ref, _ = run("reference", inputs, grad_out, halo, scale_pos_embed)
    got, calls = run("triton", inputs, grad_out, halo, scale_pos_embed)
    assert calls == [("halo_attention", "triton")]
    for name, a, b in zip(NAMES, got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("halo,stride,scale_pos_embed", CASES[:2])
def test_fused_matches_reference_fp16(halo, stride, scale_pos_embed):
    """fp16 inputs against the reference on the same (fp16-rounded) values computed in fp32: within fp16's
    rounding of the outputs and of the fp16 operands fed to the products."""
    inputs, grad_out = make_inputs(halo, stride, torch.float16)
    ref, _ = run("reference", [t.float() for t in inputs], grad_out.float(), halo, scale_pos_embed)
    got, calls = run("triton", inputs, grad_out, halo, scale_pos_embed)
    assert calls == [("halo_attention", "triton")]
    for name, a, b in zip(NAMES, got, ref, strict=True):
        assert a.dtype == torch.float16
        scale = b.abs().max().item()
        torch.testing.assert_close(a.float(), b, atol=4e-3 * scale, rtol=1e-2,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("halo,stride,scale_pos_embed", CASES)
def test_torch_path_matches_reference(halo, stride, scale_pos_embed):
    inputs, grad_out = make_inputs(halo, stride, torch.float32)
    ref, _ = run("reference", inputs, grad_out, halo, scale_pos_embed)
    got, calls = run("torch", inputs, grad_out, halo, scale_pos_embed)
    assert calls == [("halo_attention", "torch")]
    for name, a, b in zip(NAMES, got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("scale_pos_embed", [False, True])
def test_reference_gradcheck(scale_pos_embed):
    """The reference's gradients, through unfold and the relative indexing, against finite differences."""
    g = torch.Generator().manual_seed(0)
    block, halo = 2, 1
    win = block + 2 * halo
    shapes = [(1, 1, 4, 4, 3), (1, 1, 4, 4, 3), (1, 1, 4, 4, 2), (2 * win - 1, 3), (2 * win - 1, 3)]
    inputs = [torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_() for s in shapes]
    fn = lambda *a: halo_attention_reference(*a, block, halo, 0.7, scale_pos_embed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "q": a["q"].int()}, "`q` must be a floating-point tensor"),
    (lambda a: {**a, "k": a["k"].double()}, "`k` has dtype torch.float64"),
    (lambda a: {**a, "v": a["v"][..., :4, :]}, "`v` must be \\[B, N, H, W, Dv\\]"),
    (lambda a: {**a, "q": a["q"][..., :7]}, "`q` must be \\[B, N, Hq, Wq, Dqk\\]"),
    (lambda a: {**a, "q": a["q"][:, :, :3]}, "`q` must hold square query blocks"),
    (lambda a: {**a, "k": a["k"][:, :, :6], "v": a["v"][:, :, :6]}, "must be a multiple of block_size=4"),
    (lambda a: {**a, "height_rel": a["height_rel"][:-1]}, "`height_rel` must be"),
    (lambda a: {**a, "block_size": 0}, "`block_size` must be an int >= 1"),
    (lambda a: {**a, "halo_size": 1.5}, "`halo_size` must be an int >= 0"),
    (lambda a: {**a, "q": a["q"][0]}, "`q` must be 5-D"),
])
def test_bad_input_raises(change, match):
    inputs, _ = make_inputs(halo=2, stride=1, dtype=torch.float32)
    args = dict(zip(["q", "k", "v", "height_rel", "width_rel"], (t.detach() for t in inputs), strict=True),
                block_size=BLOCK, halo_size=2)
    with pytest.raises(ValueError, match="halo_attention: .*" + match):
        halo_attention(**change(args))


def test_triton_rejects_too_large_window():
    inputs, _ = make_inputs(halo=7, stride=1, dtype=torch.float32, dqk=16)
    with use_backend("triton"), pytest.raises(ValueError, match="halo_attention: the triton backend supports "
                                                                 "windows block_size \\+ 2·halo_size <= 16"):
        halo_attention(*inputs, BLOCK, 7)
