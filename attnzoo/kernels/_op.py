"""How an attnzoo op is declared: one :class:`Op` per public function, and its fused path registered as a
``torch.library`` op in the ``attnzoo`` namespace.

An op's package (``attnzoo/kernels/<op>/__init__.py``) declares:

* ``fused = fused_module(__name__)``: its ``fused.py``, imported only when triton is importable (a real
  import error inside it surfaces);
* ``OP = Op(name, fused, reference=..., torch=..., unsupported=..., preferred=...)``: the plain-PyTorch paths
  and the fused kernels' verdict on the (validated) arguments;
* ``@OP.forward`` on the fused forward (annotated, so its schema is inferred) with ``@OP.fake``;
  ``@OP.backward`` on the fused backward with ``@OP.backward_fake``, and ``@OP.grads(saved=...)`` mapping
  autograd's view (inputs, saved outputs, output gradients) onto the backward op's arguments.

The public function checks its arguments, normalises them and returns ``OP(*args)``. That picks the backend in
Python (``dispatch.select_backend``: dynamo traces it and guards on the module globals it reads); the reference
and torch backends run inline, so a compiler sees plain PyTorch (SDPA and so on) and autograd is autograd's.
The triton backend calls ``torch.ops.attnzoo.<name>``, whose forward returns the public outputs followed by the
residuals its backward needs (e.g. a log-sum-exp), marked non-differentiable; its registered autograd calls
``torch.ops.attnzoo.<name>_backward``, a registered op of its own, so ``torch.compile`` and ``torch.export`` see
both. The registered op is total: where the fused kernels cannot run (CPU tensors without
``TRITON_INTERPRET=1``, no triton, an unsupported shape) it runs the op's torch path, its residuals are zeros
and its backward recomputes the torch path under autograd.

Opaque ``custom_op`` rather than ``triton_op`` + ``wrap_triton``. With ``triton_op`` Inductor would trace the
launcher and call the kernels from its own generated code (no Python launcher per call, the kernels visible to
its scheduler); that needs every launch written as ``wrap_triton(kernel)[grid](...)`` and launchers traceable
with fake tensors. Here the op is one opaque node: Inductor fuses what lies around it, never into it, and the
launcher runs in Python as in eager mode. Nothing could be measured without a GPU, so the choice rests on
what it costs: launchers unchanged, and the CPU fallback kept out of the traced graph. Switching an op is
local to its ``OP.forward``/``OP.backward``.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch

from .dispatch import interpreting, select_backend, triton_available

NAMESPACE = "attnzoo"
OPS: dict[str, Op] = {}  # every declared op by name, filled as the op packages are imported


def fused_module(package: str) -> ModuleType | None:
    """``<package>.fused`` when triton is importable, else None; an import error inside it is not hidden."""
    return importlib.import_module(f"{package}.fused") if triton_available() else None


def _tensors(args) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor)]


def _one_or_tuple(outputs: tuple):
    return outputs[0] if len(outputs) == 1 else outputs


class Op:
    """One attention op: its backends and its registered fused path.

    Args:
        name: the public name, e.g. "window_attention"; the registered op is ``torch.ops.attnzoo.<name>``.
        fused: the op's fused module (:func:`fused_module`), or None without triton.
        reference: the readable formula, ``reference(*args)``.
        torch: the fastest plain-PyTorch path, ``torch(*args)``.
        unsupported: ``unsupported(*args)``: why the fused kernels cannot take these arguments (a phrase
            completing "the triton backend ..."), or None. Called only when ``fused`` is not None.
        preferred: ``preferred(*args)``: whether the automatic choice takes the fused kernels on CUDA tensors;
            default: whenever they support the arguments.
        outputs: how many tensors the public function returns.

    ``args`` are the public function's validated, normalised arguments, the same for every backend and the
    registered op.
    """

    def __init__(self, name: str, fused: ModuleType | None, *, reference: Callable, torch: Callable,
                 unsupported: Callable, preferred: Callable | None = None, outputs: int = 1):
        self.name, self.fused = name, fused
        self.reference, self.torch = reference, torch
        self.unsupported, self.preferred = unsupported, preferred
        self.outputs = outputs
        self.op = self.backward_op = None
        self._fake = self._grads = None
        self._saved: tuple[int, ...] = ()
        self._save_inputs = True
        OPS[name] = self

    # ----------------------------------------------------------------------------------- the public call

    def __call__(self, *args):
        unsupported = None if self.fused is None else self.unsupported(*args)
        supported = self.fused is not None and unsupported is None
        if supported and self.preferred is not None:
            supported = self.preferred(*args)
        backend = select_backend(self.name, args[0], triton_supported=supported)
        if backend == "reference":
            return self.reference(*args)
        if backend == "torch":
            return self.torch(*args)
        if unsupported is not None:
            raise ValueError(f"{self.name}: the triton backend {unsupported}")
        out = self.op(*args)
        return out if isinstance(out, torch.Tensor) else _one_or_tuple(out[:self.outputs])

    def runs_fused(self, *args) -> bool:
        """Whether the registered op runs the fused kernels on these arguments (else the torch fallback)."""
        on_device = interpreting() or all(t.is_cuda for t in _tensors(args))
        return self.fused is not None and on_device and self.unsupported(*args) is None

    # ---------------------------------------------------------------------------------- the registration

    def forward(self, fn: Callable) -> Callable:
        """Register ``fn`` (the fused forward: the public outputs, then the backward's residuals) as
        ``attnzoo::<name>``; on arguments the kernels cannot take it runs the torch path instead."""
        schema = torch.library.infer_schema(fn, mutates_args=())

        def impl(*args):
            return fn(*args) if self.runs_fused(*args) else self._fallback(*args)

        self.op = torch.library.custom_op(f"{NAMESPACE}::{self.name}", impl, mutates_args=(), schema=schema)
        return fn

    def fake(self, fn: Callable) -> Callable:
        """The forward's fake implementation: empty outputs of the shapes, dtypes and strides ``forward`` gives."""
        self.op.register_fake(fn)
        self._fake = fn
        return fn

    def _fallback(self, *args):
        like = self._fake(*args)
        like = like if isinstance(like, tuple) else (like,)
        out = self.torch(*args)
        out = out if isinstance(out, tuple) else (out,)
        public = [e.copy_(o) for e, o in zip(like[:self.outputs], out, strict=True)]  # the fused layout
        return _one_or_tuple((*public, *(torch.zeros_like(r) for r in like[self.outputs:])))

    def backward(self, fn: Callable) -> Callable:
        """Register ``fn`` (the fused backward) as ``attnzoo::<name>_backward``."""
        self.backward_op = torch.library.custom_op(f"{NAMESPACE}::{self.name}_backward", fn, mutates_args=())
        return fn

    def backward_fake(self, fn: Callable) -> Callable:
        self.backward_op.register_fake(fn)
        return fn

    def grads(self, saved: tuple[int, ...] = (), inputs: bool = True) -> Callable[[Callable], Callable]:
        """Register the forward op's autograd: ``@OP.grads(saved=(0, 1))`` on
        ``fn(inputs, outputs, grads, needs_input_grad)``, which returns one gradient (or None) per input by
        calling the backward op. ``outputs`` are the forward outputs at the indices ``saved`` (only those are
        kept for the backward); the tensor inputs are kept too unless ``inputs=False`` (then they are None in
        ``inputs``, and the fallback's recompute still keeps them)."""
        def register(fn: Callable) -> Callable:
            self._grads, self._saved, self._save_inputs = fn, saved, inputs
            self.op.register_autograd(self._backward, setup_context=self._setup_context)
            return fn
        return register

    def _setup_context(self, ctx, inputs, output):
        output = output if isinstance(output, tuple) else (output,)
        ctx.fused = self.runs_fused(*inputs)
        keep = [isinstance(a, torch.Tensor) and (self._save_inputs or not ctx.fused) for a in inputs]
        ctx.layout = [(k, None if k or isinstance(a, torch.Tensor) else a) for k, a in zip(keep, inputs, strict=True)]
        ctx.save_for_backward(*(a for a, k in zip(inputs, keep, strict=True) if k),
                              *(output[i] for i in self._saved))
        ctx.mark_non_differentiable(*output[self.outputs:])

    def _backward(self, ctx, *grads):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if k else a for k, a in ctx.layout]
        outputs = list(saved)
        grads = grads[:self.outputs]
        if ctx.fused:
            return tuple(self._grads(inputs, outputs, grads, ctx.needs_input_grad))
        return self._recompute(inputs, grads, ctx.needs_input_grad)

    def _recompute(self, inputs, grads, needs_input_grad):
        """The torch path's gradients, recomputed under autograd (the fallback's backward)."""
        with torch.enable_grad():
            leaves = [a.detach().requires_grad_() if need else a
                      for a, need in zip(inputs, needs_input_grad, strict=True)]
            out = self.torch(*leaves)
            wrt = [a for a, need in zip(leaves, needs_input_grad, strict=True) if need]
            got = iter(torch.autograd.grad(out, wrt, grads, allow_unused=True, materialize_grads=True))
        return tuple(next(got) if need else None for need in needs_input_grad)
