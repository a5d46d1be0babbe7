"""The registered ops (``torch.ops.attnzoo.*``): ``torch.library.opcheck`` of every forward and backward op, the
torch fallback of an op called where its kernels cannot run, the rule for importing the fused modules, and
``torch.compile(fullgraph=True)`` / ``torch.export`` of the ops and of the models with no graph break.

On the CPU the fused kernels run under Triton's interpreter (the root conftest sets ``TRITON_INTERPRET=1``), so
every shape here is tiny.
"""
from __future__ import annotations

import sys

import pytest
import timm
import torch

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.kernels import (
    _op,
    channel_attention,
    dispatch,
    ela_gate,
    ela_pool,
    halo_attention,
    linear_attention,
    rollout_step,
    sparse_attention,
    subspace_attention,
    trace,
    use_backend,
    window_attention,
)
from attnzoo.kernels._op import OPS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the op-level cases run the fused kernels


def _randn(*shape, seed: int, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE).requires_grad_(grad)


def _index(B, H, M, N, K, dtype=torch.int64) -> torch.Tensor:
    """K distinct key indices per query, as torch.topk gives them."""
    return torch.rand(B, H, M, N, generator=torch.Generator().manual_seed(7)).argsort(-1)[..., :K].to(DEVICE, dtype)


def _rope(N, D):
    angle = torch.arange(N)[:, None] * torch.linspace(0.1, 1.0, D // 2).repeat_interleave(2)[None]
    return angle.cos().to(DEVICE), angle.sin().to(DEVICE)


def _cpu(args):
    return [a.detach().cpu().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]


def _qkv(*shape, seed=0):
    return [_randn(*shape, seed=seed + i) for i in range(3)]


# the registered op's arguments: the public function's, validated and normalised
CASES = {
    "window_attention": {
        "plain": lambda: (*_qkv(2, 2, 16, 16), None, None, 0.25),
        "bias+mask": lambda: (*_qkv(2, 2, 16, 16), _randn(2, 1, 16, 16, seed=5),
                              torch.arange(32, device=DEVICE).view(2, 16) % 5 > 0, 0.25),
    },
    "channel_attention": {"plain": lambda: (*_qkv(2, 2, 20, 16), 0.3)},
    "halo_attention": {
        "plain": lambda: (*_qkv(1, 1, 4, 4, 16), _randn(7, 16, seed=5), _randn(7, 16, seed=6), 2, 1, 0.25, False),
        "strided+scale_pos": lambda: (_randn(1, 1, 2, 2, 16, seed=0), *_qkv(1, 1, 4, 4, 16, seed=1)[:2],
                                      _randn(7, 16, seed=5), _randn(7, 16, seed=6), 2, 1, 0.25, True),
    },
    "linear_attention": {
        "relu": lambda: (*_qkv(1, 2, 20, 16), "relu", None, None, None, None, 0.0),
        "elu+reweight+rope+clamp": lambda: (*_qkv(1, 2, 20, 16), "elu", 0.25, *_rope(20, 16), 0.5, 1e-6),
    },
    "sparse_attention": {
        "int64": lambda: (_randn(1, 2, 8, 16, seed=0), *_qkv(1, 2, 12, 16, seed=1)[:2], _index(1, 2, 8, 12, 4), 0.25),
        "int32": lambda: (_randn(1, 2, 8, 16, seed=0), *_qkv(1, 2, 12, 16, seed=1)[:2],
                          _index(1, 2, 8, 12, 12, torch.int32), 0.25),
    },
    "rollout_step": {"plain": lambda: (*(_randn(1, 2, 10, 16, seed=s, grad=False) for s in (0, 1)),
                                       _randn(1, 2, 10, seed=2, grad=False).exp(), 0.3)},
    "ela_pool": {"plain": lambda: (_randn(1, 2, 4, 6, seed=0),)},
    "ela_gate": {"plain": lambda: (_randn(1, 2, 4, 6, seed=0), _randn(1, 2, 4, seed=1), _randn(1, 2, 6, seed=2))},
    "subspace_attention": {"plain": lambda: (_randn(1, 4, 4, 4, seed=0), _randn(1, 2, 4, 4, seed=1))},
}
OP_CASES = [pytest.param(name, case, id=f"{name}-{case}") for name, cases in CASES.items() for case in cases]


def test_every_public_op_is_registered():
    assert set(OPS) == set(CASES)
    for name, op in OPS.items():
        assert getattr(torch.ops.attnzoo, name).default is op.op._opoverload
        assert (op.backward_op is None) == (name == "rollout_step")  # forward only: its callers run no_grad


@pytest.mark.parametrize("name,case", OP_CASES)
def test_opcheck(name, case, monkeypatch):
    """Schema, fake tensor, autograd registration and AOT dispatch (dynamic shapes) of the forward op and of the
    backward op it calls."""
    op, args = OPS[name], CASES[name][case]()
    torch.library.opcheck(op.op, args)
    if op.backward_op is None:
        return
    calls = []
    backward_op = op.backward_op
    monkeypatch.setattr(op, "backward_op", lambda *a: calls.append(a) or backward_op(*a))
    outputs = op.op(*args)
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs[:op.outputs]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    torch.autograd.grad(outputs, leaves, [torch.randn_like(o) for o in outputs])
    (bwd_args,) = calls
    # its autograd and AOT dispatch are the forward op's, checked above through the joint graph
    torch.library.opcheck(backward_op, [a.detach() if isinstance(a, torch.Tensor) else a for a in bwd_args],
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("name", ["window_attention", "halo_attention", "linear_attention", "ela_pool"])
def test_registered_op_falls_back_to_torch_without_kernels(name, monkeypatch):
    """Called where the kernels cannot run (CPU tensors, no interpreter), the registered op computes the torch path,
    in the fused layout, and its gradients by recomputing it."""
    op, case = OPS[name], next(iter(CASES[name]))
    args = _cpu(CASES[name][case]())
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    want = op.torch(*args)
    want = (want,) if isinstance(want, torch.Tensor) else want
    grad_out = [torch.randn_like(w) for w in want]
    want_grads = torch.autograd.grad(want, leaves, grad_out)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not op.runs_fused(*args)
    got = op.op(*args)
    got = (got,) if isinstance(got, torch.Tensor) else got[:op.outputs]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    for g, w in zip(torch.autograd.grad(got, leaves, grad_out), want_grads, strict=True):
        torch.testing.assert_close(g, w)


def test_fused_module_import_errors_surface(monkeypatch):
    """A broken fused module fails loudly where triton is importable; without triton there is none to import."""
    monkeypatch.setitem(sys.modules, "attnzoo.kernels.window.fused", None)  # importing it now raises ImportError
    with pytest.raises(ImportError, match="attnzoo.kernels.window.fused"):
        _op.fused_module("attnzoo.kernels.window")
    monkeypatch.setattr(_op, "triton_available", lambda: False)
    assert _op.fused_module("attnzoo.kernels.window") is None


def test_without_triton_the_choice_is_torch_and_a_forced_triton_says_why(monkeypatch):
    monkeypatch.setattr(OPS["window_attention"], "fused", None)
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    q, k, v, *_ = CASES["window_attention"]["plain"]()
    with trace() as calls:
        window_attention(q, k, v)
    assert calls == [("window_attention", "torch")]
    with use_backend("triton"), pytest.raises(RuntimeError, match="window_attention: the triton backend was "
                                                                  "requested but triton is not installed"):
        window_attention(q, k, v)


# ------------------------------------------------------------------------ torch.compile of the public functions


def _window(q, k, v, bias):
    return window_attention(q, k, v, bias=bias[0], mask=torch.arange(16, device=q.device) % 5 > 0)


def _ela(x, a_h, a_w):
    x_h, x_w = ela_pool(x)
    return ela_gate(x, a_h * x_h.sigmoid(), a_w * x_w.sigmoid())


PUBLIC = {
    "window_attention": (_window, lambda: (*_qkv(2, 2, 16, 16), _randn(2, 2, 16, 16, seed=5))),
    "channel_attention": (channel_attention, lambda: _qkv(2, 2, 20, 16)),
    "halo_attention": (lambda q, k, v, hr, wr: halo_attention(q, k, v, hr, wr, 2, 1),
                       lambda: (*_qkv(1, 1, 4, 4, 16), _randn(7, 16, seed=5), _randn(7, 16, seed=6))),
    "linear_attention": (lambda q, k, v: linear_attention(q, k, v, "elu", reweight_keys=True, rope=_rope(20, 16)),
                         lambda: _qkv(1, 2, 20, 16)),
    "sparse_attention": (sparse_attention, lambda: CASES["sparse_attention"]["int64"]()[:4]),
    "rollout_step": (lambda q, k, r: rollout_step(q, k, r),
                     lambda: (_randn(1, 2, 10, 16, seed=0, grad=False), _randn(1, 2, 10, 16, seed=1, grad=False),
                              _randn(1, 10, seed=2, grad=False).exp())),
    "ela_pool+ela_gate": (_ela, CASES["ela_gate"]["plain"]),
    "subspace_attention": (subspace_attention, CASES["subspace_attention"]["plain"]),
}


@pytest.mark.parametrize("name", list(PUBLIC))
def test_compile_fullgraph_with_the_triton_backend(name):
    """One graph holding the registered ops (forward and backward through AOT autograd), equal to eager."""
    fn, make = PUBLIC[name]
    args = make()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    with use_backend("triton"):
        want = fn(*args)
        got = torch.compile(fn, fullgraph=True, backend=backend)(*args)
    torch.testing.assert_close(got, want)
    (graph,) = graphs
    called = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert {f"attnzoo.{op}.default" for op in name.split("+")} <= called
    leaves = [a for a in args if a.requires_grad]
    if leaves:  # the backward through the compiled graph runs the registered backward ops
        outs = want if isinstance(want, tuple) else (want,)
        got_outs = got if isinstance(got, tuple) else (got,)
        grad_out = [torch.randn_like(o) for o in outs]
        for g, w in zip(torch.autograd.grad(got_outs, leaves, grad_out),
                        torch.autograd.grad(outs, leaves, grad_out), strict=True):
            torch.testing.assert_close(g, w)


# ------------------------------------------------------------- torch.export and torch.compile of the models

# the smallest input each model takes, depth and widths reduced
MODELS = {
    "davit_tiny": (dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 96, 128), num_heads=(2, 2, 2, 4)), 64),
    "maxvit_tiny_tf_224": (dict(embed_dim=(32, 64, 64, 64), depths=(1, 1, 1, 1), stem_width=16, img_size=128,
                                head_hidden_size=64), 128),
    "halonet26t": ({}, 256),
    "ravlt_t": (dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), head_hidden_size=32), 64),
    "l2vit_tiny": (dict(depths=(2, 2, 2, 2), dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4)), 64),
    "sparsifiner_deit_small_patch16_224": (dict(img_size=64, embed_dim=32, depth=2, num_heads=2, basis_topk=2), 64),
}
# the ops each model's graph holds with the triton backend forced
MODEL_OPS = {
    "davit_tiny": {"window_attention", "channel_attention"},
    "maxvit_tiny_tf_224": {"window_attention"},
    "halonet26t": {"halo_attention"},
    "ravlt_t": {"linear_attention"},
    "l2vit_tiny": {"linear_attention", "window_attention"},
    "sparsifiner_deit_small_patch16_224": {"sparse_attention"},
}
# one model per op family in the default run
FAST_EXPORT = {"davit_tiny", "halonet26t", "ravlt_t", "sparsifiner_deit_small_patch16_224"}
# tests/backbones compiles every model (torch backend, dynamo only); here through AOT autograd too, which costs
# 15-25 s a model on the CPU: one fast case, the op-level compile above covers every op family with triton
FAST_COMPILE = {"sparsifiner_deit_small_patch16_224"}


def _params(fast):
    return [pytest.param(n, marks=() if n in fast else pytest.mark.slow) for n in MODELS]


def _model(name):
    kwargs, size = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    return model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", _params(FAST_EXPORT))
def test_export_with_the_triton_backend(name, monkeypatch):
    """The exported graph (traced with fake tensors) calls the registered fused ops, and runs: on the CPU without
    the interpreter each falls back to the torch path, so it matches the model on the torch backend."""
    model, x = _model(name)
    with use_backend("triton"):
        exported = torch.export.export(model, (x,))
    called = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {f"attnzoo.{op}.default" for op in MODEL_OPS[name]} <= called
    with torch.no_grad(), use_backend("torch"):
        want = model(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", _params(FAST_COMPILE))
def test_compile_fullgraph_with_the_torch_backend(name):
    model, x = _model(name)
    torch._dynamo.reset()
    with torch.no_grad(), use_backend("torch"):
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
