"""halo_attention: the fused Triton path (under the interpreter on CPU) and the SDPA path against the
reference, forward and all gradients; the reference against autograd's numerical gradients; argument
checks.

The interpreter runs the launch configurations of an H100 (sm_90a, the `sm90` fixture), from the same
`launch_config` a GPU uses, at the block and window sizes of the halo models."""
from __future__ import annotations

import pytest
import torch

from attnzoo.kernels import halo_attention, trace, use_backend
from attnzoo.kernels._triton import SM90, use_target
from attnzoo.kernels.halo import fused
from attnzoo.kernels.halo.reference import halo_attention_reference

BLOCK = 4
# the fused kernels run on CUDA when there is a GPU, else on CPU tensors through Triton's interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def sm90():
    with use_target(SM90):
        yield


def make_inputs(halo: int, stride: int, dtype: torch.dtype, seed: int = 0, dqk: int = 24, dv: int = 16,
                block: int = BLOCK, size: int = 8, heads: int = 2):
    """B=1, `heads` heads, a size×size map (blocks of `block`), queries strided by `stride`. q, k, v are the
    non-contiguous views a model takes of its 1×1-conv outputs: channels-last permutes, k and v split from one
    kv tensor."""
    g = torch.Generator().manual_seed(seed)
    B, N, H, W = 1, heads, size, size
    win = block + 2 * halo
    q = torch.randn(B, N, dqk, H // stride, W // stride, generator=g).to(dtype).permute(0, 1, 3, 4, 2)
    kv = torch.randn(B, N, dqk + dv, H, W, generator=g).to(dtype).permute(0, 1, 3, 4, 2)
    k, v = kv[..., :dqk], kv[..., dqk:]
    rel = [(0.3 * torch.randn(2 * win - 1, dqk, generator=g)).to(dtype) for _ in range(2)]
    grad_out = torch.randn(B, N, H // stride, W // stride, dv, generator=g).to(dtype)
    return [t.to(DEVICE).detach().requires_grad_() for t in (q, k, v, *rel)], grad_out.to(DEVICE)


def run(backend: str, inputs, grad_out, halo: int, scale_pos_embed: bool, block: int = BLOCK):
    """Output and the gradients of q, k, v, height_rel, width_rel, and the backends the call took."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    with use_backend(backend), trace() as calls:
        out = halo_attention(*inputs, block, halo, scale_pos_embed=scale_pos_embed)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return [out, *grads], calls


CASES = [(2, 1, False), (3, 1, True), (3, 2, False)]  # (halo, query stride, scale_pos_embed), blocks of 4
NAMES = ["out", "dq", "dk", "dv", "dheight_rel", "dwidth_rel"]
# (block, halo, query stride, scale_pos_embed, Dqk, Dv, map size, heads): the models' block and window sizes
# (one head, 2×2 blocks), ragged head dims, and small blocks whose halo reaches past the neighbouring block
FUSED = {
    "b8h2": (8, 2, 1, False, 16, 24, 16, 1),    # halonet26t / eca_halonext26ts: 64 queries, 144 keys
    "b8h3s2": (8, 3, 2, True, 24, 16, 16, 1),   # a strided halo layer: 16 queries (one warp), 196 keys
    "b7h2": (7, 2, 1, False, 36, 40, 14, 1),    # haloregnetz_b: 49 queries in a 64-row tile, 121 keys
    "b10h1": (10, 1, 1, False, 16, 16, 10, 1),  # 100 queries: two programs for the one block
    "b4h3": (4, 3, 1, True, 24, 16, 8, 1),      # the halo (3) is most of the next block (4)
    "b4h3s2": (4, 3, 2, False, 24, 16, 8, 2),   # 4 queries in a 16-row tile
    # the halo models' head dims (64): the fp32 products are summed over slices of their inner dimension
    "b8h2d64": (8, 2, 1, False, 64, 56, 16, 1),
    "b8h2s2d64": (8, 2, 2, True, 64, 64, 16, 1),  # a strided layer's 16 queries on four fp32 warps
}


def fused_case(name: str, dtype: torch.dtype):
    block, halo, stride, spe, dqk, dv, size, heads = FUSED[name]
    inputs, grad_out = make_inputs(halo, stride, dtype, dqk=dqk, dv=dv, block=block, size=size, heads=heads)
    return inputs, grad_out, dict(halo=halo, scale_pos_embed=spe, block=block)


@pytest.mark.parametrize("case", ["b8h2", "b4h3", "b8h2d64", "b8h2s2d64"])
def test_fused_matches_reference_fp32(case):
    """fp32 against the reference computed in float64 on the same values: within a few times fp32's rounding
    (about 5e-7 of each gradient's largest value, as the fp32 reference's own error; tf32 products would be
    off by ~1e-3)."""
    inputs, grad_out, kw = fused_case(case, torch.float32)
    ref, _ = run("reference", [t.double() for t in inputs], grad_out.double(), **kw)
    got, calls = run("triton", inputs, grad_out, **kw)
    assert calls == [("halo_attention", "triton")]
    for name, a, b in zip(NAMES, got, ref, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=2e-6 * b.abs().max().item(), rtol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def check_16bit(got, ref, dtype, atol, rtol):
    for name, a, b in zip(NAMES, got, ref, strict=True):
        assert a.dtype == dtype
        scale = b.abs().max().item()
        torch.testing.assert_close(a.float(), b, atol=atol * scale, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case", ["b8h3s2", "b7h2", "b10h1", "b4h3s2"])
def test_fused_matches_reference_fp16(case):
    """fp16 inputs against the reference on the same (fp16-rounded) values computed in fp32: within fp16's
    rounding of the outputs and of the fp16 operands fed to the products. bf16 runs the same tiles (asserted),
    so this also checks the bf16 configuration's tiling, which the interpreter's wrong bf16 `tl.dot` cannot."""
    block, halo, stride, _, dqk, dv, size, _ = FUSED[case]
    bq = size // stride // (size // block)
    shapes = (bq, block + 2 * halo, dqk, dv)
    assert (fused.launch_config(*shapes, torch.bfloat16, SM90) == fused.launch_config(*shapes, torch.float16, SM90))
    inputs, grad_out, kw = fused_case(case, torch.float16)
    ref, _ = run("reference", [t.float() for t in inputs], grad_out.float(), **kw)
    got, calls = run("triton", inputs, grad_out, **kw)
    assert calls == [("halo_attention", "triton")]
    check_16bit(got, ref, torch.float16, atol=4e-3, rtol=1e-2)


def test_fused_matches_reference_bf16():
    """bf16 loads, stores and the hi/lo split of the relative logits (the products go through the exact fp32
    dot under the interpreter, see `fp32_dot`)."""
    inputs, grad_out, kw = fused_case("b4h3", torch.bfloat16)
    ref, _ = run("reference", [t.float() for t in inputs], grad_out.float(), **kw)
    got, _ = run("triton", inputs, grad_out, **kw)
    check_16bit(got, ref, torch.bfloat16, atol=2e-2, rtol=5e-2)


def test_fused_offsets_past_2_31():
    """q, k, v views whose image stride puts the second image 2³¹ − 256 elements in (a 4 GiB fp16 storage from
    torch.empty, of which only what the kernels and the reference touch is ever committed): every offset a
    program id meets must be int64, or the second image's loads and stores wrap."""
    block, halo, dqk, dv, size, N = 8, 2, 16, 16, 8, 1
    channels = 2 * dqk + dv
    stride_b = 2**31 - 256
    storage = torch.empty(stride_b + N * size * size * channels, dtype=torch.float16)
    x = storage.as_strided((2, N, size, size, channels),
                           (stride_b, size * size * channels, size * channels, channels, 1))
    g = torch.Generator().manual_seed(0)
    x.copy_(torch.randn(x.shape, generator=g))
    q, k, v = x[..., :dqk], x[..., dqk:2 * dqk], x[..., 2 * dqk:]
    rel = [(0.3 * torch.randn(2 * (block + 2 * halo) - 1, dqk, generator=g)).half() for _ in range(2)]
    inputs = [t.detach().requires_grad_() for t in (q, k, v, *rel)]
    grad_out = torch.randn(2, N, size, size, dv, generator=g).half()
    ref, _ = run("reference", [t.float() for t in inputs], grad_out.float(), halo, False, block)
    got, _ = run("triton", inputs, grad_out, halo, False, block)
    check_16bit(got, ref, torch.float16, atol=4e-3, rtol=1e-2)


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
