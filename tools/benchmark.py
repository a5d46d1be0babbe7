"""Speed of attnzoo's attention ops and models, as ratios measured side by side in one run.

Ops, on the shapes of the models that use them: attnzoo's dispatched op ("ours": the fused Triton kernel on
CUDA, the best PyTorch path elsewhere) against ``F.scaled_dot_product_attention`` with the same bias and against
the eager formula, forward and forward+backward. Models: img/s of attnzoo's model against timm's own class at
the same size, inference and a training step (forward+backward).

    python tools/benchmark.py                   # everything; fp32 on CPU, bf16 on CUDA
    python tools/benchmark.py --quick           # fewer shapes and repeats
    python tools/benchmark.py --ops window --models davit_tiny --out results.json --md results.md

Implementations are timed round-robin (one call of each, repeated), so drifting clocks and other load hit
every one alike; each figure is the median call time. A ratio above 1 means attnzoo is faster.
"""
from __future__ import annotations

import argparse
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attnzoo  # noqa: E402  (registers the models with timm)
from attnzoo.kernels import window_attention  # noqa: E402


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
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or min(len(t) for t in times.values()) < 3:
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------------- ops

def window_eager(q, k, v, bias):
    """The formula as timm's eager paths write it."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
    return attn.softmax(-1) @ v


def window_sdpa(q, k, v, bias):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


def window_shapes(batch: int, quick: bool) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(label, [B·windows, heads, 49, 32]) for each stage of DaViT-T/B and MaxViT-T at 224 (window 7)."""
    shapes = []
    families = {
        "davit_tiny": (3, 6, 12, 24),  # DaViT-S has DaViT-T's widths: the same shapes
        "davit_base": (4, 8, 16, 32),
        "maxvit_tiny (block=grid)": (2, 4, 8, 16),  # block and grid windows share [B, H, 49, 32]
    }
    for family, heads in families.items():
        for stage, h in enumerate(heads):
            if quick and stage not in (0, 2):
                continue
            windows = (56 // 2**stage // 7) ** 2
            shapes.append((f"{family} s{stage}", (batch * windows, h, 49, 32)))
    return shapes


def bench_ops(device, dtype, batch, quick, min_seconds) -> list[Row]:
    rows = []
    for label, (B, H, N, D) in window_shapes(batch, quick):
        q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
        bias = torch.randn(H, N, N, device=device, dtype=dtype)
        impls = {
            "ours": lambda q, k, v, b: window_attention(q, k, v, bias=b),
            "sdpa": window_sdpa,
            "eager": window_eager,
        }
        with torch.no_grad():
            fwd = {name: (lambda f=f: f(q, k, v, bias)) for name, f in impls.items()}
            rows.append(Row("op", "window_attention", f"{label} {B}x{H}x{N}x{D}", "fwd",
                            measure(fwd, device, min_seconds)))
        leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
        grad = torch.randn_like(q)
        train = {name: (lambda f=f: torch.autograd.grad(f(*leaves), leaves, grad)) for name, f in impls.items()}
        rows.append(Row("op", "window_attention", f"{label} {B}x{H}x{N}x{D}", "fwd+bwd",
                        measure(train, device, min_seconds)))
    return rows


# ------------------------------------------------------------------------------------------------- models

# each family's smallest and base variant, with the timm module that holds timm's own implementation
MODELS = {
    "davit_tiny": "timm.models.davit",
    "davit_base": "timm.models.davit",
    "maxvit_tiny_tf_224": "timm.models.maxxvit",
    "maxvit_base_tf_224": "timm.models.maxxvit",
    "halonet26t": "timm.models.byoanet",
    "halonet50ts": "timm.models.byoanet",
}


def ours_registered(name: str) -> bool:
    import timm

    return timm.is_model(name) and timm.models.get_model_entrypoint(name).__module__.startswith("attnzoo.")


def bench_models(names, device, dtype, batch, min_seconds) -> list[Row]:
    import timm

    rows = []
    for name in names:
        if not ours_registered(name):
            print(f"skipping {name}: attnzoo does not provide it yet", file=sys.stderr)
            continue
        ours = timm.create_model(name)
        theirs = getattr(importlib.import_module(MODELS[name]), name)()
        theirs.load_state_dict(ours.state_dict())
        size = ours.pretrained_cfg["input_size"][1:]
        x = torch.randn(batch, 3, *size, device=device, dtype=dtype)
        models = {"ours": ours, "timm": theirs}
        for m in models.values():
            m.to(device, dtype)
        shape = f"{batch}x3x{size[0]}x{size[1]}"
        with torch.no_grad():
            for m in models.values():
                m.eval()
            ms = measure({k: (lambda m=m: m(x)) for k, m in models.items()}, device, min_seconds)
        rows.append(Row("model", name, shape, "infer", ms))
        for m in models.values():
            m.train()
        ms = measure({k: (lambda m=m: m(x).float().mean().backward()) for k, m in models.items()}, device, min_seconds)
        rows.append(Row("model", name, shape, "train", ms))
    return rows


# ------------------------------------------------------------------------------------------------- report

def markdown(rows: list[Row], batch: int) -> str:
    lines = []
    ops = [r for r in rows if r.group == "op"]
    if ops:
        lines += ["| op | shape [B, H, N, D] | pass | ours ms | vs SDPA | vs eager |", "|---|---|---|---:|---:|---:|"]
        for r in ops:
            lines.append(f"| {r.name} | {r.shape} | {r.mode} | {r.ms['ours']:.3f} | {r.ratio('sdpa'):.2f}x | "
                         f"{r.ratio('eager'):.2f}x |")
    models = [r for r in rows if r.group == "model"]
    if models:
        lines += ["", "| model | input | pass | ours img/s | timm img/s | ours vs timm |", "|---|---|---|---:|---:|---:|"]
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
    p.add_argument("--ops", default="window", help="comma-separated ops to time, or 'none'")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model names, or 'none'")
    p.add_argument("--batch", type=int, help="images per call (default 64 on CUDA, 4 on CPU)")
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmark.json"))
    p.add_argument("--md", type=Path, default=Path("outputs/benchmark.md"))
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batch = args.batch or (64 if device.type == "cuda" else 4)
    min_seconds = 0.3 if args.quick else 1.0
    unknown = set(args.models.split(",")) - set(MODELS) - {"none"}
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; choose from {', '.join(MODELS)}")
    unknown_ops = set(args.ops.split(",")) - {"window", "none"}
    if unknown_ops:
        p.error(f"--ops: unknown {sorted(unknown_ops)}; choose from window")

    rows = []
    if "window" in args.ops.split(","):
        rows += bench_ops(device, dtype, batch, args.quick, min_seconds)
    if args.models != "none":
        names = args.models.split(",")
        if args.quick:
            names = [n for n in names if not n.endswith(("_base", "base_tf_224", "50ts"))]
        rows += bench_models(names, device, dtype, batch, min_seconds)

    env = environment(device, dtype)
    table = markdown(rows, batch)
    header = f"{env['device']}, {env['dtype']}, torch {env['torch']}, {env['cpu_threads']} CPU threads\n\n"
    print(header + table)
    for path, text in ((args.out, json.dumps({"environment": env, "rows": [r.__dict__ for r in rows]}, indent=1)),
                       (args.md, header + table)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {args.out} and {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
