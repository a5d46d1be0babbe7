"""Speed of attnzoo's attention ops and models, as ratios measured side by side in one run.

Ops, on the shapes of the models that use them (captured from a forward of each model): attnzoo's dispatched
op ("ours": the fused Triton kernel on CUDA, the best PyTorch path elsewhere) against other ways of computing
the same thing, forward and forward+backward. Sparse attention at several keep rates against dense
``F.scaled_dot_product_attention`` (how its time falls with the keep rate). Models: img/s of attnzoo's model
against timm's own class at the same size, inference and a training step (forward+backward). Input pipeline:
training images/s of attnzoo's loader against timm's ``create_loader`` on the same folder (``--loader-data``).

Two suites, chosen by the device (``--suite`` overrides):

- ``cpu`` (fp32): ops against the op's own `torch` path and its eager `reference`; the sparse sweep on DeiT-S's
  196 patch tokens; models eager.
- ``gpu`` (bf16): ops against SDPA with the same bias as ``attn_mask`` (the op's `torch` path for window, halo and
  sparse attention; channel attention as SDPA over the transposed maps), FlexAttention (compiled, a block mask
  for the windows / neighbourhoods / kept keys and the bias as ``score_mod``, inputs laid out for it outside the
  timed call) and NATTEN where it is installed and computes the same thing (window attention without a bias),
  plus the `torch` path where that is neither; "vs best" is against the fastest of these. "forced triton" is the
  fused kernel forced: the same as ours unless the automatic choice took another path. The sparse sweep at 197
  tokens (DeiT-S) and 4096 (ViTDet). Models eager and compiled (``torch.compile``, ours and timm's alike), with
  the peak memory of each (``torch.cuda.max_memory_allocated``). ``--budget`` bounds the whole run: cases are run
  in order of importance and those that no longer fit are listed as skipped.

    python tools/benchmark.py                   # everything; fp32 on CPU, bf16 on CUDA
    python tools/benchmark.py --quick           # the small models only, shorter timing
    python tools/benchmark.py --op-models davit_tiny --models none --out results.json --md results.md
    python tools/benchmark.py --suite gpu --device cpu --dry-run    # build and check every GPU case, no timing
    python tools/benchmark.py --op-models none --models none --keep-rates none --loader-data /data/imagenet

Implementations are timed round-robin (a few calls of each, in alternating order, repeated; on CUDA between CUDA
events), so drifting clocks and other load hit every one alike; each figure is the median time per call. A
ratio above 1 means attnzoo is faster. Before timing, each alternative's forward is checked against ours.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import attnzoo  # (registers the models with timm)
from attnzoo.cli import tool_main
from attnzoo.common import atomic_write
from attnzoo.kernels import use_backend


@dataclass
class Row:
    group: str  # "op", "keep" or "model"
    name: str
    shape: str
    mode: str  # "fwd", "fwd+bwd", "infer", "train", "infer compiled", "train compiled"
    ms: dict[str, float] = field(default_factory=dict)
    mem_mib: dict[str, float] = field(default_factory=dict)  # peak memory of one call (CUDA)
    diff: dict[str, float] = field(default_factory=dict)  # max |alternative − ours| / max |ours|, forward
    errors: dict[str, str] = field(default_factory=dict)  # implementations that failed, and why

    def ratio(self, baseline: str) -> float | None:
        if baseline not in self.ms or "ours" not in self.ms:
            return None
        return self.ms[baseline] / self.ms["ours"]


class Budget:
    """Wall-clock seconds for the whole run; a case starts only while its estimated cost still fits. Each
    section may end early (``until``, a share of the whole), so that the later ones keep their part: time a
    section leaves unused passes on to the next."""

    def __init__(self, seconds: float | None):
        self.start = time.monotonic()
        self.seconds = seconds
        self.end = None if seconds is None else self.start + seconds
        self.skipped: list[str] = []

    def until(self, share: float) -> Budget:
        """This budget, ending once ``share`` of the whole run's time has passed; skips are recorded here."""
        part = Budget(None)
        part.end = None if self.end is None else self.start + share * self.seconds
        part.skipped = self.skipped
        return part

    def fits(self, what: str, cost: float = 0.0) -> bool:
        if self.end is None or time.monotonic() + cost < self.end:
            return True
        self.skipped.append(what)
        return False


def error_text(e: Exception) -> str:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fns: dict[str, Callable[[], object]], device: torch.device, min_seconds: float,
            errors: dict[str, str] | None = None) -> dict[str, float]:
    """Median milliseconds per call of each function, timed round-robin. A function that raises in its warm-up
    is dropped (its error recorded in ``errors``) rather than failing the run."""
    fns = dict(fns)
    for name, fn in list(fns.items()):  # warm-up (compilation, autotuning, allocator)
        try:
            fn()
            fn()
            sync(device)
        except Exception as e:  # noqa: BLE001  (one failing alternative must not end a one-shot GPU run)
            if errors is None:
                raise
            errors[name] = error_text(e)
            del fns[name]
    if not fns:
        return {}
    # calls per sample: on CUDA enough back-to-back calls to fill ~2 ms, so launch gaps do not dominate
    reps = dict.fromkeys(fns, 1)
    if device.type == "cuda":
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            reps[name] = max(1, min(50, round(2e-3 / max(time.perf_counter() - t0, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or min(len(t) for t in times.values()) < 4:
        order.reverse()  # alternate who goes first: the first call of a round runs on a different cache state
        events = []
        for name, fn in order:
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(reps[name]):
                    fn()
                end.record()
                events.append((name, begin, end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append(1e3 * (time.perf_counter() - t0))
        sync(device)
        for name, begin, end in events:
            times[name].append(begin.elapsed_time(end) / reps[name])
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory(fns: dict[str, Callable[[], object]], device: torch.device) -> dict[str, float]:
    """MiB allocated at the peak of one call of each function (CUDA only), weights and inputs included."""
    if device.type != "cuda":
        return {}
    peaks = {}
    for name, fn in fns.items():
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        peaks[name] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peaks


def rel_diff(a, b) -> float:
    a, b = as_tuple(a)[0].detach().float(), as_tuple(b)[0].detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


# ---------------------------------------------------------------------------------------------------- ops

# the models whose attention calls give the op shapes, at their default input size
OP_SOURCES = ["davit_tiny", "davit_base", "maxvit_tiny_tf_224", "halonet26t", "halonet50ts",
              "sparsifiner_deit_small_patch16_224", "ela_b_resnet18", "ulsam_mobilenetv2_100", "l2vit_tiny", "ravlt_t"]


def capture_op_calls(name: str, batch: int, device, dtype) -> list[tuple[str, tuple, dict]]:
    """Run `name` once and record every attnzoo op call it makes: (op, args, kwargs), with the real tensors.

    Models call the ops through names bound in their modules (``from ..kernels import window_attention``), and
    not always the model's own module (L²ViT's window blocks are DaViT's), so the name is wrapped in every
    attnzoo module that binds the public op, for the duration of one forward.
    """
    import timm

    model = timm.create_model(name).to(device, dtype).eval()
    public = {op: getattr(attnzoo.kernels, op) for op in attnzoo.kernels.__all__
              if op not in dir(attnzoo.kernels.dispatch)}
    bound = [(module, attr, op) for module in list(sys.modules.values())
             if getattr(module, "__name__", "").startswith("attnzoo.")
             and not module.__name__.startswith("attnzoo.kernels")
             for attr, op in public.items() if getattr(module, attr, None) is op]
    calls = []

    def recorder(op, fn):
        def record(*args, **kwargs):
            calls.append((op, args, kwargs))
            return fn(*args, **kwargs)
        return record

    try:
        for module, attr, op in bound:
            setattr(module, attr, recorder(attr, op))
        x = torch.randn(batch, 3, *model.pretrained_cfg["input_size"][1:], device=device, dtype=dtype)
        with torch.no_grad():
            model(x)
    finally:
        for module, attr, op in bound:
            setattr(module, attr, op)
    return calls


def as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def describe(args, kwargs) -> str:
    shapes = ["x".join(map(str, a.shape)) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return " ".join(shapes[:3]) + (" +bias" if len(shapes) > 3 else "")


def backend_call(op: str, backend: str | None) -> Callable:
    """The public op, on `backend` (None: the automatic choice)."""
    fn = getattr(attnzoo.kernels, op)

    def call(*args, **kwargs):
        with use_backend(backend) if backend else contextlib.nullcontext():
            return fn(*args, **kwargs)
    return call


@dataclass
class Impl:
    """One way of computing an op call: ``fn(*args, **kwargs)`` on inputs that ``prepare(args, kwargs)`` lays
    out for it once, outside the timed calls (default: the op's own). ``unprepare`` maps its output back to the
    op's layout, for the check against ours."""

    fn: Callable
    prepare: Callable[[tuple, dict], tuple[tuple, dict]] | None = None
    unprepare: Callable[[object], object] | None = None


def compiled(fn: Callable, compile_backend: str | None) -> Callable:
    """``fn`` under torch.compile (a FlexAttention call inside is then one fused kernel; its score_mod, defined
    in ``fn``, is traced with it rather than guarded on), or eager without a backend (the CPU dry run)."""
    return torch.compile(fn, backend=compile_backend) if compile_backend else fn


def window_flex(args, kwargs, compile_backend) -> Impl:
    """Window attention as FlexAttention: P consecutive windows packed into one sequence, a block-diagonal block
    mask (and the padded keys), the bias read in ``score_mod`` (and differentiated there)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q = args[0]
    B, H, N, D = q.shape
    bias, mask = kwargs.get("bias"), kwargs.get("mask")
    bias = bias[None] if bias is not None and bias.dim() == 3 else bias
    mask = mask[None] if mask is not None and mask.dim() == 1 else mask
    G = math.lcm(*(t.shape[0] for t in (bias, mask) if t is not None)) if bias is not None or mask is not None else 1
    # windows per sequence: a multiple of the bias/mask period dividing B, up to 4096 tokens
    P = max([p for p in range(G, B + 1, G) if B % p == 0 and p * N <= 4096] or [G])
    scale = kwargs.get("scale") or D ** -0.5

    def pack(t):
        return t.reshape(B // P, P, H, N, D).transpose(1, 2).reshape(B // P, H, P * N, D)

    def mask_mod(b, h, q_idx, kv_idx):
        same = q_idx // N == kv_idx // N
        if mask is None:
            return same
        return same & mask[(kv_idx // N) % mask.shape[0], kv_idx % N]

    block_mask = create_block_mask(mask_mod, None, None, P * N, P * N, device=q.device)

    def prepare(args, kwargs):
        return (*(pack(t) for t in args[:3]), *([] if bias is None else [bias])), {}

    def fn(q, k, v, bias=None):
        score_mod = None
        if bias is not None:
            def score_mod(score, b, h, q_idx, kv_idx):
                hb = h if bias.shape[1] > 1 else 0
                return score + bias[(q_idx // N) % bias.shape[0], hb, q_idx % N, kv_idx % N]
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)

    def unprepare(out):
        return out.reshape(B // P, H, P, N, D).transpose(1, 2).reshape(B, H, N, D)

    return Impl(compiled(fn, compile_backend), prepare, unprepare)


def window_natten(args, kwargs) -> Impl | None:
    """NATTEN's 2-D neighbourhood attention with the kernel as large as the window, on each window as its own
    s×s map: exactly window attention without a bias (None where NATTEN is not installed or that is not it)."""
    N = args[0].shape[2]
    side = math.isqrt(N)
    if importlib.util.find_spec("natten") is None or side * side != N or kwargs.get("bias") is not None \
            or kwargs.get("mask") is not None:
        return None
    import natten

    na2d = getattr(natten, "na2d", None) or natten.functional.na2d
    scale = kwargs.get("scale") or args[0].shape[-1] ** -0.5
    B, H, _, D = args[0].shape

    def prepare(args, kwargs):  # [B, H, N, D] → NATTEN's [B, s, s, H, D]
        return tuple(t.transpose(1, 2).reshape(B, side, side, H, D) for t in args[:3]), {}

    return Impl(lambda q, k, v: na2d(q, k, v, kernel_size=side, scale=scale), prepare,
                lambda out: out.reshape(B, N, H, D).transpose(1, 2))


def halo_flex(args, kwargs, compile_backend) -> Impl:
    """Halo attention as FlexAttention over the zero-padded key map: a block mask keeps each query block's
    (b + 2h)² neighbourhood; ``score_mod`` adds the relative logits q·height_rel and q·width_rel, computed in
    the call as the op does."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v, height_rel, width_rel, block, halo = args[:7]
    scale = kwargs.get("scale") or q.shape[-1] ** -0.5
    scale_pos = kwargs.get("scale_pos_embed", False)
    B, heads, Hq, Wq, D = q.shape
    H, W = k.shape[2:4]
    bq, win, Wp = Hq // (H // block), block + 2 * halo, W + 2 * halo

    def coords(q_idx, kv_idx):  # FlexAttention may evaluate indices past the ends of a partial block
        q_idx, kv_idx = q_idx.clamp(0, Hq * Wq - 1), kv_idx.clamp(0, (H + 2 * halo) * Wp - 1)
        yq, xq = q_idx // Wq, q_idx % Wq
        ky, kx = kv_idx // Wp - (yq // bq) * block, kv_idx % Wp - (xq // bq) * block  # in the query's window
        return yq % bq, xq % bq, ky, kx

    def mask_mod(b, h, q_idx, kv_idx):
        _, _, ky, kx = coords(q_idx, kv_idx)
        return (ky >= 0) & (ky < win) & (kx >= 0) & (kx < win)

    block_mask = create_block_mask(mask_mod, None, None, Hq * Wq, (H + 2 * halo) * Wp, device=q.device)

    def fn(q, k, v, height_rel, width_rel):
        qf = q.reshape(B, heads, Hq * Wq, D)
        rel_h, rel_w = qf @ height_rel.transpose(0, 1), qf @ width_rel.transpose(0, 1)  # [B, heads, Nq, 2win-1]

        def score_mod(score, b, h, q_idx, kv_idx):
            y, x, ky, kx = coords(q_idx, kv_idx)
            i, dy, dx = q_idx.clamp(0, Hq * Wq - 1), ky - y + win - 1, kx - x + win - 1
            pos = rel_h[b, h, i, dy.clamp(0, 2 * win - 2)] + rel_w[b, h, i, dx.clamp(0, 2 * win - 2)]
            return score + (pos * scale if scale_pos else pos)

        kp, vp = (F.pad(t, (0, 0, halo, halo, halo, halo)).flatten(2, 3) for t in (k, v))
        out = flex_attention(qf, kp, vp, score_mod=score_mod, block_mask=block_mask, scale=scale)
        return out.reshape(B, heads, Hq, Wq, -1)

    return Impl(compiled(fn, compile_backend), lambda args, kwargs: (args[:5], {}))


def sparse_flex(args, kwargs, compile_backend) -> Impl:
    """Sparse attention as FlexAttention: the kept keys as a dense [B, H, M, N] mask read by ``mask_mod`` (built
    outside the timed call, with its block mask)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attnzoo.kernels.sparse.reference import key_mask

    q, k, v, index = args[:4]
    keep = key_mask(index, k.shape[2])
    M, N = keep.shape[2:]

    def mask_mod(b, h, q_idx, kv_idx):  # FlexAttention may evaluate indices past the ends of a partial block
        return keep[b, h, q_idx.clamp(0, M - 1), kv_idx.clamp(0, N - 1)]

    block_mask = create_block_mask(mask_mod, q.shape[0], q.shape[1], M, N, device=q.device)
    scale = kwargs.get("scale") or q.shape[-1] ** -0.5
    return Impl(compiled(lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask, scale=scale),
                         compile_backend), lambda args, kwargs: (args[:3], {}))


def channel_sdpa(args, kwargs) -> Impl:
    """Channel attention as SDPA over the transposed maps: softmax(scale·kᵀv) qᵀ = SDPA(kᵀ, vᵀ, qᵀ)."""
    q = args[0]
    scale = kwargs.get("scale") or q.shape[-1] ** -0.5
    t = lambda x: x.transpose(-2, -1)  # noqa: E731
    return Impl(lambda q, k, v: t(F.scaled_dot_product_attention(t(k), t(v), t(q), scale=scale)),
                lambda args, kwargs: (args[:3], {}))


def op_impls(op: str, args: tuple, kwargs: dict, suite: str, compile_backend: str | None) -> dict[str, Impl]:
    """Ours and what it is compared with, for one captured call."""
    impls = {"ours": Impl(backend_call(op, None))}
    if suite == "cpu":
        return impls | {"torch": Impl(backend_call(op, "torch")), "reference": Impl(backend_call(op, "reference"))}
    if args[0].is_cuda:  # the fused kernel forced, to see it where the automatic choice takes another path
        impls["triton"] = Impl(backend_call(op, "triton"))
    if op in ("window_attention", "halo_attention", "sparse_attention"):
        impls["sdpa"] = Impl(backend_call(op, "torch"))  # their torch path is SDPA with the bias as attn_mask
        flex = {"window_attention": window_flex, "halo_attention": halo_flex, "sparse_attention": sparse_flex}[op]
        impls["flex"] = flex(args, kwargs, compile_backend)
        if op == "window_attention" and (natten := window_natten(args, kwargs)) is not None:
            impls["natten"] = natten
    else:
        impls["torch"] = Impl(backend_call(op, "torch"))
        if op == "channel_attention":
            impls["sdpa"] = channel_sdpa(args, kwargs)
    return impls


def pick_calls(calls, largest_only: bool):
    """The distinct calls of one model; with `largest_only` the largest call of each op (its first stage)."""
    distinct = {}
    for op, args, kwargs in calls:
        distinct.setdefault((op, describe(args, kwargs)), (op, args, kwargs))
    if not largest_only:
        return list(distinct.values())
    largest = {}
    for op, args, kwargs in distinct.values():
        if op not in largest or args[0].numel() > largest[op][1][0].numel():
            largest[op] = (op, args, kwargs)
    return list(largest.values())


def bench_ops(names, device, dtype, batch, min_seconds, suite="cpu", compile_backend=None, budget=None,
              dry_run=False, largest_only=False) -> Iterator[Row]:
    """Each distinct op call of the models (with `largest_only`, each model's largest call of each op): ours
    (the automatic backend) against the alternatives of :func:`op_impls`, forward and forward+backward (every
    float input differentiated; forward only for ops without a gradient)."""
    budget = budget or Budget(None)
    seen = set()
    for name in names:
        if not ours_registered(name):
            print(f"skipping op shapes of {name}: attnzoo does not provide it yet", file=sys.stderr)
            continue
        if not budget.fits(f"op shapes of {name}"):
            continue
        try:
            calls = capture_op_calls(name, batch, device, dtype)
        except Exception as e:  # noqa: BLE001  (the model's forward failed: its ops cannot be measured)
            yield Row("op", "(capture)", name, "fwd", errors={"ours": error_text(e)})
            continue
        for op, args, kwargs in pick_calls(calls, largest_only):
            shape = describe(args, kwargs)
            if (op, shape) in seen:
                continue
            seen.add((op, shape))
            if not budget.fits(f"{op} {name}: {shape}", cost=10.0):
                continue
            fwd, bwd = Row("op", op, f"{name}: {shape}", "fwd"), Row("op", op, f"{name}: {shape}", "fwd+bwd")
            try:
                impls = op_impls(op, args, kwargs, suite, compile_backend)
            except Exception as e:  # noqa: BLE001
                fwd.errors["setup"] = error_text(e)
                yield fwd
                continue
            inputs = {}
            for key, impl in impls.items():
                try:
                    inputs[key] = impl.prepare(args, kwargs) if impl.prepare else (args, kwargs)
                except Exception as e:  # noqa: BLE001
                    fwd.errors[key] = error_text(e)
            check_alternatives(impls, inputs, fwd)
            if dry_run:
                yield fwd
                continue
            with torch.no_grad():
                fns = {k: (lambda impl=impls[k], a=inputs[k]: impl.fn(*a[0], **a[1])) for k in inputs}
                fwd.ms = measure(fns, device, min_seconds, fwd.errors)
            yield fwd
            if op == "rollout_step":  # forward only: rollout runs under no_grad
                continue
            fns = {}
            for key, (a, kw) in inputs.items():
                if key in fwd.errors:
                    continue
                # every float input is differentiated (a bias too), as in training
                leaf = lambda t: t.detach().requires_grad_() if is_float(t) else t  # noqa: E731
                leaves, kw = [leaf(t) for t in a], {n: leaf(t) for n, t in kw.items()}
                grad_args = [t for t in (*leaves, *kw.values()) if is_float(t)]
                fns[key] = (lambda fn=impls[key].fn, leaves=leaves, kw=kw, grad_args=grad_args:
                            backward(fn(*leaves, **kw), grad_args))
            bwd.ms = measure(fns, device, min_seconds, bwd.errors)
            bwd.diff = fwd.diff
            yield bwd


def is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def backward(out, inputs):
    outs = as_tuple(out)
    return torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs])


def check_alternatives(impls: dict[str, Impl], inputs: dict, row: Row) -> None:
    """Each alternative's forward against ours (relative max difference, recorded); one that differs by more
    than the dtype can explain is dropped with that as its error, so no ratio compares unlike things."""
    with torch.no_grad():
        ours = impls["ours"].fn(*inputs["ours"][0], **inputs["ours"][1])
        # loose for bf16/fp16 (rounded logits of long sums differ by a few %): this catches unlike formulas
        tol = 1e-3 if as_tuple(ours)[0].dtype == torch.float32 else 0.1
        for key in [k for k in inputs if k != "ours"]:
            try:
                out = impls[key].fn(*inputs[key][0], **inputs[key][1])
                out = impls[key].unprepare(out) if impls[key].unprepare else out
                row.diff[key] = rel_diff(out, ours)
            except Exception as e:  # noqa: BLE001
                row.errors[key] = error_text(e)
                del inputs[key]
                continue
            if not row.diff[key] <= tol:
                row.errors[key] = f"differs from ours by {row.diff[key]:.3g} (relative max), more than {tol:g}"
                del inputs[key]


def bench_keep_rates(rates, device, dtype, batch, min_seconds, sizes=((6, 196, 196, 64),), budget=None,
                     dry_run=False) -> Iterator[Row]:
    """Sparsifiner's sparse attention at each keep rate against dense SDPA over all keys, forward and
    forward+backward: attention time vs keep rate. `sizes`: (heads, queries, keys, head dim), e.g. DeiT-S's
    patch queries (6, 196, 196, 64); an entry of 5 numbers leads with its own batch (ViTDet's 4096 tokens)."""
    from attnzoo.kernels import sparse_attention

    budget = budget or Budget(None)
    for size in sizes:
        b, (h, m, n, d) = (size[0], size[1:]) if len(size) == 5 else (batch, size)
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, h, m, d, generator=gen, device=device).to(dtype)
        k, v = (torch.randn(b, h, n, d, generator=gen, device=device).to(dtype) for _ in range(2))
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        grad = torch.randn_like(q)
        for rate in rates:
            keep = max(1, round(rate * n))
            shape = f"keep {rate:g} ({keep}/{n} keys): {b}x{h}x{m}x{d}"
            if not budget.fits(f"sparse_attention {shape}", cost=5.0):
                continue
            index = torch.rand(b, h, m, n, generator=gen, device=device).topk(keep, dim=-1).indices
            impls = {"ours": lambda *t, index=index: sparse_attention(*t, index),
                     "dense": F.scaled_dot_product_attention}
            row = Row("keep", "sparse_attention", shape, "fwd")
            if dry_run:
                with torch.no_grad():
                    impls["ours"](q, k, v)
                yield row
                continue
            with torch.no_grad():
                row.ms = measure({name: (lambda f=f, qkv=(q, k, v): f(*qkv)) for name, f in impls.items()}, device,
                                 min_seconds, row.errors)
            yield row
            row = Row("keep", "sparse_attention", shape, "fwd+bwd")
            row.ms = measure({name: (lambda f=f, x=leaves, g=grad: torch.autograd.grad(f(*x), x, g))
                              for name, f in impls.items()}, device, min_seconds, row.errors)
            yield row


# ------------------------------------------------------------------------------------------------- models

# attnzoo model -> what timm users run instead: timm's own class where timm has the model (the same weights),
# else the plain timm backbone the attnzoo model is built on, else the timm model of the same size and FLOPs that
# the paper compares against (Swin-T for L²ViT-T and RAVLT-S)
MODELS = {
    "davit_tiny": "timm.models.davit.davit_tiny",
    "davit_base": "timm.models.davit.davit_base",
    "maxvit_tiny_tf_224": "timm.models.maxxvit.maxvit_tiny_tf_224",
    "maxvit_base_tf_224": "timm.models.maxxvit.maxvit_base_tf_224",
    "halonet26t": "timm.models.byoanet.halonet26t",
    "halonet50ts": "timm.models.byoanet.halonet50ts",
    "sparsifiner_deit_small_patch16_224": "timm.models.deit.deit_small_patch16_224",
    "ela_b_resnet18": "timm.models.resnet.resnet18",
    "ela_s_resnet50": "timm.models.resnet.resnet50",
    "ulsam_mobilenetv2_100": "timm.models.efficientnet.mobilenetv2_100",
    "l2vit_tiny": "timm.models.swin_transformer.swin_tiny_patch4_window7_224",
    "ravlt_s": "timm.models.swin_transformer.swin_tiny_patch4_window7_224",
}
BASE_VARIANTS = ("davit_base", "maxvit_base_tf_224", "halonet50ts", "ela_s_resnet50")
# the GPU suite's models, most important first (timm's published compiled throughputs are for the first three)
GPU_MODELS = ("davit_tiny", "maxvit_tiny_tf_224", "halonet26t", "l2vit_tiny", "ravlt_s")
GPU_OP_SOURCES = ("davit_tiny", "maxvit_tiny_tf_224", "halonet26t", "l2vit_tiny", "ravlt_t",
                  "sparsifiner_deit_small_patch16_224", "ela_b_resnet18", "ulsam_mobilenetv2_100")
# estimated seconds of torch.compile for one model and pass, ours and timm's together: a compiled job starts
# only while this still fits the budget
COMPILE_COST = {"infer": 60.0, "train": 120.0}


def timm_counterpart(name: str) -> torch.nn.Module:
    module, fn = MODELS[name].rsplit(".", 1)
    return getattr(importlib.import_module(module), fn)()


def ours_registered(name: str) -> bool:
    import timm

    return timm.is_model(name) and timm.models.model_entrypoint(name).__module__.startswith("attnzoo.")


def model_pair(name: str, device, dtype) -> tuple[dict[str, torch.nn.Module], int]:
    """Ours and timm's model (with our weights where the state dicts match), and the input size."""
    import timm

    ours = timm.create_model(name)
    theirs = timm_counterpart(name)
    if set(theirs.state_dict()) == set(ours.state_dict()):
        theirs.load_state_dict(ours.state_dict())
    return {"ours": ours.to(device, dtype), "timm": theirs.to(device, dtype)}, ours.pretrained_cfg["input_size"][1:]


def bench_models(names, device, dtype, batch, min_seconds, compile_backend=None, budget=None,
                 dry_run=False) -> Iterator[Row]:
    """img/s of ours and timm's model, inference and a training step (forward+backward), eager and, with a
    ``compile_backend``, compiled. In order of cost: every model eager, then compiled inference model by model,
    then compiled training."""
    budget = budget or Budget(None)
    for name in names:
        if not ours_registered(name):
            print(f"skipping {name}: attnzoo does not provide it yet", file=sys.stderr)
    names = [n for n in names if ours_registered(n)]
    jobs = [(False, mode, name) for name in names for mode in ("infer", "train")]
    jobs += [(True, mode, name) for mode in ("infer", "train") for name in names] if compile_backend else []
    pairs = {}  # each model pair built once, for all its jobs
    for is_compiled, mode, name in jobs:
        label = f"{mode} compiled" if is_compiled else mode
        if not budget.fits(f"{name} {label}", cost=COMPILE_COST[mode] if is_compiled else 5.0):
            continue
        try:
            if name not in pairs:
                pairs[name] = model_pair(name, device, dtype)
        except Exception as e:  # noqa: BLE001
            yield Row("model", name, "", label, errors={"setup": error_text(e)})
            continue
        models, size = pairs[name]
        x = torch.randn(batch, 3, *size, device=device, dtype=dtype)
        shape = f"{batch}x3x{size[0]}x{size[1]} vs {MODELS[name].rsplit('.', 1)[1]}"
        row = Row("model", name, shape, label)
        for m in models.values():
            m.train(mode == "train")
        if is_compiled:
            models = {k: torch.compile(m, backend=compile_backend) for k, m in models.items()}
        if mode == "infer":
            fns = {k: (lambda m=m, x=x: infer(m, x)) for k, m in models.items()}
        else:
            fns = {k: (lambda m=m, x=x: m(x).float().mean().backward()) for k, m in models.items()}
        if dry_run:
            fns = {k: fn for k, fn in fns.items() if not (is_compiled and compile_backend == "inductor")}
            for fn in fns.values():
                fn()
            yield row
            continue
        row.ms = measure(fns, device, min_seconds, row.errors)
        row.mem_mib = peak_memory({k: fns[k] for k in row.ms}, device)
        for m in models.values():
            m.zero_grad(set_to_none=True)
        yield row
        del models, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()


def infer(model, x):
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------------------------------ input pipeline

def bench_loader(folder: Path, device, batch: int, workers: int, batches: int, budget=None,
                 dry_run=False) -> Iterator[Row]:
    """Training images per second delivered on ``device`` by attnzoo's loader (``attnzoo.engine``'s: seeded
    per-sample augmentation, the resumable sampler, persistent workers) and timm's ``create_loader`` (with its
    CUDA prefetcher on a GPU, as timm's train.py), both with the trainer's default augmentation at 224 px
    (RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25) over ``folder``'s train split. Each loader's
    workers start before the clock; the two are timed alternately, twice, the better round kept."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_loader

    from attnzoo.data import image_folder
    from attnzoo.engine import Run
    from attnzoo.engine.trainer import build_loaders, to_device
    from attnzoo.tasks.classification import train_transform

    budget = budget or Budget(None)
    if not budget.fits("input pipeline", cost=30.0):
        return
    args = argparse.Namespace(aa="rand-m9-mstd0.5-inc1", reprob=0.25, scale=(0.08, 1.0), batch_size=batch,
                              workers=workers, prefetch_factor=2, seed=0, data=str(folder))
    config = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
              "std": IMAGENET_DEFAULT_STD}
    dataset = image_folder(folder, "train", transform=train_transform(args, config))
    needed = (batches + 1) * batch
    row = Row("loader", "train loader", f"{folder.name}: {len(dataset)} images, {workers} workers, batch {batch}",
              "train")
    if len(dataset) < needed:
        row.errors["setup"] = f"{folder} has {len(dataset)} training images; {needed} needed"
        yield row
        return
    task = argparse.Namespace(shard_val=True, collate_fn=None)
    ours, _ = build_loaders(Run("none"), task, args, dataset, dataset)
    ours.sampler.set_epoch(0)
    theirs = create_loader(
        image_folder(folder, "train"), input_size=config["input_size"], batch_size=batch, is_training=True,
        use_prefetcher=device.type == "cuda", re_prob=args.reprob, scale=args.scale, auto_augment=args.aa,
        interpolation="bicubic", mean=config["mean"], std=config["std"], num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, device=device)
    loaders = {"ours": ours, "timm": theirs}
    if dry_run:
        for loader in loaders.values():
            next(iter(loader))
        yield row
        return
    times: dict[str, list[float]] = {k: [] for k in loaders}
    for _ in range(2):
        for name, loader in loaders.items():
            it = iter(loader)
            x, _ = next(it)  # the workers are up and have a batch ready: time the steady state
            start = time.perf_counter()
            for _ in range(batches):
                x, _ = next(it)
                x = to_device(x, device)
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3 / batches)
            del it
    row.ms = {k: min(v) for k, v in times.items()}
    yield row


# ------------------------------------------------------------------------------------------------- report

OP_BASELINES = ("triton", "torch", "sdpa", "flex", "natten", "reference")
NOT_ALTERNATIVES = ("triton", "reference")  # ours forced, and the eager formula: not in "vs best"


def _ratio(r: Row, key: str) -> str:
    ratio = r.ratio(key)
    return "–" if ratio is None else f"{ratio:.2f}x"


def ours_ms(r: Row) -> str:
    return f"{r.ms['ours']:.3f}" if "ours" in r.ms else "failed" if r.errors else "–"  # "–": not timed (dry run)


def batch_of(r: Row) -> int:
    """A loader row's batch size (its shape ends with "batch N")."""
    return int(r.shape.rsplit("batch ", 1)[1])


def markdown(rows: list[Row], batch: int, skipped: list[str] = ()) -> str:
    lines = []
    ops = [r for r in rows if r.group == "op"]
    if ops:
        present = [b for b in OP_BASELINES if any(b in r.ms or b in r.errors or b in r.diff for r in ops)]
        names = {"triton": "forced triton", "torch": "torch path", "sdpa": "SDPA", "flex": "FlexAttention",
                 "natten": "NATTEN", "reference": "reference"}
        best = len([b for b in present if b not in NOT_ALTERNATIVES]) > 1
        head = ["op", "model: q k v shapes", "pass", "ours ms", *(f"vs {names[b]}" for b in present)]
        head += ["vs best"] if best else []
        lines += ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
        for r in ops:
            cells = [r.name, r.shape, r.mode, ours_ms(r)]
            cells += [_ratio(r, b) for b in present]
            if best:
                others = [r.ms[b] for b in present if b in r.ms and b not in NOT_ALTERNATIVES]
                cells.append(f"{min(others) / r.ms['ours']:.2f}x" if others and "ours" in r.ms else "–")
            lines.append("| " + " | ".join(cells) + " |")
    keeps = [r for r in rows if r.group == "keep"]
    if keeps:
        lines += ["", "| op | keep rate: q k v shape | pass | ours ms | vs dense SDPA |", "|---|---|---|---:|---:|"]
        for r in keeps:
            lines.append(f"| {r.name} | {r.shape} | {r.mode} | {ours_ms(r)} | {_ratio(r, 'dense')} |")
    models = [r for r in rows if r.group == "model"]
    if models:
        memory = any(r.mem_mib for r in models)
        head = "| model | input vs timm model | pass | ours img/s | timm img/s | ours vs timm |"
        lines += ["", head + (" ours MiB | timm MiB |" if memory else ""),
                  "|---|---|---|---:|---:|---:|" + ("---:|---:|" if memory else "")]
        for r in models:
            ips = [f"{1e3 * batch / r.ms[k]:.1f}" if k in r.ms else "failed" if r.errors else "–"
                   for k in ("ours", "timm")]
            line = f"| {r.name} | {r.shape} | {r.mode} | {ips[0]} | {ips[1]} | {_ratio(r, 'timm')} |"
            if memory:
                line += "".join(f" {r.mem_mib[k]:.0f} |" if k in r.mem_mib else " – |" for k in ("ours", "timm"))
            lines.append(line)
    loaders = [r for r in rows if r.group == "loader"]
    if loaders:
        lines += ["", "| input pipeline | data | ours img/s | timm img/s | ours vs timm |", "|---|---|---:|---:|---:|"]
        for r in loaders:
            ips = [f"{1e3 * batch_of(r) / r.ms[k]:.1f}" if k in r.ms else "failed" if r.errors else "–"
                   for k in ("ours", "timm")]
            lines.append(f"| {r.name} | {r.shape} | {ips[0]} | {ips[1]} | {_ratio(r, 'timm')} |")
    failures = [(r, k, e) for r in rows for k, e in r.errors.items()]
    if failures:
        lines += ["", "Failed or dropped (not in the ratios):", ""]
        lines += [f"- {r.name} {r.shape} {r.mode}, {k}: {e}" for r, k, e in failures]
    if skipped:
        lines += ["", "Skipped, past the time budget: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    from attnzoo.kernels.dispatch import forced_backend

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "attnzoo": attnzoo.__version__,
        "forced_backend": forced_backend(),
    }
    if importlib.util.find_spec("triton") is not None:
        import triton

        env["triton"] = triton.__version__
    return env


def loader_folder(data: str) -> Path:
    """``data``, or for ``shapes`` the shapes dataset (5 classes x 128 training images at 256 px), written once
    to the temp dir."""
    if data != "shapes":
        return Path(data)
    import tempfile

    from attnzoo.data import ShapesSpec, make_shapes_dataset

    return make_shapes_dataset(Path(tempfile.gettempdir()) / "attnzoo-benchmark-shapes",
                               ShapesSpec(train_per_class=128, val_per_class=1, image_size=256, seed=0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--suite", choices=["cpu", "gpu"], help="default: gpu on CUDA, cpu elsewhere")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--op-models", help="comma-separated models whose attention calls give the op shapes, or 'none' "
                                       f"(default: {', '.join(OP_SOURCES)}; "
                                       f"the gpu suite: {', '.join(GPU_OP_SOURCES)})")
    p.add_argument("--models", help=f"comma-separated, from {', '.join(MODELS)}; or 'none' "
                                    f"(the gpu suite: {', '.join(GPU_MODELS)})")
    p.add_argument("--keep-rates", default="1,0.5,0.25,0.1",
                   help="comma-separated keep rates of the sparse-attention sweep, or 'none'")
    p.add_argument("--batch", type=int, help="images per call (default 64 on CUDA, 4 on CPU)")
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    p.add_argument("--budget", type=float, help="seconds for the whole run; cases past it are skipped and listed")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the gpu suite (FlexAttention, compiled models); 'none': eager only")
    p.add_argument("--dry-run", action="store_true",
                   help="build every case and check the alternatives against ours, time nothing")
    p.add_argument("--loader-data", metavar="FOLDER",
                   help="run the input-pipeline case on this ImageNet-style folder ('shapes': a generated one of 640 "
                        "images at 256 px, in the temp dir); default: not run")
    p.add_argument("--loader-workers", type=int, default=4, help="loader processes of the input-pipeline case")
    p.add_argument("--loader-batch", type=int, default=32, help="batch of the input-pipeline case")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmark.json"))
    p.add_argument("--md", type=Path, default=Path("outputs/benchmark.md"))
    args = p.parse_args(argv)

    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device here")
    suite = args.suite or ("gpu" if device.type == "cuda" else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batch = args.batch or (64 if device.type == "cuda" else 4)
    min_seconds = 0.3 if args.quick else 1.0
    compile_backend = None if args.compile_backend == "none" else args.compile_backend
    import timm

    op_models = args.op_models or ",".join(GPU_OP_SOURCES if suite == "gpu" else OP_SOURCES)
    model_names = args.models or ",".join(GPU_MODELS if suite == "gpu" else MODELS)
    unknown = [n for n in op_models.split(",") if n != "none" and not timm.is_model(n)]
    unknown += [n for n in model_names.split(",") if n != "none" and n not in MODELS]
    if unknown:
        p.error(f"--models / --op-models: {unknown} are not among the benchmarked models")

    def chosen(arg: str) -> list[str]:
        names = [] if arg == "none" else arg.split(",")
        return [n for n in names if not (args.quick and n in BASE_VARIANTS)]

    budget = Budget(args.budget)
    if suite == "gpu":
        # FlexAttention and the compiled models recompile per shape: room for all of them
        for limit in ("cache_size_limit", "recompile_limit"):  # the older and the newer name
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 256))
    try:
        rates = [] if args.keep_rates == "none" else [float(r) for r in args.keep_rates.split(",")]
    except ValueError:
        p.error(f"--keep-rates {args.keep_rates!r}: expected comma-separated numbers in (0, 1], or 'none'")
    if not all(0 < r <= 1 for r in rates):
        p.error(f"--keep-rates {args.keep_rates}: each keep rate must be in (0, 1]")
    # the gpu suite: DeiT-S's 197 tokens, and ViTDet-B's 64×64 map (two images)
    sizes = ((6, 197, 197, 64), (2, 12, 4096, 4096, 64)) if suite == "gpu" else ((6, 196, 196, 64),)
    if args.quick and device.type == "cpu":
        sizes = tuple(s for s in sizes if s[-2] < 4096)
    # of the budget: the ops until 45% of it has passed, the sweep until 55%, the models the rest
    sections = {
        "ops": lambda: bench_ops(chosen(op_models), device, dtype, batch, min_seconds, suite, compile_backend,
                                 budget.until(0.45), args.dry_run, largest_only=suite == "gpu" and args.quick),
        "keep rates": lambda: bench_keep_rates(rates, device, dtype, batch, min_seconds, sizes, budget.until(0.55),
                                               args.dry_run),
        "models": lambda: bench_models(chosen(model_names), device, dtype, batch, min_seconds,
                                       compile_backend if suite == "gpu" else None, budget, args.dry_run),
    }
    if args.loader_data:
        sections["input pipeline"] = lambda: bench_loader(
            loader_folder(args.loader_data), device, args.loader_batch, args.loader_workers,
            batches=5 if args.quick else 15, budget=budget, dry_run=args.dry_run)
    env = environment(device, dtype) | {"suite": suite, "batch": batch, "dry_run": args.dry_run}
    header = (f"{env['device']}, {env['dtype']}, torch {env['torch']}, triton {env.get('triton', '–')}, "
              f"{env['cpu_threads']} CPU threads, batch {batch}, {suite} suite\n\n")
    rows, failed = [], {}

    def save() -> str:  # after every row, so a run stopped or crashed midway keeps what it measured
        table = markdown(rows, batch, budget.skipped)
        report = {"environment": env, "rows": [r.__dict__ for r in rows], "skipped": budget.skipped,
                  "failed_sections": failed}
        for path, text in ((args.out, json.dumps(report, indent=1)), (args.md, header + table)):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, text)
        return table

    for section, run in sections.items():
        try:
            for row in run():
                rows.append(row)
                save()
        except Exception as e:  # noqa: BLE001  (a section's failure must not lose the others' results)
            failed[section] = f"{type(e).__name__}: {e}"
            print(f"{section} failed: {failed[section]}", file=sys.stderr)
    table = save()
    print(header + table + "".join(f"\n{k} failed: {v}" for k, v in failed.items()))
    print(f"wrote {args.out} and {args.md}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(tool_main("benchmark.py", main))
