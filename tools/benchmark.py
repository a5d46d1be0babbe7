"""Speed of attnzoo's attention ops and models, as ratios measured side by side in one run.

Ops, on the shapes of the models that use them (captured from a forward of each model): attnzoo's dispatched
op ("ours": the fused Triton kernel on CUDA, the best PyTorch path elsewhere) against the op's own `torch` path
(``F.scaled_dot_product_attention`` with the same bias, or the best plain PyTorch) and its eager `reference`,
forward and forward+backward. Sparse attention at several keep rates against dense
``F.scaled_dot_product_attention`` on DeiT-S shapes (how its time falls with the keep rate). Models: img/s of
attnzoo's model against timm's own class at the same size, inference and a training step (forward+backward).

    python tools/benchmark.py                   # everything; fp32 on CPU, bf16 on CUDA
    python tools/benchmark.py --quick           # the small models only, shorter timing
    python tools/benchmark.py --op-models davit_tiny --models none --out results.json --md results.md

Implementations are timed round-robin (one call of each, in alternating order, repeated), so drifting clocks
and other load hit every one alike; each figure is the median call time. A ratio above 1 means attnzoo is faster.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import attnzoo  # (registers the models with timm)
from attnzoo.common import atomic_write
from attnzoo.kernels import use_backend


@dataclass
class Row:
    group: str  # "op" or "model"
    name: str
    shape: str
    mode: str  # "fwd", "fwd+bwd", "infer", "train"
    ms: dict[str, float] = field(default_factory=dict)

    def ratio(self, baseline: str) -> float | None:
        if baseline not in self.ms or "ours" not in self.ms:
            return None
        return self.ms[baseline] / self.ms["ours"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fns: dict[str, Callable[[], object]], device: torch.device, min_seconds: float) -> dict[str, float]:
    """Median milliseconds per call of each function, timed round-robin."""
    for fn in fns.values():  # warm-up (compilation, autotuning, allocator)
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or min(len(t) for t in times.values()) < 4:
        order.reverse()  # alternate who goes first: the first call of a round runs on a different cache state
        for name, fn in order:
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------------- ops

# the models whose attention calls give the op shapes, at their default input size
OP_SOURCES = ["davit_tiny", "davit_base", "maxvit_tiny_tf_224", "halonet26t", "halonet50ts",
              "sparsifiner_deit_small_patch16_224", "ela_b_resnet18", "ulsam_mobilenetv2_100", "l2vit_tiny", "ravlt_t"]


def capture_op_calls(name: str, batch: int, device, dtype) -> list[tuple[str, tuple, dict]]:
    """Run `name` once and record every attnzoo op call it makes: (op, args, kwargs), with the real tensors.

    Models call the ops through names bound in their module (``from ..kernels import window_attention``), so
    those names are wrapped for the duration of one forward.
    """
    import timm

    model = timm.create_model(name).to(device, dtype).eval()
    module = sys.modules[type(model).__module__]
    ops = [op for op in attnzoo.kernels.__all__ if op not in dir(attnzoo.kernels.dispatch) and hasattr(module, op)]
    calls = []

    def recorder(op, fn):
        def record(*args, **kwargs):
            calls.append((op, args, kwargs))
            return fn(*args, **kwargs)
        return record

    originals = {op: getattr(module, op) for op in ops}
    try:
        for op, fn in originals.items():
            setattr(module, op, recorder(op, fn))
        x = torch.randn(batch, 3, *model.pretrained_cfg["input_size"][1:], device=device, dtype=dtype)
        with torch.no_grad():
            model(x)
    finally:
        for op, fn in originals.items():
            setattr(module, op, fn)
    return calls


def as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def describe(args, kwargs) -> str:
    shapes = ["x".join(map(str, a.shape)) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return " ".join(shapes[:3]) + (" +bias" if len(shapes) > 3 else "")


def bench_ops(names, device, dtype, batch, min_seconds) -> list[Row]:
    """Each distinct op call of the models: ours (the automatic backend) against the op's own torch path
    (SDPA or the best plain PyTorch) and its reference formula, forward and forward+backward."""
    rows, seen = [], set()
    for name in names:
        if not ours_registered(name):
            print(f"skipping op shapes of {name}: attnzoo does not provide it yet", file=sys.stderr)
            continue
        for op, args, kwargs in capture_op_calls(name, batch, device, dtype):
            shape = describe(args, kwargs)
            if (op, shape) in seen:
                continue
            seen.add((op, shape))
            fn = getattr(attnzoo.kernels, op)

            def call(backend, args=args, kwargs=kwargs, fn=fn):
                with use_backend(backend) if backend else contextlib.nullcontext():
                    return fn(*args, **kwargs)

            impls = {"ours": None, "torch": "torch", "reference": "reference"}
            with torch.no_grad():
                ms = measure({k: (lambda b=b: call(b)) for k, b in impls.items()}, device, min_seconds)
            rows.append(Row("op", op, f"{name}: {shape}", "fwd", ms))

            leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                      for a in args]
            grad_args = [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
            grads = [torch.randn_like(o) for o in as_tuple(fn(*leaves, **kwargs))]

            def train(backend, fn=fn, leaves=leaves, kwargs=kwargs, grad_args=grad_args, grads=grads):
                with use_backend(backend) if backend else contextlib.nullcontext():
                    return torch.autograd.grad(as_tuple(fn(*leaves, **kwargs)), grad_args, grads)

            ms = measure({k: (lambda b=b: train(b)) for k, b in impls.items()}, device, min_seconds)
            rows.append(Row("op", op, f"{name}: {shape}", "fwd+bwd", ms))
    return rows


def bench_keep_rates(rates, device, dtype, batch, min_seconds) -> list[Row]:
    """Sparsifiner's sparse attention at each keep rate against dense SDPA over all keys, on DeiT-S's patch
    queries (6 heads, 196 tokens, head dim 64), forward and forward+backward: attention time vs keep rate."""
    import torch.nn.functional as F

    from attnzoo.kernels import sparse_attention

    h, n, d = 6, 196, 64
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(batch, h, n, d, generator=gen).to(device, dtype) for _ in range(3))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)
    rows = []
    for rate in rates:
        keep = max(1, round(rate * n))
        index = torch.rand(batch, h, n, n, generator=gen).topk(keep, dim=-1).indices.to(device)
        impls = {"ours": lambda *t, index=index: sparse_attention(*t, index), "dense": F.scaled_dot_product_attention}
        shape = f"keep {rate:g} ({keep}/{n} keys): {batch}x{h}x{n}x{d}"
        with torch.no_grad():
            ms = measure({name: (lambda f=f: f(q, k, v)) for name, f in impls.items()}, device, min_seconds)
        rows.append(Row("keep", "sparse_attention", shape, "fwd", ms))
        ms = measure({name: (lambda f=f: torch.autograd.grad(f(*leaves), leaves, grad)) for name, f in impls.items()},
                     device, min_seconds)
        rows.append(Row("keep", "sparse_attention", shape, "fwd+bwd", ms))
    return rows


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


def timm_counterpart(name: str) -> torch.nn.Module:
    module, fn = MODELS[name].rsplit(".", 1)
    return getattr(importlib.import_module(module), fn)()


def ours_registered(name: str) -> bool:
    import timm

    return timm.is_model(name) and timm.models.model_entrypoint(name).__module__.startswith("attnzoo.")


def bench_models(names, device, dtype, batch, min_seconds) -> list[Row]:
    import timm

    rows = []
    for name in names:
        if not ours_registered(name):
            print(f"skipping {name}: attnzoo does not provide it yet", file=sys.stderr)
            continue
        ours = timm.create_model(name)
        theirs = timm_counterpart(name)
        if set(theirs.state_dict()) == set(ours.state_dict()):
            theirs.load_state_dict(ours.state_dict())
        size = ours.pretrained_cfg["input_size"][1:]
        x = torch.randn(batch, 3, *size, device=device, dtype=dtype)
        models = {"ours": ours, "timm": theirs}
        for m in models.values():
            m.to(device, dtype)
        shape = f"{batch}x3x{size[0]}x{size[1]} vs {MODELS[name].rsplit('.', 1)[1]}"
        with torch.no_grad():
            for m in models.values():
                m.eval()
            ms = measure({k: (lambda m=m, x=x: m(x)) for k, m in models.items()}, device, min_seconds)
        rows.append(Row("model", name, shape, "infer", ms))
        for m in models.values():
            m.train()
        step = {k: (lambda m=m, x=x: m(x).float().mean().backward()) for k, m in models.items()}
        ms = measure(step, device, min_seconds)
        rows.append(Row("model", name, shape, "train", ms))
    return rows


# ------------------------------------------------------------------------------------------------- report

def markdown(rows: list[Row], batch: int) -> str:
    lines = []
    ops = [r for r in rows if r.group == "op"]
    if ops:
        lines += ["| op | model: q k v shapes | pass | ours ms | vs torch path | vs reference |",
                  "|---|---|---|---:|---:|---:|"]
        for r in ops:
            lines.append(f"| {r.name} | {r.shape} | {r.mode} | {r.ms['ours']:.3f} | {r.ratio('torch'):.2f}x | "
                         f"{r.ratio('reference'):.2f}x |")
    keeps = [r for r in rows if r.group == "keep"]
    if keeps:
        lines += ["", "| op | keep rate: q k v shape | pass | ours ms | vs dense SDPA |", "|---|---|---|---:|---:|"]
        for r in keeps:
            lines.append(f"| {r.name} | {r.shape} | {r.mode} | {r.ms['ours']:.3f} | {r.ratio('dense'):.2f}x |")
    models = [r for r in rows if r.group == "model"]
    if models:
        lines += ["", "| model | input vs timm model | pass | ours img/s | timm img/s | ours vs timm |",
                  "|---|---|---|---:|---:|---:|"]
        for r in models:
            lines.append(f"| {r.name} | {r.shape} | {r.mode} | {1e3 * batch / r.ms['ours']:.1f} | "
                         f"{1e3 * batch / r.ms['timm']:.1f} | {r.ratio('timm'):.2f}x |")
    return "\n".join(lines) + "\n"


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    from attnzoo.kernels.dispatch import forced_backend

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "attnzoo": attnzoo.__version__,
        "forced_backend": forced_backend(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--op-models", default=",".join(OP_SOURCES),
                   help="comma-separated models whose attention calls give the op shapes, or 'none'")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}; or 'none'")
    p.add_argument("--keep-rates", default="1,0.5,0.25,0.1",
                   help="comma-separated keep rates of the sparse-attention sweep, or 'none'")
    p.add_argument("--batch", type=int, help="images per call (default 64 on CUDA, 4 on CPU)")
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmark.json"))
    p.add_argument("--md", type=Path, default=Path("outputs/benchmark.md"))
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batch = args.batch or (64 if device.type == "cuda" else 4)
    min_seconds = 0.3 if args.quick else 1.0
    import timm

    unknown = [n for n in args.op_models.split(",") if n != "none" and not timm.is_model(n)]
    unknown += [n for n in args.models.split(",") if n != "none" and n not in MODELS]
    if unknown:
        p.error(f"--models / --op-models: {unknown} are not among the benchmarked models")

    def chosen(arg: str) -> list[str]:
        names = [] if arg == "none" else arg.split(",")
        return [n for n in names if not (args.quick and n in BASE_VARIANTS)]

    rows = bench_ops(chosen(args.op_models), device, dtype, batch, min_seconds)
    if args.keep_rates != "none":
        rows += bench_keep_rates([float(r) for r in args.keep_rates.split(",")], device, dtype, batch, min_seconds)
    rows += bench_models(chosen(args.models), device, dtype, batch, min_seconds)

    env = environment(device, dtype)
    table = markdown(rows, batch)
    header = f"{env['device']}, {env['dtype']}, torch {env['torch']}, {env['cpu_threads']} CPU threads\n\n"
    print(header + table)
    for path, text in ((args.out, json.dumps({"environment": env, "rows": [r.__dict__ for r in rows]}, indent=1)),
                       (args.md, header + table)):
        atomic_write(path, text)
    print(f"wrote {args.out} and {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
