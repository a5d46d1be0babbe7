"""Every fused op compiled for the GPU this runs on (not Triton's interpreter) against the reference: outputs and
every gradient, fp32, fp16 and bf16, on the models' own shapes and layouts (the non-contiguous views of one qkv
projection, permuted conv maps, channels-last maps), and over tensors past 2³¹ elements for the offsets that could
overflow int32 (`make test-cuda`, part of `make gpu-check`).

Tolerances are FlashAttention's rule (``_util.assert_within_precision``): the fused result is at most twice as far
from the fp64 reference as the same formula run in plain PyTorch in the same dtype, plus a rounding floor.

Without a GPU the `cuda` tests skip; ``test_harness_on_cpu`` / ``test_large_harness_on_cpu`` run the same
checking code at small sizes through the interpreter, so the GPU-only tests cannot rot between GPU runs.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
from timm.models.maxxvit import window_partition

import attnzoo.kernels as kernels
from attnzoo.backbones._windows import padding_key_mask
from attnzoo.backbones.ravlt import rope_tables
from attnzoo.kernels import trace, use_backend
from attnzoo.kernels.channel.reference import channel_attention_torch
from attnzoo.kernels.gating.reference import ela_gate_reference, ela_pool_reference, subspace_attention_reference
from attnzoo.kernels.halo.reference import neighbourhoods, query_blocks, relative_logits, unblock

from ._util import assert_within_precision
from .test_linear import _low_precision_formula as linear_in_dtype
from .test_sparse import _reference_in_dtype as sparse_in_dtype

CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: the fused kernels compiled for it, not interpreted")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INT32_LIMIT = 2 ** 31

Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Case:
    """One op call as a model makes it.

    ``make(batch, dtype, device, gen)`` builds the inputs (images, or windows for the window op, along dim 0 of
    every tensor not in ``shared``) in the model's layout; ``call(t)`` runs the public op on them;
    ``in_dtype(t)`` is the same formula in plain PyTorch in the inputs' own dtype (the error baseline).
    """

    op: str
    make: Callable[..., Tensors]
    call: Callable[[Tensors], object]
    in_dtype: Callable[[Tensors], object]
    batch: int  # images per GPU test (window attention: each of `slice_len` windows)
    shared: tuple[str, ...] = ()  # inputs without the batch dim (biases, tables, masks): not sliced
    fixed_dtype: tuple[str, ...] = ()  # float inputs that keep their own dtype
    grad: bool = True
    out_dtype: torch.dtype | None = None  # the outputs' dtype where it is not the inputs'
    slice_len: int = 1  # the leading-dim entries a large-tensor check compares (a whole image's windows)


def _randn(gen, *shape, dtype, device):
    return torch.randn(*shape, generator=gen, device=device, dtype=dtype)


def _qkv(gen, B, N, H, D, dtype, device):
    """q, k, v [B, H, N, D] as views of one [B, N, 3, H, D] projection, the layout the models' qkv split gives."""
    return _randn(gen, B, N, 3, H, D, dtype=dtype, device=device).permute(2, 0, 3, 1, 4).unbind(0)


# ------------------------------------------------------------------------------------------------------ window

def _window_inputs(windows, H, N, D, bias=False, padded_hw=None):
    def make(batch, dtype, device, gen):
        q, k, v = _qkv(gen, batch * windows, N, H, D, dtype, device)
        t = dict(q=q, k=k, v=v)
        if bias:  # a relative position bias [H, N, N] (MaxViT), a parameter of the model's dtype
            t["bias"] = _randn(gen, H, N, N, dtype=dtype, device=device)
        if padded_hw:  # DaViT on an image that does not tile: the padded tokens masked out as keys
            hw, size = padded_hw
            side = math.isqrt(N)
            padded = tuple(-(-s // side) * side for s in hw)
            t["mask"] = padding_key_mask(hw, padded, (side, side), window_partition, torch.device(device))
            assert t["mask"].shape == (windows, N)
        return t
    return make


def _window_call(t):
    return kernels.window_attention(t["q"], t["k"], t["v"], bias=t.get("bias"), mask=t.get("mask"))


def _window_in_dtype(t):
    q, k, v, bias, mask = t["q"], t["k"], t["v"], t.get("bias"), t.get("mask")
    B, H, N, D = q.shape
    s = (q * D ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        s = s + bias
    if mask is not None:  # every window keeps a key here, so no row is empty
        G = mask.shape[0]
        s = s.view(B // G, G, H, N, N).masked_fill(~mask[:, None, None], float("-inf")).view(B, H, N, N)
    return s.softmax(-1) @ v


def _window(windows, H, N, D, batch, bias=False, padded_hw=None):
    return Case("window_attention", _window_inputs(windows, H, N, D, bias, padded_hw), _window_call,
                _window_in_dtype, batch, shared=("bias", "mask"), slice_len=windows)


# ----------------------------------------------------------------------------------------------------- channel

def _channel(G, N, hd, batch):
    def make(b, dtype, device, gen):
        q, k, v = _qkv(gen, b, N, G, hd, dtype, device)
        return dict(q=q, k=k, v=v)
    return Case("channel_attention", make, lambda t: kernels.channel_attention(t["q"], t["k"], t["v"]),
                lambda t: channel_attention_torch(t["q"], t["k"], t["v"], t["q"].shape[-1] ** -0.5), batch)


# -------------------------------------------------------------------------------------------------------- halo

def _halo(heads, hw, dqk, dv, block, halo, stride, batch):
    def make(b, dtype, device, gen):
        H, W = hw
        q = _randn(gen, b, heads, dqk, H // stride, W // stride, dtype=dtype, device=device).permute(0, 1, 3, 4, 2)
        kv = _randn(gen, b, heads, dqk + dv, H, W, dtype=dtype, device=device).permute(0, 1, 3, 4, 2)
        k, v = kv.split([dqk, dv], dim=-1)
        win = block + 2 * halo
        rel = [0.3 * _randn(gen, 2 * win - 1, dqk, dtype=dtype, device=device) for _ in range(2)]
        return dict(q=q, k=k, v=v, height_rel=rel[0], width_rel=rel[1])

    def call(t):
        return kernels.halo_attention(t["q"], t["k"], t["v"], t["height_rel"], t["width_rel"], block, halo)

    def in_dtype(t):
        q, k, v = t["q"], t["k"], t["v"]
        nh, nw = k.shape[2] // block, k.shape[3] // block
        qb = query_blocks(q, nh, nw)
        pos = relative_logits(qb, t["height_rel"], t["width_rel"], block + 2 * halo)
        logits = qb @ neighbourhoods(k, block, halo).transpose(-1, -2) * q.shape[-1] ** -0.5 + pos
        return unblock(logits.softmax(-1) @ neighbourhoods(v, block, halo), q.shape[2] // nh)

    return Case("halo_attention", make, call, in_dtype, batch, shared=("height_rel", "width_rel"))


# ------------------------------------------------------------------------------------------------------ linear

def _linear(H, hw, D, batch, **opts):
    N = hw[0] * hw[1]

    def make(b, dtype, device, gen):
        q, k, v = _qkv(gen, b, N, H, D, dtype, device)
        t = dict(q=q, k=k, v=v)
        if opts.get("reweight_keys"):  # RAVLT: its own 2D RoPE tables, in the model's dtype
            t["cos"], t["sin"] = (x.to(device, dtype) for x in rope_tables(D, hw))
        return t

    def rope(t):
        return (t["cos"], t["sin"]) if "cos" in t else None

    return Case("linear_attention", make,
                lambda t: kernels.linear_attention(t["q"], t["k"], t["v"], rope=rope(t), **opts),
                lambda t: linear_in_dtype(t["q"], t["k"], t["v"], rope=rope(t), **opts),
                batch, shared=("cos", "sin"))


# ------------------------------------------------------------------------------------------------------ sparse

def _sparse(H, M, N, D, keep, batch, light_index=False):
    """Sparsifiner's patch queries (M = N - 1, the cls query apart) over all N keys, or a ViTDet map (M = N).
    The index is a top-k of random scores (int64, as the model's predictor gives it), or with ``light_index`` K
    keys spaced 7 apart from a random start (int32; distinct since 7 divides no N here), which needs no
    [B, H, M, N] scores."""
    K = math.ceil(keep * N)
    assert not light_index or math.gcd(7, N) == 1

    def make(b, dtype, device, gen):
        q, k, v = _qkv(gen, b, N, H, D, dtype, device)
        if light_index:
            start = torch.randint(N, (b, H, M, 1), generator=gen, device=device, dtype=torch.int32)
            index = (start + 7 * torch.arange(K, device=device, dtype=torch.int32)) % N
        else:  # a learned top-k, at random
            index = torch.rand(b, H, M, N, generator=gen, device=device).topk(K, dim=-1).indices
        return dict(q=q[:, :, N - M:], k=k, v=v, index=index)

    return Case("sparse_attention", make, lambda t: kernels.sparse_attention(t["q"], t["k"], t["v"], t["index"]),
                lambda t: sparse_in_dtype(t["q"], t["k"], t["v"], t["index"]), batch)


def _sparse_cls(H, N, D, batch):
    """Sparsifiner's cls row: one query over every key, the index an expanded arange (stride 0)."""
    def make(b, dtype, device, gen):
        q, k, v = _qkv(gen, b, N, H, D, dtype, device)
        return dict(q=q[:, :, :1], k=k, v=v, index=torch.arange(N, device=device).expand(b, H, 1, N))

    return Case("sparse_attention", make, lambda t: kernels.sparse_attention(t["q"], t["k"], t["v"], t["index"]),
                lambda t: sparse_in_dtype(t["q"], t["k"], t["v"], t["index"]), batch)


# ----------------------------------------------------------------------------------------------------- rollout

def _rollout(H, N, D, batch, per_head=False):
    """DCAL's rollout over DeiT's layers: q and k of one layer, r the running CLS row (fp32, as DCAL keeps it)."""
    def make(b, dtype, device, gen):
        q, k, _ = _qkv(gen, b, N, H, D, dtype, device)
        r = torch.rand(*((b, H, N) if per_head else (b, N)), generator=gen, device=device)
        return dict(q=2 * q, k=k, r=r)  # peaked rows, as trained maps are

    def in_dtype(t):
        q, k, r = t["q"], t["k"], t["r"].to(t["q"].dtype)
        p = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        r = r if r.dim() == 3 else r[:, None].expand(-1, q.shape[1], -1)
        return (r.unsqueeze(-2) @ p).squeeze(-2)

    return Case("rollout_step", make, lambda t: kernels.rollout_step(t["q"], t["k"], t["r"]), in_dtype, batch,
                fixed_dtype=("r",), grad=False, out_dtype=torch.float32)


# ------------------------------------------------------------------------------------------------------ gating

def _map(gen, b, C, H, W, dtype, device, channels_last):
    x = _randn(gen, b, C, H, W, dtype=dtype, device=device)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _ela_pool(C, H, W, batch, channels_last=False):
    return Case("ela_pool", lambda b, dtype, device, gen: dict(x=_map(gen, b, C, H, W, dtype, device, channels_last)),
                lambda t: kernels.ela_pool(t["x"]), lambda t: ela_pool_reference(t["x"]), batch)


def _ela_gate(C, H, W, batch, channels_last=False):
    def make(b, dtype, device, gen):
        x = _map(gen, b, C, H, W, dtype, device, channels_last)
        a_h, a_w = (torch.sigmoid(_randn(gen, b, C, n, dtype=dtype, device=device)) for n in (H, W))
        return dict(x=x, a_h=a_h, a_w=a_w)
    return Case("ela_gate", make, lambda t: kernels.ela_gate(t["x"], t["a_h"], t["a_w"]),
                lambda t: ela_gate_reference(t["x"], t["a_h"], t["a_w"]), batch)


def _subspace(C, G, H, W, batch, channels_last=False):
    def make(b, dtype, device, gen):
        x = _map(gen, b, C, H, W, dtype, device, channels_last)
        return dict(x=x, logits=2 * _randn(gen, b, G, H, W, dtype=dtype, device=device))
    return Case("subspace_attention", make, lambda t: kernels.subspace_attention(t["x"], t["logits"]),
                lambda t: subspace_attention_reference(t["x"], t["logits"]), batch)


# The models' calls at their default input sizes (tools/benchmark.py's capture lists them), a few images each.
CASES = {
    "window-davit_tiny-s0": _window(64, 3, 49, 32, batch=8),
    "window-davit_tiny-s2": _window(4, 12, 49, 32, batch=8),
    "window-davit-padded-mask": _window(12, 3, 49, 32, batch=8, padded_hw=((19, 26), 7)),
    "window-maxvit_tiny-s0-bias": _window(64, 2, 49, 32, batch=8, bias=True),
    "window-maxvit_tiny-s3-bias": _window(1, 16, 49, 32, batch=32, bias=True),
    "window-maxvit-padded-bias-mask": _window(12, 2, 49, 32, batch=8, bias=True, padded_hw=((19, 26), 7)),
    "window-maxvit_rw_256-N64-bias": _window(64, 2, 64, 32, batch=8, bias=True),
    "window-maxvit_384-N144-bias": _window(64, 2, 144, 32, batch=4, bias=True),
    "channel-davit_tiny-s0": _channel(3, 3136, 32, batch=4),
    "channel-davit_tiny-s2": _channel(12, 196, 32, batch=8),
    "halo-halonet26t-s3": _halo(8, (16, 16), 32, 32, 8, 2, 1, batch=8),
    "halo-halonet26t-s4-strided": _halo(8, (16, 16), 64, 64, 8, 2, 2, batch=8),
    "halo-halonet26t-s4": _halo(8, (8, 8), 64, 64, 8, 2, 1, batch=8),
    "linear-l2vit_tiny-s0": _linear(3, (56, 56), 32, batch=4, feature_map="relu", clamp_min=100.0),
    "linear-l2vit_tiny-s2": _linear(12, (14, 14), 32, batch=8, feature_map="relu", clamp_min=100.0),
    "linear-ravlt_t-s0": _linear(1, (56, 56), 64, batch=4, feature_map="elu", reweight_keys=True, eps=1e-6),
    "linear-ravlt_t-s1": _linear(2, (28, 28), 64, batch=4, feature_map="elu", reweight_keys=True, eps=1e-6),
    "sparse-sparsifiner-197": _sparse(6, 196, 197, 64, 0.25, batch=8),
    "sparse-sparsifiner-cls": _sparse_cls(6, 197, 64, batch=8),
    "sparse-vitdet-4096": _sparse(12, 4096, 4096, 64, 0.1, batch=1),
    "rollout-dcal-deit_s": _rollout(6, 197, 64, batch=8),
    "rollout-dcal-per-head": _rollout(6, 197, 64, batch=8, per_head=True),
    "ela_pool-resnet18-s0": _ela_pool(64, 56, 56, batch=8),
    "ela_pool-resnet18-s3-channels_last": _ela_pool(512, 7, 7, batch=8, channels_last=True),
    "ela_gate-resnet18-s0": _ela_gate(64, 56, 56, batch=8),
    "ela_gate-resnet18-s1-channels_last": _ela_gate(128, 28, 28, batch=8, channels_last=True),
    "subspace-ulsam-14": _subspace(96, 4, 14, 14, batch=8),
    "subspace-ulsam-7-channels_last": _subspace(160, 4, 7, 7, batch=8, channels_last=True),
}

# The ops over tensors past 2³¹ elements, fp16: the largest input or output alone passes 2³¹ (the q, k, v views of
# one projection span three times that); checked on the first and the last image of the batch.
LARGE = {
    "window": _window(64, 3, 49, 32, batch=0),
    "channel": _channel(3, 3136, 32, batch=0),
    "halo": _halo(8, (16, 16), 32, 32, 8, 2, 1, batch=0),
    "linear": _linear(1, (56, 56), 64, batch=0, feature_map="elu", reweight_keys=True, eps=1e-6),
    "sparse": _sparse(6, 196, 197, 64, 0.25, batch=0, light_index=True),
    "rollout": _rollout(6, 197, 64, batch=0),
    "ela_pool": _ela_pool(64, 56, 56, batch=0),
    "ela_gate": _ela_gate(64, 56, 56, batch=0),
    "subspace": _subspace(96, 4, 14, 14, batch=0),
}


# ----------------------------------------------------------------------------------------------------- harness

def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


Result = tuple[list[torch.Tensor], dict[str, torch.Tensor]]  # the outputs, and the gradient of each input


def _run(case: Case, t: Tensors, how: str, grad_outs: list[torch.Tensor] | None) -> Result:
    """Outputs and the gradient of every differentiable input, computed ``how``: "triton" (the fused kernels,
    asserting with trace() that they ran), "reference", or "in_dtype" (the formula in the inputs' dtype)."""
    names = [n for n, x in t.items() if case.grad and x.is_floating_point() and n not in ("cos", "sin")]
    leaves = {n: x.detach().requires_grad_() if n in names else x for n, x in t.items()}
    with torch.set_grad_enabled(case.grad):
        if how == "in_dtype":
            outs = _as_tuple(case.in_dtype(leaves))
        else:
            with use_backend(how), trace() as calls:
                outs = _as_tuple(case.call(leaves))
            assert calls and all(c == (case.op, how) for c in calls), f"expected {case.op} on {how}, ran {calls}"
    grads = {}
    if case.grad:
        grad_outs = [g.to(o.dtype) for g, o in zip(grad_outs, outs, strict=True)]
        grads = dict(zip(names, torch.autograd.grad(outs, [leaves[n] for n in names], grad_outs), strict=True))
    return [o.detach() for o in outs], grads


def _to64(t: Tensors) -> Tensors:
    return {n: x.double() if x.is_floating_point() else x for n, x in t.items()}


def _make(case: Case, batch: int, dtype: torch.dtype, device) -> Tensors:
    t = case.make(batch, dtype, device, torch.Generator(device=device).manual_seed(0))
    return {n: x.float() if n in case.fixed_dtype else x for n, x in t.items()}


def _output_shapes(case: Case, t: Tensors) -> list[tuple[torch.Size, torch.dtype]]:
    with torch.no_grad(), use_backend("reference"):
        return [(o.shape, o.dtype) for o in _as_tuple(case.call(t))]


def _grad_outs(case: Case, shapes, device) -> list[torch.Tensor] | None:
    gen = torch.Generator(device=device).manual_seed(1)
    return [torch.randn(s, generator=gen, device=device, dtype=d) for s, d in shapes] if case.grad else None


def _assert_precision(label: str, case: Case, fused: Result, in_dtype: Result, exact: Result, dtype) -> None:
    pairs = [(f"out{i}", *xs, case.out_dtype or dtype)
             for i, xs in enumerate(zip(fused[0], in_dtype[0], exact[0], strict=True))]
    pairs += [(f"d{n}", g, in_dtype[1][n], exact[1][n], in_dtype[1][n].dtype) for n, g in fused[1].items()]
    for name, f, s, e, want in pairs:
        assert f.shape == e.shape and f.dtype == want, f"{label} {name}: {f.shape} {f.dtype}, expected {e.shape} {want}"
        assert torch.isfinite(f).all(), f"{label} {name}: not finite"
        assert_within_precision(f"{label} {name}", f, s, e, dtype)


def check(case: Case, dtype: torch.dtype, device, batch: int, label: str) -> None:
    """The fused op against the reference (fp64) within twice the error of the same formula in ``dtype``."""
    t = _make(case, batch, dtype, device)
    grad_outs = _grad_outs(case, _output_shapes(case, t), device)
    fused = _run(case, t, "triton", grad_outs)
    in_dtype = _run(case, t, "in_dtype", grad_outs)
    exact = _run(case, _to64(t), "reference", grad_outs and [g.double() for g in grad_outs])
    _assert_precision(label, case, fused, in_dtype, exact, dtype)


def check_large(case: Case, device, min_elements: int, label: str) -> None:
    """The fused op over inputs whose output passes ``min_elements`` (its inputs, views of a larger tensor, pass
    it further), in fp16; its first and last images against the reference computed on those alone."""
    dtype = torch.float16
    one = _make(case, 1, dtype, device)
    one_out = _output_shapes(case, one)
    per_image = max(*(s.numel() for s, _ in one_out), *(x.numel() for x in one.values()))
    batch = -(-(min_elements + 1) // per_image)
    t = _make(case, batch, dtype, device)
    shapes = [(torch.Size([s[0] * batch, *s[1:]]), d) for s, d in one_out]
    assert max(*(s.numel() for s, _ in shapes), *(x.numel() for x in t.values())) > min_elements
    grad_outs = _grad_outs(case, shapes, device)
    full = _run(case, t, "triton", grad_outs)
    rows, n = shapes[0][0][0], case.slice_len  # the leading dim (windows for window attention), one image's worth
    for part in (slice(0, n), slice(rows - n, rows)):
        sub = {k: x if k in case.shared else x[part] for k, x in t.items()}
        g = grad_outs and [x[part] for x in grad_outs]
        fused = ([o[part] for o in full[0]], {k: x[part] for k, x in full[1].items() if k not in case.shared})
        in_dtype = _run(case, sub, "in_dtype", g)
        exact = _run(case, _to64(sub), "reference", g and [x.double() for x in g])
        # the gradients of the shared inputs (biases, tables) sum over the whole batch: not comparable here
        _assert_precision(f"{label} [{part.start}:{part.stop}] of {rows}", case, fused, in_dtype, exact, dtype)


# ------------------------------------------------------------------------------------------------------- tests

@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", CASES)
def test_fused_matches_reference(name, dtype):
    check(CASES[name], dtype, "cuda", CASES[name].batch, name)


@pytest.fixture(autouse=True)
def release_gpu_memory():
    """Cached blocks back to the GPU after each test: the tests past 2³¹ elements need most of it."""
    yield
    if CUDA:
        torch.cuda.empty_cache()


LARGE_GIB = 60  # the largest case (q, k, v, output, upstream gradient and three input gradients, fp16) and slack


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", LARGE)
def test_past_int32_offsets(name):
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0] / 2 ** 30
    if free < LARGE_GIB:
        pytest.skip(f"needs about {LARGE_GIB} GiB of free GPU memory for tensors past 2^31 elements, {free:.0f} free")
    check_large(LARGE[name], "cuda", INT32_LIMIT, f"{name} past 2^31")


# The same checking code on the CPU, through Triton's interpreter: one small case per op (what the GPU tests
# assert, at a size the interpreter runs in seconds), and the large-tensor path at a small threshold.
SMALL = {
    "window-padded-mask": _window(12, 2, 49, 16, batch=1, padded_hw=((19, 26), 7)),
    "window-bias": _window(2, 2, 49, 32, batch=1, bias=True),
    "channel": _channel(2, 49, 32, batch=1),
    "halo-strided": _halo(2, (8, 8), 16, 16, 4, 1, 2, batch=1),
    "linear-rala": _linear(1, (7, 7), 16, batch=1, feature_map="elu", reweight_keys=True, eps=1e-6),
    "sparse": _sparse(2, 48, 49, 16, 0.25, batch=1),
    "sparse-cls": _sparse_cls(2, 49, 16, batch=1),
    "sparse-light-index": _sparse(2, 49, 50, 16, 0.25, batch=1, light_index=True),
    "rollout": _rollout(2, 49, 16, batch=1),
    "ela_gate-channels_last": _ela_gate(4, 7, 7, batch=1, channels_last=True),
    "ela_pool": _ela_pool(4, 7, 7, batch=1),
    "subspace": _subspace(8, 4, 7, 7, batch=1),
}


@pytest.mark.skipif(CUDA, reason="the interpreter's dry run of the harness; on a GPU the cuda tests run it")
@pytest.mark.parametrize("name", SMALL)
def test_harness_on_cpu(name):
    check(SMALL[name], torch.float16, "cpu", SMALL[name].batch, name)


@pytest.mark.skipif(CUDA, reason="the interpreter's dry run of the harness; on a GPU the cuda tests run it")
@pytest.mark.parametrize("name", ["window-bias", "halo-strided", "linear-rala", "sparse-light-index", "rollout",
                                  "ela_pool"])
def test_large_harness_on_cpu(name):
    check_large(SMALL[name], "cpu", 3000, name)


def test_every_op_has_a_gpu_case():
    """`make test-cuda` covers every public op, at the models' shapes and past 2³¹ elements."""
    ops = {op for op in kernels.__all__ if callable(getattr(kernels, op)) and op not in dir(kernels.dispatch)}
    assert {c.op for c in CASES.values()} == ops
    assert {c.op for c in LARGE.values()} == ops
    assert {c.op for c in SMALL.values()} == ops
