"""Ahead-of-time compile check of the fused Triton kernels, for real GPUs, on a machine without one.

Two steps:

1. :func:`capture` records every Triton kernel launch made inside it (kernel, Triton signature, constexprs,
   alignment attributes, num_warps, num_stages) *without running the kernel*: outputs stay as allocated.
   :func:`capture_models` runs the project's models forward and backward inside it, on the meta device (no
   arithmetic at all, so an 800×1333 DaViT costs a fraction of a second), with the triton backend forced and the
   launch configured for a given :class:`~attnzoo.kernels._triton.Target`. While capturing, the ops configure
   their launches exactly as on a GPU: the kernel modules' ``interpreting()`` reads False (no interpreter-only
   block size or fp32 dot), while the routing (``dispatch``, the registered ops) sees the interpreter and takes
   the fused path on CPU/meta tensors; registered ``attnzoo::`` ops run their implementation on meta tensors
   (not their fake one).
2. :func:`compile_reports` compiles each captured launch with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", arch, 32))`` in worker processes (Triton in compile-only mode, no interpreter) and
   reads what ptxas reports (registers, spill bytes, stack), the shared memory Triton allocates, and whether the
   PTX uses tensor cores (``mma.sync``; ``wgmma`` on sm_90a). Results are cached on disk, keyed by the kernel's
   source hash (Triton's ``JITFunction.cache_key``, which covers the jit functions it calls) and the launch.

As a script, from any worktree (it imports whichever ``attnzoo`` is first on the path)::

    PYTHONPATH=$PWD python attnzoo/kernels/aot.py --op window --dtype bf16 --target sm_90a
    python attnzoo/kernels/aot.py --readme README.md        # the README's kernel table

prints one row per kernel configuration and target and exits non-zero when any fails :func:`problems`
(``--help`` for the filters).
"""
from __future__ import annotations

if __name__ == "__main__":  # as a script: the compile workers must not interpret; the capture runs as the tests do
    import os
    import sys

    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # this folder's modules (dispatch.py, window/, ...) are attnzoo's, not top-level ones
    if "--worker" in sys.argv:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = "1"

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnzoo
from attnzoo.kernels import use_backend
from attnzoo.kernels._triton import SM90, TARGETS, Target, use_target

TIME_LIMIT_S = 60.0  # a compile over this (CPU seconds) fails the check, and its worker is killed
WALL_FACTOR = 4      # ... or once it has taken this many times as long in wall time
CACHE_VERSION = 3  # of the Report fields; older cached reports are recompiled
CACHE_DIR = Path(os.environ.get("ATTNZOO_AOT_CACHE", Path.home() / ".cache" / "attnzoo" / "aot"))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# kernels whose dot products must run on tensor cores (the elementwise gating kernels have none), for data in
# these dtypes: fp32 data takes the exact (ieee) fp32 dot unless torch allows tf32, and that has no MMA
ATTENTION_OPS = ("window", "halo", "linear", "sparse", "channel", "rollout")
TENSOR_CORE_DTYPES = ("fp16", "bf16")
_MARK = "@@aot "  # prefix of the worker's protocol lines (Triton and ptxas may print too)


# ----------------------------------------------------------------------------------------------- capture
@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel configuration, as Triton would compile it for ``target`` (``sm_80`` / ``sm_90a``).

    ``constexprs`` and ``attrs`` are keyed by argument index, as Triton's ``ASTSource`` takes them: constexprs
    include the runtime values Triton specializes (integers equal to 1, ``None`` pointers); attrs the 16-byte
    divisibility of pointers and integers. ``params`` are the kernel's declared ``tl.constexpr`` parameters.
    """

    kernel: str                       # "module:qualname" of the jit function
    target: str
    signature: tuple                  # ((arg name, Triton type), ...)
    constexprs: tuple                 # ((index, value), ...)
    attrs: tuple                      # ((index, ((attr, value), ...)), ...)
    num_warps: int
    num_stages: int
    options: tuple = ()               # other launch options passed explicitly, ((name, value), ...)
    declared: tuple = ()              # indices of the kernel's declared tl.constexpr parameters

    @property
    def op(self) -> str:
        """The attnzoo op folder the kernel lives in (``window``, ``halo``, ...)."""
        module = self.kernel.split(":")[0].split(".")
        return module[2] if module[:2] == ["attnzoo", "kernels"] and len(module) > 2 else module[-1]

    @property
    def name(self) -> str:
        return self.kernel.split(":")[1]

    @property
    def params(self) -> tuple:
        """((name, value), ...) of the declared constexprs (block sizes, flags)."""
        return tuple((self.signature[i][0], v) for i, v in self.constexprs if i in self.declared)

    @property
    def dtype(self) -> str:
        """The floating dtype of the first pointer argument that has one (the kernel's data)."""
        for _, ty in self.signature:
            if ty in ("*fp16", "*bf16", "*fp32"):
                return ty[1:]
        return "-"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["constexprs"] = [[i, _encode(v)] for i, v in self.constexprs]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Launch:
        return cls(kernel=d["kernel"], target=d["target"], signature=tuple(map(tuple, d["signature"])),
                   constexprs=tuple((i, _decode(v)) for i, v in d["constexprs"]),
                   attrs=tuple((i, tuple(map(tuple, a))) for i, a in d["attrs"]),
                   num_warps=d["num_warps"], num_stages=d["num_stages"], options=tuple(map(tuple, d["options"])),
                   declared=tuple(d["declared"]))

    def key(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


def _encode(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    import triton.language as tl
    if isinstance(v, tl.dtype):
        return {"dtype": v.name}
    raise TypeError(f"aot: cannot record the constexpr value {v!r} ({type(v).__name__})")


def _decode(v):
    if isinstance(v, dict):
        import triton.language as tl
        return getattr(tl, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(v["dtype"], v["dtype"]))
    return v


class Capture:
    """The launches recorded by :func:`capture`: ``launches`` maps each unique :class:`Launch` to the labels
    (see :meth:`label`) under which it was seen, in first-seen order."""

    def __init__(self, target: Target):
        self.target = target
        self.launches: dict[Launch, list[str]] = {}
        self._label = ""

    @contextlib.contextmanager
    def label(self, text: str) -> Iterator[None]:
        previous, self._label = self._label, text
        try:
            yield
        finally:
            self._label = previous

    def record(self, fn, args, kwargs) -> None:
        launch = _launch_of(fn, args, kwargs, self.target)
        seen = self.launches.setdefault(launch, [])
        if self._label and self._label not in seen:
            seen.append(self._label)


_BINDERS: dict = {}  # (Python function, arch) -> (JITFunction, backend, Triton's argument binder)


def _launch_of(fn, args, kwargs, target: Target) -> Launch:
    """The Launch Triton would compile for ``fn(*args, **kwargs)`` on ``target``: Triton's own binder and
    argument packing, with the CUDA backend's specialization rules."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    python_fn = fn.fn  # an InterpretedFunction or a JITFunction both keep the Python function
    key = (python_fn, target.arch)
    if key not in _BINDERS:
        jit = fn if isinstance(fn, JITFunction) else JITFunction(python_fn)
        backend = CUDABackend(GPUTarget("cuda", target.arch, 32))
        _BINDERS[key] = jit, backend, create_function_from_signature(jit.signature, jit.params, backend)
    jit, backend, binder = _BINDERS[key]
    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    names = [p.name for p in jit.params]
    explicit = tuple(sorted((k, v) for k, v in kwargs.items()
                            if k not in names and k not in ("num_warps", "num_stages", "debug")))
    return Launch(
        kernel=f"{python_fn.__module__}:{python_fn.__qualname__}",
        target=target.name,
        signature=tuple(signature.items()),
        constexprs=tuple(sorted((k[0], v) for k, v in constexprs.items())),
        attrs=tuple(sorted((k[0], tuple(map(tuple, v))) for k, v in attrs.items())),
        num_warps=options.num_warps,
        num_stages=options.num_stages,
        options=explicit,
        declared=tuple(i for i, p in enumerate(jit.params) if p.is_constexpr),
    )


@contextlib.contextmanager
def capture(target: Target = SM90) -> Iterator[Capture]:
    """Record, and skip, every Triton kernel launch inside the block; launches are configured for ``target``.

    Works on CPU or meta tensors with the triton backend forced (``use_backend("triton")``): the kernels are
    never run, so their outputs keep whatever ``torch.empty`` gave them. Autotuned kernels record every config.
    """
    import triton.experimental.gluon  # noqa: F401 - imported by the specialization; must see the interpreter
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    cap = Capture(target)

    def run(self, *args, grid, warmup, **kwargs):
        cap.record(self, args, kwargs)

    def autotuned(self, *args, **kwargs):
        for config in self.configs:
            self.fn.run(*args, **{**kwargs, **config.all_kwargs()})

    saved = {(cls, "run"): cls.run for cls in (InterpretedFunction, JITFunction, Autotuner)}
    # The launch configuration sees a GPU: every kernel module's own `interpreting` (imported by name from
    # dispatch) reads False, so no interpreter-only block size or fp32 dot is captured...
    configuring = [m for name, m in list(sys.modules.items())
                   if name.startswith("attnzoo.kernels.") and name not in _ROUTING_MODULES
                   and callable(getattr(m, "interpreting", None))]
    saved.update({(m, "interpreting"): m.interpreting for m in configuring})
    saved_env = os.environ.get("TRITON_INTERPRET")
    try:
        InterpretedFunction.run = JITFunction.run = run
        Autotuner.run = autotuned
        for m in configuring:
            m.interpreting = _not_interpreting
        # ...while the routing (dispatch, the registered ops' fallback) lets the fused path take CPU/meta tensors
        os.environ["TRITON_INTERPRET"] = "1"
        with use_target(target), _AttnzooOpsRunTheirKernels():
            yield cap
    finally:
        for (owner, attr), fn in saved.items():
            setattr(owner, attr, fn)
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


_ROUTING_MODULES = ("attnzoo.kernels.dispatch", "attnzoo.kernels._op")  # decide where an op runs, not how


def _not_interpreting() -> bool:
    return False


class _AttnzooOpsRunTheirKernels(TorchDispatchMode):
    """Runs the implementation of every registered ``attnzoo::`` op even on meta tensors, whose dispatch would
    otherwise go to the op's fake implementation and launch nothing."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._library.custom_ops import OPDEFS
        opdef = OPDEFS.get(func._schema.name) if func.namespace == "attnzoo" else None
        if opdef is not None:
            return opdef._init_fn(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


# -------------------------------------------------------------------------------------------- the models
@dataclasses.dataclass(frozen=True)
class ModelCase:
    """A model whose fused-op launches the check compiles: ``build()`` makes it (on the current default
    device), ``size`` is its input (H, W), None for the model's default; ``run(model, x)`` what to run, by
    default :func:`train_and_eval`."""

    name: str
    build: Callable[[], torch.nn.Module]
    size: tuple[int, int] | None = None
    run: Callable[[torch.nn.Module, torch.Tensor], None] | None = None

    @property
    def label(self) -> str:
        return self.name if self.size is None else f"{self.name}@{self.size[0]}x{self.size[1]}"


def _timm(name: str, **kwargs) -> Callable[[], torch.nn.Module]:
    import timm
    return lambda: timm.create_model(name, **kwargs)


def _dcal() -> torch.nn.Module:
    import timm

    from attnzoo.heads.dcal import DCAL
    return DCAL(timm.create_model("deit_small_patch16_224"))


def _dcal_rollout(model: torch.nn.Module, x: torch.Tensor) -> None:
    """DCAL's attention rollout over its backbone's own (q, k) of every layer. Not through DCAL.forward, whose
    rollout opens ``torch.autocast(q.device.type)``, which has no meta device type."""
    from attnzoo.kernels import rollout_step
    model.eval()
    with torch.no_grad():
        _, _, queries_keys = model._self_attention(x)
        r = x.new_zeros(x.shape[0], queries_keys[0][0].shape[2], dtype=torch.float32)
        for q, k, scale in queries_keys:
            rollout_step(q, k, r, scale)


# issue 13 item 3: each model at its default size, DaViT at a detection size, MaxViT at 384
MODEL_CASES = (
    ModelCase("davit_tiny", _timm("davit_tiny")),
    ModelCase("davit_tiny", _timm("davit_tiny"), (800, 1333)),
    ModelCase("maxvit_tiny_tf_224", _timm("maxvit_tiny_tf_224")),
    ModelCase("maxvit_tiny_tf_384", _timm("maxvit_tiny_tf_384")),
    ModelCase("halonet26t", _timm("halonet26t")),
    ModelCase("l2vit_tiny", _timm("l2vit_tiny")),
    ModelCase("ravlt_t", _timm("ravlt_t")),
    ModelCase("sparsifiner_deit_small_patch16_224", _timm("sparsifiner_deit_small_patch16_224")),
    ModelCase("ela_b_resnet18", _timm("ela_b_resnet18")),
    ModelCase("ulsam_mobilenetv2_100", _timm("ulsam_mobilenetv2_100")),
    ModelCase("dcal_deit_small_patch16_224", _dcal, run=_dcal_rollout),  # DCAL's rollout on a DeiT-S
)


@contextlib.contextmanager
def _meta_values() -> Iterator[None]:
    """Value reads on meta tensors (an op's index-range check) see 0: the capture has shapes, no values."""
    item = torch.Tensor.item

    def meta_item(self):
        return 0 if self.is_meta else item(self)

    torch.Tensor.item = meta_item
    try:
        yield
    finally:
        torch.Tensor.item = item


def train_and_eval(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Training forward and backward (of the output's sum), then an eval forward."""
    model.train()
    model(x).float().sum().backward()
    model.eval()
    with torch.no_grad():
        model(x)


def run_case(case: ModelCase, dtype: torch.dtype, batch: int = 2, device: str = "meta") -> None:
    """Run ``case`` in ``dtype`` with the triton backend forced."""
    torch.manual_seed(0)
    with torch.device(device):
        model = case.build().to(dtype)
        cfg = getattr(model, "pretrained_cfg", None) or model.backbone.pretrained_cfg  # DCAL: its ViT
        x = torch.randn(batch, 3, *(case.size or cfg["input_size"][1:]), dtype=dtype)
    with use_backend("triton"), _meta_values():
        (case.run or train_and_eval)(model, x)


def capture_models(cases: Iterable[ModelCase] = MODEL_CASES, dtypes: Iterable[str] = tuple(DTYPES),
                   targets: Iterable[Target] = TARGETS, batch: int = 2, device: str = "meta",
                   progress: Callable[[str], None] | None = None) -> dict[Launch, list[str]]:
    """The unique launches of ``cases`` in each dtype, configured for each target, with where each was seen
    (``"davit_tiny@800x1333 bf16"``). Batch 2 by default, so no batch-derived integer is specialized as 1."""
    found: dict[Launch, list[str]] = {}
    for target in targets:
        for case in cases:
            for dt in dtypes:
                t0 = time.perf_counter()
                with capture(target) as cap, cap.label(f"{case.label} {dt}"):
                    run_case(case, DTYPES[dt], batch, device)
                if progress:
                    progress(f"{target.name} {case.label} {dt}: {len(cap.launches)} launches, "
                             f"{time.perf_counter() - t0:.1f} s")
                if not cap.launches:
                    raise RuntimeError(f"aot: {case.label} in {dt} launched no Triton kernel; the check would "
                                       f"compile nothing for it (are its ops still dispatched to triton?)")
                for launch, labels in cap.launches.items():
                    seen = found.setdefault(launch, [])
                    seen.extend(lb for lb in labels if lb not in seen)
    return found


def cached_capture_models(cases: Iterable[ModelCase] = MODEL_CASES, dtypes: Iterable[str] = tuple(DTYPES),
                          targets: Iterable[Target] = TARGETS, batch: int = 2,
                          device: str = "meta") -> dict[Launch, list[str]]:
    """:func:`capture_models`, stored on disk keyed by attnzoo's source (every .py file), the versions of torch,
    timm and triton, and the arguments; processes that ask at once (pytest-xdist workers) capture only once."""
    import filelock
    import timm
    import triton

    cases, dtypes, targets = list(cases), list(dtypes), list(targets)
    h = hashlib.sha256(json.dumps([torch.__version__, timm.__version__, triton.__version__, [c.label for c in cases],
                                   dtypes, [t.name for t in targets], batch, device]).encode())
    package = Path(attnzoo.__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    path = CACHE_DIR / f"capture-{h.hexdigest()}.json"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path) + ".lock"):
        if path.exists():
            return {Launch.from_json(ln): seen for ln, seen in json.loads(path.read_text())}
        found = capture_models(cases, dtypes, targets, batch, device)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps([[ln.to_json(), seen] for ln, seen in found.items()]))
        tmp.replace(path)
    for old in sorted(CACHE_DIR.glob("capture-*.json"), key=lambda p: p.stat().st_mtime)[:-8]:
        with contextlib.suppress(OSError):  # keep the captures of the last few source versions
            old.unlink()
            Path(str(old) + ".lock").unlink()
    return found


def representative(launches: Iterable[Launch]) -> list[Launch]:
    """One launch per kernel, target, declared constexprs, dtypes and warps/stages: launches that differ only in
    runtime values (the divisibility of a stride, an integer that happens to be 1) are represented by the first."""
    chosen: dict[tuple, Launch] = {}
    for launch in launches:
        key = (launch.kernel, launch.target, launch.params, tuple(ty for _, ty in launch.signature if ty[0] == "*"),
               launch.num_warps, launch.num_stages, launch.options)
        chosen.setdefault(key, launch)
    return list(chosen.values())


# -------------------------------------------------------------------------------------------- compiling
@dataclasses.dataclass
class Report:
    """What compiling one launch gave. ``error`` is set when it did not compile (or ran out of time:
    ``timed_out``); the numbers are ptxas's, per thread, and Triton's shared memory per program."""

    launch: Launch
    error: str | None = None
    timed_out: bool = False
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    max_shared: int | None = None
    seconds: float | None = None      # CPU seconds of the compile (Triton and ptxas)
    dots: int | None = None           # tt.dot operations in the kernel's Triton IR
    dot_rows: int | None = None       # the most rows (M) of any of them: wgmma takes tiles of at least 64
    mma: bool = False                 # mma.sync in the PTX
    wgmma: bool = False               # wgmma.mma_async in the PTX (sm_90a)
    int32_products: int | None = None  # see int32_products_of_program_ids
    ptx_file: str | None = None       # the PTX, gzipped, in the cache
    cached: bool = False

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["launch"] = self.launch.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict) -> Report:
        d = dict(d)
        d["launch"] = Launch.from_json(d["launch"])
        return cls(**d)

    @property
    def tensor_cores(self) -> str:
        return "wgmma" if self.wgmma else "mma" if self.mma else "-"


def _target(name: str) -> Target:
    for t in TARGETS:
        if t.name == name:
            return t
    raise ValueError(f"aot: unknown target {name!r}; expected one of {', '.join(t.name for t in TARGETS)}")


def problems(report: Report, time_limit: float = TIME_LIMIT_S) -> list[str]:
    """Why ``report`` fails the check (empty when it passes): it must compile within ``time_limit`` CPU seconds,
    fit the target's shared memory, not spill, and (attention kernels on fp16/bf16 data that have a dot product:
    not an elementwise pre-pass such as a rowsum) use the target's tensor cores."""
    if report.timed_out:
        return [report.error or f"compile over {time_limit:.0f} s"]
    if report.error:
        return [f"does not compile: {report.error.splitlines()[0] if report.error else ''}"]
    found = []
    if report.seconds is not None and report.seconds > time_limit:
        found.append(f"compile took {report.seconds:.0f} s > {time_limit:.0f} s")
    if report.shared is not None and report.shared > report.max_shared:
        found.append(f"shared memory {report.shared} B > {report.max_shared} B")
    if report.spill_stores or report.spill_loads:
        found.append(f"spills {report.spill_stores} B stores / {report.spill_loads} B loads")
    if report.launch.op in ATTENTION_OPS and report.launch.dtype in TENSOR_CORE_DTYPES and report.dots != 0:
        # Hopper's wgmma is issued by a warpgroup (4 warps) on tiles of at least 64 rows: a kernel whose dots all
        # have fewer rows (the 32 × 32 state of L²ViT's D = 32 heads) or that runs on fewer warps (HaloNet's
        # 16-query strided blocks, 2 warps) runs them as mma.sync, the tensor-core instruction sm_90a shares
        # with sm_80
        wgmma_tiles = report.launch.num_warps >= 4 and (report.dot_rows is None or report.dot_rows >= 64)
        if report.launch.target.startswith("sm_90") and wgmma_tiles and not report.wgmma:
            found.append("no wgmma in the PTX")
        elif not (report.launch.target.startswith("sm_90") and wgmma_tiles) and not report.mma:
            found.append("no mma.sync in the PTX")
    return found


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
# the result type of a tt.dot in the Triton IR: `... -> tensor<64x32xf32>` (batched: tensor<2x64x32xf32>, whose
# rows are the second-last dim)
_DOT_ROWS = re.compile(r"tt\.dot [^\n]*-> tensor<(?:\d+x)?(\d+)x\d+x\w+>")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _jit_function(kernel: str):
    import importlib

    from triton.runtime.jit import JITFunction
    module, qualname = kernel.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    while not isinstance(obj, JITFunction):  # through triton.heuristics / triton.autotune wrappers
        obj = obj.fn
    return obj


def _cache_path(launch: Launch, source_key: str) -> Path:
    import triton
    digest = hashlib.sha256(f"{CACHE_VERSION}\n{triton.__version__}\n{source_key}\n{launch.key()}".encode()).hexdigest()
    return CACHE_DIR / f"{digest}.json"


def compile_report(launch: Launch, use_cache: bool = True) -> Report:
    """Compile ``launch`` for its target and read ptxas's report. Must run where Triton is not interpreting
    (the workers of :func:`compile_reports`, or ``aot.py --worker``)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("aot.compile_report: Triton is interpreting in this process; use compile_reports()")
    jit = _jit_function(launch.kernel)
    path = _cache_path(launch, jit.cache_key)
    if use_cache and path.exists():
        report = Report.from_json(json.loads(path.read_text()))
        report.cached = True
        return report

    target = _target(launch.target)
    src = ASTSource(jit, dict(launch.signature), dict(((i,), v) for i, v in launch.constexprs),
                    {(i,): [list(a) for a in attrs] for i, attrs in launch.attrs})
    options = dict(num_warps=launch.num_warps, num_stages=launch.num_stages, **dict(launch.options))
    report = Report(launch, max_shared=target.max_shared)
    log = _StdoutLog()
    start_cpu = _cpu_seconds()
    try:
        with knobs.nvidia.scope(), knobs.compilation.scope(), log:
            knobs.nvidia.dump_ptxas_log = True  # Triton's own ptxas -v run, printed to stdout
            knobs.compilation.always_compile = True
            kernel = triton.compile(src, target=GPUTarget("cuda", target.arch, 32), options=options)
    except Exception as e:  # noqa: BLE001 - any failure to compile is the finding
        report.error = f"{type(e).__name__}: {e}".strip()[:2000]
    else:
        ptx = kernel.asm["ptx"]
        report.int32_products = len(int32_products_of_program_ids(ptx))
        path.parent.mkdir(parents=True, exist_ok=True)
        ptx_file = path.with_suffix(".ptx.gz")
        ptx_file.write_bytes(gzip.compress(ptx.encode()))
        report.ptx_file = str(ptx_file)
        report.shared = kernel.metadata.shared
        report.dots = kernel.asm["ttir"].count("tt.dot ")
        report.dot_rows = max((int(m) for m in _DOT_ROWS.findall(kernel.asm["ttir"])), default=None)
        report.mma = "mma.sync" in ptx
        report.wgmma = "wgmma.mma_async" in ptx
        regs, spill = _PTXAS_REGS.findall(log.text), _PTXAS_SPILL.findall(log.text)
        if not regs or not spill:
            raise RuntimeError(f"aot: no ptxas -v report for {launch.kernel}; ptxas said:\n{log.text}")
        report.registers = int(regs[-1])
        report.stack, report.spill_stores, report.spill_loads = map(int, spill[-1])
    report.seconds = round(_cpu_seconds() - start_cpu, 2)
    path.parent.mkdir(parents=True, exist_ok=True)  # a compile error is as deterministic as a success
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report.to_json()))
    tmp.replace(path)
    return report


_PTX_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)\s+([^;]*);", re.M)
_PTX_REG = re.compile(r"%[a-z]+\d*|%ctaid\.[xyz]")


def int32_products_of_program_ids(ptx: str) -> list[str]:
    """The 32-bit integer multiplies in ``ptx`` of a value derived from a program id (``%ctaid``) by a value
    derived from a kernel parameter (a stride, a size): where an offset can wrap past 2³¹ (issue 20 item 4).
    A heuristic over the PTX's data flow, for a test to assert empty; products by constants are not listed."""
    instrs = [(op, [a.strip() for a in args.split(",")]) for op, args in _PTX_INSTR.findall(ptx)]
    pid, param = set(), set()
    changed = True
    while changed:  # to a fixed point: loops assign registers more than once
        changed = False
        for op, args in instrs:
            if not args or not args[0].startswith("%"):
                continue
            dst, srcs = args[0], " ".join(args[1:])
            regs = set(_PTX_REG.findall(srcs))
            for taint, hit in ((pid, any(r.startswith("%ctaid") for r in regs) or bool(regs & pid)),
                               (param, op.startswith("ld.param") or bool(regs & param))):
                if hit and dst not in taint:
                    taint.add(dst)
                    changed = True
    found = []
    for op, args in instrs:
        if re.match(r"(mul|mad)\.lo\.[su]32", op) and len(args) >= 3:
            a, b = args[1], args[2]
            if (a in pid and b in param) or (b in pid and a in param):
                found.append(f"{op} {', '.join(args)}")
    return found


class _StdoutLog:
    """Collect what Triton prints (the ptxas log) without letting it reach the protocol's stdout."""

    def __enter__(self):
        self._buf = __import__("io").StringIO()
        self._redirect = contextlib.redirect_stdout(self._buf)
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        self.text = self._buf.getvalue()


def _cpu_seconds() -> float:
    import resource
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _group_cpu_seconds(pgid: int) -> float | None:
    """CPU seconds used so far by every process of group ``pgid`` (a worker and its ptxas), None off Linux."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, found = 0, False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for pid in entries:
        if not pid.isdigit():
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state ppid pgrp ... utime(11) stime(12) cutime cstime
            total += sum(int(f) for f in fields[11:15])
            found = True
    return total / tick if found else None


class _Worker:
    """One compile process (``aot.py --worker``), fed one launch at a time over stdin."""

    def __init__(self):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        root = str(Path(attnzoo.__file__).resolve().parent.parent)  # the same attnzoo as this process
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     start_new_session=True)
        self.launch: Launch | None = None
        self.started = 0.0
        self.cpu0 = 0.0

    def submit(self, launch: Launch, use_cache: bool) -> None:
        self.launch, self.started = launch, time.monotonic()
        self.cpu0 = _group_cpu_seconds(self.proc.pid) or 0.0
        self.proc.stdin.write(json.dumps({"launch": launch.to_json(), "cache": use_cache}) + "\n")
        self.proc.stdin.flush()

    def read(self) -> Report | None:
        """The report, once its line has arrived (None for other output; raises if the worker died)."""
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"aot: the compile worker died (exit {self.proc.wait()}) on {self.launch.kernel}")
        if not line.startswith(_MARK):
            return None
        self.launch = None
        return Report.from_json(json.loads(line[len(_MARK):]))

    def usage(self) -> tuple[float, float | None]:
        """(wall seconds, CPU seconds of the worker's process group or None) of the current compile."""
        cpu = _group_cpu_seconds(self.proc.pid)
        return time.monotonic() - self.started, None if cpu is None else cpu - self.cpu0

    def over(self, limit: float) -> bool:
        """Past ``limit`` CPU seconds (the worker and its ptxas), or WALL_FACTOR times that of wall time (on a
        loaded machine a compile gets a fraction of a core; without /proc, wall time is all there is)."""
        wall, cpu = self.usage()
        return wall > WALL_FACTOR * limit or (cpu is not None and cpu > limit)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 9)
        self.proc.wait()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()


class CompilePool:
    """Up to ``jobs`` compile worker processes, kept between calls of :meth:`run` (a worker costs an import of
    torch and attnzoo); a compile past ``time_limit`` CPU seconds (or WALL_FACTOR times that of wall time) is
    killed and reported as timed out. Use as a context manager, or :meth:`close` it."""

    def __init__(self, jobs: int = 2, time_limit: float = TIME_LIMIT_S, use_cache: bool = True):
        self.jobs, self.time_limit, self.use_cache = jobs, time_limit, use_cache
        self.workers: list[_Worker] = []

    def __enter__(self) -> CompilePool:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(kill=exc_type is not None)

    def close(self, kill: bool = False) -> None:
        """Let the workers finish (or, with ``kill``, end them now: after an error or an interrupt)."""
        for w in self.workers:
            if kill:
                w.kill()
            else:
                w.close()
        self.workers = []

    def run(self, launches: Iterable[Launch], progress: Callable[[Report], None] | None = None) -> list[Report]:
        """The reports of ``launches``, in their order."""
        todo = list(dict.fromkeys(launches))
        results: dict[Launch, Report] = {}
        queue = list(reversed(todo))

        def done(launch: Launch, report: Report) -> None:
            results[launch] = report
            if progress:
                progress(report)

        while queue or any(w.launch for w in self.workers):
            idle = [w for w in self.workers if w.launch is None]
            while queue and len(idle) < len(queue) and len(self.workers) < self.jobs:
                self.workers.append(_Worker())
                idle.append(self.workers[-1])
            for w in idle:
                if queue:
                    w.submit(queue.pop(), self.use_cache)
            busy = [w for w in self.workers if w.launch is not None]
            ready, _, _ = select.select([w.proc.stdout for w in busy], [], [], 0.5)
            for w in busy:
                if w.proc.stdout in ready:
                    launch = w.launch
                    report = w.read()
                    if report is not None:
                        done(launch, report)
                elif w.over(self.time_limit):
                    wall, cpu = w.usage()
                    done(w.launch, Report(w.launch, timed_out=True, max_shared=_target(w.launch.target).max_shared,
                                          seconds=cpu, error=f"compile over {self.time_limit:.0f} s (killed after "
                                          f"{cpu or 0:.0f} CPU s, {wall:.0f} s wall)"))
                    w.kill()
                    self.workers.remove(w)
        return [results[launch] for launch in todo]


def compile_reports(launches: Iterable[Launch], jobs: int = 2, time_limit: float = TIME_LIMIT_S,
                    use_cache: bool = True, progress: Callable[[Report], None] | None = None) -> list[Report]:
    """Compile every launch in a :class:`CompilePool` of ``jobs`` processes; the reports in their order."""
    with CompilePool(jobs, time_limit, use_cache) as pool:
        return pool.run(launches, progress)


def _worker_main() -> None:
    import logging
    logging.disable(logging.WARNING)
    for line in sys.stdin:
        task = json.loads(line)
        launch = Launch.from_json(task["launch"])
        try:
            report = compile_report(launch, use_cache=task["cache"])
        except Exception as e:  # noqa: BLE001 - reported, the worker goes on
            report = Report(launch, error=f"{type(e).__name__}: {e}"[:2000],
                            max_shared=_target(launch.target).max_shared)
        sys.stdout.write(_MARK + json.dumps(report.to_json()) + "\n")
        sys.stdout.flush()


# ----------------------------------------------------------------------------------------------- tables
def _params_str(launch: Launch) -> str:
    return " ".join(f"{k}={v}" for k, v in launch.params)


def table(reports: Iterable[Report], time_limit: float = TIME_LIMIT_S) -> str:
    """A plain-text table, one row per report, with what fails in the last column (``i32 pid*``: how many
    32-bit products of a program id by a parameter the PTX has, see :func:`int32_products_of_program_ids`)."""
    rows = [("op", "kernel", "target", "dtype", "constexprs", "warps", "regs", "spill st/ld", "stack",
             "shared / max", "sec", "dots", "tc", "i32 pid*", "problems")]
    for r in reports:
        ln = r.launch
        rows.append((ln.op, ln.name, ln.target, ln.dtype, _params_str(ln), str(ln.num_warps),
                     _num(r.registers), f"{_num(r.spill_stores)}/{_num(r.spill_loads)}", _num(r.stack),
                     f"{_num(r.shared)} / {r.max_shared}", f"{r.seconds:.1f}" if r.seconds is not None else "-",
                     _num(r.dots), r.tensor_cores, _num(r.int32_products),
                     "; ".join(problems(r, time_limit)) or "ok"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _num(v) -> str:
    return "-" if v is None else str(v)


def markdown(reports: Iterable[Report], time_limit: float = TIME_LIMIT_S) -> str:
    """The README's table: per kernel and target, the worst case over its configurations (the tensor-core
    instructions of its fp16/bf16 configurations; "(not all)" when some lack them)."""
    worst: dict[tuple, dict] = {}
    for r in reports:
        ln = r.launch
        row = worst.setdefault((ln.op, ln.name, ln.target), dict(n=0, failing=0, regs=0, spill=0, shared=0,
                                                                 tc=set(), errors=0, slow=0))
        row["n"] += 1
        row["failing"] += bool(problems(r, time_limit))
        row["errors"] += r.error is not None and not r.timed_out
        row["slow"] += r.timed_out
        row["regs"] = max(row["regs"], r.registers or 0)
        row["spill"] = max(row["spill"], r.spill_stores or 0)
        row["shared"] = max(row["shared"], r.shared or 0)
        if ln.dtype in TENSOR_CORE_DTYPES:
            row["tc"].add(r.tensor_cores)
    lines = ["| op | kernel | target | configs | max registers | max spill stores (B) | max shared (B) | "
             "tensor cores (fp16/bf16) | failing |", "|---|---|---|---|---|---|---|---|---|"]
    for (op, name, target), row in sorted(worst.items()):
        tc = "/".join(sorted(row["tc"] - {"-"})) or "none"
        if "-" in row["tc"] and tc != "none":
            tc += " (not all)"
        if op not in ATTENTION_OPS:
            tc = "n/a"
        notes = [f"{row['errors']} do not compile"] * bool(row["errors"])
        notes += [f"{row['slow']} over {time_limit:.0f} s"] * bool(row["slow"])
        failing = f"{row['failing']}" + (f" ({', '.join(notes)})" if notes else "")
        lines.append(f"| {op} | `{name}` | {target} | {row['n']} | {row['regs']} | {row['spill']} | "
                     f"{row['shared']} | {tc} | {failing} |")
    return "\n".join(lines) + "\n"


def write_readme_table(readme: Path, table_md: str) -> None:
    """Replace what lies between ``<!-- kernels:start -->`` and ``<!-- kernels:end -->`` in ``readme``."""
    text = readme.read_text()
    start, end = "<!-- kernels:start -->\n", "<!-- kernels:end -->"
    if start not in text or end not in text:
        raise ValueError(f"aot: {readme} has no {start.strip()} ... {end} block for the kernel table")
    head, rest = text.split(start, 1)
    readme.write_text(head + start + table_md + end + rest.split(end, 1)[1])


# -------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", action="append", help="only this op's kernels (window, halo, linear, sparse, "
                        "rollout, channel, gating); repeatable")
    parser.add_argument("--kernel", action="append", help="only kernels whose name contains this; repeatable")
    parser.add_argument("--model", action="append", help="only model cases whose label contains this; repeatable")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES), help="default: all")
    parser.add_argument("--target", action="append", choices=[t.name for t in TARGETS], help="default: both")
    parser.add_argument("--all", action="store_true", help="every unique launch, not one per configuration that "
                        "differs only in runtime values (alignment, integers equal to 1)")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="CPU seconds per compile")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="meta", choices=["meta", "cpu"], help="where the models run")
    parser.add_argument("--no-cache", action="store_true", help=f"recompile everything (cache: {CACHE_DIR})")
    parser.add_argument("--json", type=Path, help="write every report here")
    parser.add_argument("--markdown", type=Path, help="write the README table to this file")
    parser.add_argument("--readme", type=Path, help="write the table into this README, between its "
                        "<!-- kernels:start --> and <!-- kernels:end --> lines")
    parser.add_argument("--seen", action="store_true", help="print where each launch was seen")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # end the workers too (see close)
    if args.worker:
        _worker_main()
        return 0

    cases = [c for c in MODEL_CASES if not args.model or any(m in c.label for m in args.model)]
    targets = [t for t in TARGETS if not args.target or t.name in args.target]
    t0 = time.perf_counter()
    dtypes = args.dtype or list(DTYPES)
    if args.no_cache:
        found = capture_models(cases, dtypes, targets, args.batch, args.device,
                               progress=lambda text: print(text, file=sys.stderr))
    else:
        found = cached_capture_models(cases, dtypes, targets, args.batch, args.device)
    launches = [ln for ln in found if (not args.op or ln.op in args.op)
                and (not args.kernel or any(k in ln.name for k in args.kernel))]
    if not args.all:
        launches = representative(launches)
    print(f"captured {len(found)} unique launches in {time.perf_counter() - t0:.1f} s; compiling {len(launches)}",
          file=sys.stderr)
    done = [0]

    def progress(r: Report) -> None:
        done[0] += 1
        print(f"[{done[0]}/{len(launches)}] {r.launch.name} {r.launch.target} {r.launch.dtype} "
              f"{'cached' if r.cached else r.error if r.timed_out else f'{r.seconds} s'}", file=sys.stderr)

    reports = compile_reports(launches, jobs=args.jobs, time_limit=args.time_limit, use_cache=not args.no_cache,
                              progress=progress)
    order = sorted(range(len(reports)), key=lambda i: (reports[i].launch.op, reports[i].launch.name,
                                                       reports[i].launch.target, reports[i].launch.dtype))
    reports = [reports[i] for i in order]
    print(table(reports, args.time_limit))
    if args.seen:
        for r in reports:
            print(f"{r.launch.name} {r.launch.target} {_params_str(r.launch)}: {', '.join(found[r.launch])}")
    failing = [r for r in reports if problems(r, args.time_limit)]
    print(f"\n{len(reports) - len(failing)} of {len(reports)} pass; {len(failing)} fail "
          f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps([dict(r.to_json(), seen=found[r.launch]) for r in reports], indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(reports, args.time_limit))
    if args.readme:
        write_readme_table(args.readme, markdown(reports, args.time_limit))
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
