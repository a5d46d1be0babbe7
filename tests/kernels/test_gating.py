"""The gating ops (ELA strip pooling and double gate, ULSAM subspace softmax gate): the fused Triton path
(under the interpreter on CPU) against the reference, forward and every gradient; the reference against values
computed by hand; argument checks."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnzoo.kernels import ela_gate, ela_pool, subspace_attention, trace, use_backend
from attnzoo.kernels._triton import SM90
from attnzoo.kernels.gating import fused

from ._util import assert_within_precision

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randn(*shape, dtype=torch.float32, seed=0, positive=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    t = torch.sigmoid(t) if positive else t
    return t.to(DEVICE, dtype)


def _channels_last(t):
    out = t.to(memory_format=torch.channels_last)
    assert not out.is_contiguous()
    return out


# each case: (op, inputs builder, number of outputs)
def _ela_pool_inputs(shape, dtype, strided):
    x = _randn(*shape, dtype=dtype)
    return [_channels_last(x) if strided else x]


def _ela_gate_inputs(shape, dtype, strided):
    B, C, H, W = shape
    x = _randn(*shape, dtype=dtype)
    return [_channels_last(x) if strided else x, _randn(B, C, H, dtype=dtype, seed=1, positive=True),
            _randn(B, C, W, dtype=dtype, seed=2, positive=True)]


def _subspace_inputs(shape, dtype, strided, groups=4):
    B, C, H, W = shape
    x = _randn(*shape, dtype=dtype)
    logits = 2 * _randn(B, groups, H, W, dtype=dtype, seed=3)
    return [_channels_last(x) if strided else x, logits]


OPS = {"ela_pool": (ela_pool, _ela_pool_inputs), "ela_gate": (ela_gate, _ela_gate_inputs),
       "subspace_attention": (subspace_attention, _subspace_inputs)}
SHAPES = [(2, 8, 7, 7), (1, 4, 5, 9), (1, 8, 14, 3)]


def _run(op, inputs, backend, seed=5):
    """Outputs and the gradients of every input for a fixed random upstream gradient."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    with use_backend(backend), trace() as calls:
        out = op(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = [_randn(*o.shape, dtype=o.dtype, seed=seed + i) for i, o in enumerate(outs)]
    return [*outs, *torch.autograd.grad(outs, inputs, grads)], calls


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_triton_matches_reference_fp32(name, shape, strided):
    op, make = OPS[name]
    inputs = make(shape, torch.float32, strided)
    got, calls = _run(op, inputs, "triton")
    assert calls == [(name, "triton")]
    want, _ = _run(op, inputs, "reference")
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m, i=i: f"{name} result {i}: {m}")


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(name, dtype):
    """Within twice the error of the same computation done in plain PyTorch in that dtype (vs fp64)."""
    op, make = OPS[name]
    inputs = make((2, 8, 7, 7), dtype, False)
    got, _ = _run(op, inputs, "triton")
    same, _ = _run(op, inputs, "reference")
    exact, _ = _run(op, [t.double() for t in inputs], "reference")
    for i, (g, s, e) in enumerate(zip(got, same, exact, strict=True)):
        assert g.dtype == dtype
        assert_within_precision(f"{name} result {i}", g, s, e, dtype)


@pytest.mark.parametrize("name", list(OPS))
def test_triton_many_blocks(name, monkeypatch):
    """Several row blocks per plane and several position blocks per subspace, the last ragged, on a small map
    by shrinking the blocks' limits."""
    monkeypatch.setattr(fused, "MAX_BLOCK", 16)
    monkeypatch.setattr(fused, "MAX_POSITIONS", 16)
    op, make = OPS[name]
    inputs = make((1, 8, 11, 6), torch.float32, False)
    got, _ = _run(op, inputs, "triton")
    want, _ = _run(op, inputs, "reference")
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(OPS))
def test_triton_gpu_blocks_fp16(name):
    """The GPU's own blocks (the rule has no interpreter case): a 80 x 64 plane is 3 ELA row blocks of 32 rows
    and 2 ULSAM blocks of 4096 positions, in fp16 (bf16 launches the same blocks, asserted)."""
    config = fused.launch_config(80, 64, torch.float16, SM90)
    assert config == fused.launch_config(80, 64, torch.bfloat16, SM90)
    assert config["ela"]["BLOCK_H"] == 32 and config["ulsam"]["BLOCK"] == 4096
    op, make = OPS[name]
    inputs = make((1, 4, 80, 64), torch.float16, False)
    got, _ = _run(op, inputs, "triton")
    same, _ = _run(op, inputs, "reference")
    exact, _ = _run(op, [t.double() for t in inputs], "reference")
    for i, (g, s, e) in enumerate(zip(got, same, exact, strict=True)):
        assert_within_precision(f"{name} result {i}", g, s, e, torch.float16)


# Run without the interpreter (its kernels cannot be lowered): the Triton IR of each kernel, as triton.compile's
# first stage builds it for sm_90a, and every use of the plane's program id in it.
_PID_USES = r"""
import json, re, sys
import triton
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from attnzoo.kernels._triton import SM90
from attnzoo.kernels.gating import fused

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
options = backend.parse_options({})
result = {}
for name, blocks in json.loads(sys.argv[1]).items():
    fn = getattr(fused, name)
    signature = {n: "constexpr" if n in blocks else ("*fp32" if n.endswith("_ptr") else "i32") for n in fn.arg_names}
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = ASTSource(fn, signature, blocks).make_ir(target, options, backend.get_codegen_implementation(options),
                                                      backend.get_module_map(), context)
    text = str(module)
    pid = re.search(r"(%\S+) = tt.get_program_id x : i32", text).group(1)
    result[name] = [line.strip() for line in text.splitlines() if re.search(re.escape(pid) + r"\b", line)][1:]
print(json.dumps(result))
"""

_ELA = dict(BLOCK_H=4, BLOCK_W=64)
_ULSAM = dict(BLOCK=256)
_KERNELS = {"_ela_pool_fwd": _ELA, "_ela_pool_bwd": _ELA, "_ela_gate_fwd": _ELA, "_ela_gate_bwd": _ELA,
            "_subspace_fwd": _ULSAM, "_subspace_bwd_dx": _ULSAM, "_subspace_bwd_dl": _ULSAM}


def test_plane_offsets_are_int64():
    """The kernels take contiguous maps, so no strided view passes 2**31 elements cheaply: instead, in each
    kernel's Triton IR (lowered for sm_90a, no GPU needed) the plane's program id meets nothing but a widening
    to int64, so every plane · size offset is a 64-bit product."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", _PID_USES, json.dumps(_KERNELS)], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    uses = json.loads(out.splitlines()[-1])
    assert set(uses) == set(_KERNELS)
    for name, lines in uses.items():
        assert lines and all(re.fullmatch(r"%\S+ = arith.extsi %\S+ : i32 to i64( loc\(.*\))?", u) for u in lines), (
            name, lines)


def test_reference_by_hand():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    x_h, x_w = ela_pool(x)
    torch.testing.assert_close(x_h, torch.tensor([[[1.5, 5.5, 9.5]]]))  # row means
    torch.testing.assert_close(x_w, torch.tensor([[[4.0, 5.0, 6.0, 7.0]]]))  # column means
    y = ela_gate(x, torch.tensor([[[1.0, 0.5, 0.0]]]), torch.tensor([[[1.0, 2.0, 1.0, 1.0]]]))
    torch.testing.assert_close(y, torch.tensor([[[[0.0, 2.0, 2.0, 3.0], [2.0, 5.0, 3.0, 3.5], [0.0] * 4]]]))
    # equal logits: a = 1/(H·W) everywhere; one dominant logit: a ≈ one-hot there, per subspace
    x = torch.ones(1, 4, 2, 2)
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 1, 0] = 100.0
    y = subspace_attention(x, logits)
    torch.testing.assert_close(y[0, :2], torch.full((2, 2, 2), 1.25))
    torch.testing.assert_close(y[0, 2:], torch.tensor([[1.0, 1.0], [2.0, 1.0]]).expand(2, 2, 2))


def test_argument_errors():
    x = torch.randn(1, 4, 3, 5)
    with pytest.raises(ValueError, match=r"ela_pool: `x` must be 4-D \[B, C, H, W\], got shape \[4, 3, 5\]"):
        ela_pool(x[0])
    with pytest.raises(ValueError, match=r"ela_gate: `a_w` must have shape \[1, 4, 5\] .* got \[1, 4, 3\]"):
        ela_gate(x, torch.rand(1, 4, 3), torch.rand(1, 4, 3))
    with pytest.raises(ValueError, match=r"subspace_attention: `logits` must have shape \[B, G, H, W\] = "
                                         r"\[1, G, 3, 5\] with G dividing C=4, got \[1, 3, 3, 5\]"):
        subspace_attention(x, torch.randn(1, 3, 3, 5))
    with pytest.raises(ValueError, match=r"subspace_attention: `logits` has dtype torch.float16"):
        subspace_attention(x, torch.randn(1, 2, 3, 5).half())
    with pytest.raises(ValueError, match=r"ela_pool: the triton backend takes float16, bfloat16 or float32"):
        with use_backend("triton"):
            ela_pool(x.double())
