"""`make gpu-check`: on a machine with a CUDA GPU, the fused kernels' CUDA tests (what `make test-cuda` runs) and
the GPU benchmark (`tools/benchmark.py --suite gpu --quick`), within one time budget (8 minutes by default, so
that it fits one short loan of an H100-class machine), written to outputs/gpu-check/: report.md and report.json
(GPU, torch and triton versions, the test summary with every failure, the benchmark's tables), beside the
pytest logs and the benchmark's own log, JSON and markdown.

    python tools/gpu_check.py [--budget 480] [--out outputs/gpu-check]
    python tools/gpu_check.py --probe      # only: is there a CUDA GPU? (exit 2 if not; needs no torch)
    python tools/gpu_check.py --dry-run -k window --bench-args "--op-models davit_tiny --models none"
                                           # the check itself on the CPU: the tests skip, the benchmark only
                                           # builds and checks its cases

Each step runs in its own process under a deadline: a kernel that hangs or crashes the CUDA context costs its
step, not the report. Without a GPU it says so and exits 2 before anything is set up.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = 2  # exit status without a GPU
TEST_SHARE = 0.5  # of the budget, at most, for the tests; the benchmark gets the rest
REPORT_RESERVE = 20  # seconds kept back for writing the report
CUDA_TESTS = "tests/kernels"  # every `cuda` test is there; collecting the whole suite costs time and, on a
# machine with only torch/triton/timm, collection errors (the detection tests need mmdet)
TEST_TIMEOUT = 150  # seconds for one test where pytest-timeout is installed (compiles included)
LARGE_TESTS_SECONDS = 75  # of the tests' share, for the tests past 2³¹ elements (run last, alone)


def probe() -> str | None:
    """Why this machine cannot run the GPU check, or None: nvidia-smi must list a GPU (no torch needed)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no NVIDIA driver here (nvidia-smi is not on the PATH)"
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return f"nvidia-smi lists no GPU: {(listed.stdout + listed.stderr).strip()[:300]}"
    return None


def refuse(reason: str) -> int:
    print(f"make gpu-check: needs a CUDA GPU, and {reason}. It compiles and tests the fused Triton kernels on the "
          "GPU and benchmarks them; without one, `make test` runs the kernels through Triton's interpreter.",
          file=sys.stderr)
    return NO_GPU


def run_step(cmd: list[str], log: Path, seconds: float) -> tuple[int | None, float]:
    """Run ``cmd`` with its output in ``log``; past ``seconds`` interrupt it (SIGINT: pytest still prints its
    summary), then kill it. Returns (exit status or None if it was stopped, seconds taken)."""
    start = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ATTNZOO_BACKEND")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=max(seconds, 1))
        except subprocess.TimeoutExpired:
            code = None
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return code, time.monotonic() - start


STATUS = r"(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)"
RESULT = re.compile(rf"^(\S+::\S+) {STATUS}\b")  # pytest -v
XDIST_RESULT = re.compile(rf"^\[gw\d+\] \[\s*\d+%\] {STATUS} (\S+::\S+)")  # pytest -v -n N
STARTED = re.compile(r"^(\S+::\S+) ?$")


def test_summary(log: str, code: int | None) -> dict:
    """Counts and failures from pytest's verbose log (which survives an interrupted run, unlike its XML), with
    or without xdist; ``unfinished``: the tests started and never finished (what was running at a deadline)."""
    results, started = {}, []
    for line in log.splitlines():
        if m := RESULT.match(line):
            results[m.group(1)] = m.group(2)
        elif m := XDIST_RESULT.match(line):
            results[m.group(2)] = m.group(1)
        elif m := STARTED.match(line):
            started.append(m.group(1))
    counts = {status: list(results.values()).count(status) for status in sorted(set(results.values()))}
    failures = [line for line in log.splitlines() if re.match(r"^(FAILED|ERROR) ", line)]
    code = 0 if code == 5 else code  # 5: no test selected (e.g. -k leaves none in a step), not a failure
    return {"exit": code, "stopped_at_deadline": code is None, "counts": counts, "failures": failures,
            "unfinished": [t for t in dict.fromkeys(started) if t not in results],
            "skip_reasons": [line for line in log.splitlines() if line.startswith("SKIPPED")]}


def merge(a: dict, b: dict) -> dict:
    """One summary of two pytest runs."""
    counts = {k: a["counts"].get(k, 0) + b["counts"].get(k, 0) for k in sorted({*a["counts"], *b["counts"]})}
    exits = [x["exit"] for x in (a, b)]
    return {"exit": None if None in exits else max(exits), "stopped_at_deadline": None in exits, "counts": counts,
            **{k: a[k] + b[k] for k in ("failures", "unfinished", "skip_reasons")}}


def environment() -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as e:
        env["triton"] = f"not importable: {e}"
    if not torch.cuda.is_available():  # --dry-run
        return env | {"gpu": "no GPU (dry run)", "capability": "-", "sms": 0, "memory_gib": 0, "nvidia_smi": "-"}
    props = torch.cuda.get_device_properties(0)
    env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
               memory_gib=round(props.total_memory / 2 ** 30, 1))
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                         capture_output=True, text=True)
    env["nvidia_smi"] = smi.stdout.strip()
    return env


def markdown(env: dict, tests: dict, bench: dict, bench_md: str, timings: dict) -> str:
    lines = ["# attnzoo GPU check", "",
             f"{env['gpu']} (sm_{env['capability'].replace('.', '')}, {env['sms']} SMs, {env['memory_gib']} GiB; "
             f"{env['nvidia_smi']}), torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
             f"Python {env['python']}.", "",
             "## CUDA tests (`pytest -m cuda`, as `make test-cuda`)", "",
             ", ".join(f"{n} {s.lower()}" for s, n in tests["counts"].items()) or "no test result", ""]
    if tests["stopped_at_deadline"]:
        lines += [f"Stopped at its deadline ({timings['tests']:.0f} s)"
                  + (f", while running {', '.join(f'`{t}`' for t in tests['unfinished'])}."
                     if tests["unfinished"] else "."), ""]
    elif tests["exit"] not in (0, None):
        lines += [f"pytest exited with status {tests['exit']}.", ""]
    lines += [f"- {f}" for f in tests["failures"]]
    lines += [f"- {s}" for s in dict.fromkeys(tests["skip_reasons"])]
    lines += ["", "## Benchmark (`tools/benchmark.py --suite gpu --quick`)", ""]
    if bench.get("exit") not in (0, None):
        lines += [f"The benchmark exited with status {bench['exit']} (see benchmark.log); what it measured:", ""]
    elif bench.get("exit") is None:
        lines += ["The benchmark was stopped at its deadline (see benchmark.log); what it measured:", ""]
    lines += [bench_md.strip() or "(no table)", "",
              f"Time: tests {timings['tests']:.0f} s, benchmark {timings['benchmark']:.0f} s, "
              f"total {timings['total']:.0f} s."]
    return "\n".join(lines) + "\n"


def _atomic_write():
    """attnzoo.common.atomic_write, loaded from its file: `make gpu-check GPU_PYTHON=python3` runs this script
    with an interpreter where attnzoo is not installed (the steps get it through PYTHONPATH), and importing the
    attnzoo package would import triton and timm, while the report must be written even where triton fails to
    import (it reports that). attnzoo/common.py itself imports only the standard library."""
    spec = importlib.util.spec_from_file_location("attnzoo_common_for_gpu_check", ROOT / "attnzoo" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common.atomic_write


def write_report(out: Path, report: dict, md: str) -> None:
    """report.json and report.md, each written atomically: a failed write leaves the previous report whole."""
    write = _atomic_write()
    write(out / "report.json", json.dumps(report, indent=1))
    write(out / "report.md", md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probe", action="store_true", help="only check that there is a CUDA GPU")
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole check (default 480)")
    p.add_argument("--out", type=Path, default=Path("outputs/gpu-check"))
    p.add_argument("--pytest-args", default="",
                   help=f"pytest arguments instead of {CUDA_TESTS} (where the cuda tests are), e.g. 'tests'")
    p.add_argument("-k", dest="keyword", help="only the tests matching this pytest -k expression")
    p.add_argument("--bench-args", default="", help="extra tools/benchmark.py arguments, e.g. '--models none'")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU needed: every step on the CPU, the benchmark only building and checking its cases")
    args = p.parse_args(argv)
    start = time.monotonic()

    if not args.dry_run and (reason := probe()) is not None:
        return refuse(reason)
    if args.probe:
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        return refuse(f"torch {torch.__version__} sees no CUDA device (a CPU-only build, or no usable driver)")
    out = (args.out if args.out.is_absolute() else ROOT / args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"gpu-check on {env['gpu']}: torch {env['torch']}, triton {env['triton']}; budget {args.budget:.0f} s",
          flush=True)

    # the tests: pytest -m cuda (what `make test-cuda` runs) on parallel workers, which compile the kernels side by
    # side; then, alone on the GPU, the tests over tensors past 2³¹ elements (tens of GiB each)
    pytest = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rfEs", "-p", "no:cacheprovider",
              "--continue-on-collection-errors", *(args.pytest_args.split() or [CUDA_TESTS])]
    if importlib.util.find_spec("pytest_timeout") is not None:
        # a kernel whose compile hangs ends its worker (xdist starts another), not the whole step
        pytest += ["--timeout", str(TEST_TIMEOUT), "--timeout-method", "thread"]
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    large = "test_past_int32_offsets"
    test_end = start + args.budget * TEST_SHARE
    keyword = f"({args.keyword}) and " if args.keyword else ""
    code, _ = run_step([*pytest, "-n", str(workers), "-k", f"{keyword}not {large}"], out / "pytest.log",
                       test_end - LARGE_TESTS_SECONDS - time.monotonic())
    code_large, _ = run_step([*pytest, "-k", keyword + large], out / "pytest-large.log",
                             max(test_end - time.monotonic(), LARGE_TESTS_SECONDS / 2))
    tests = merge(test_summary((out / "pytest.log").read_text(errors="replace"), code),
                  test_summary((out / "pytest-large.log").read_text(errors="replace"), code_large))
    test_s = time.monotonic() - start
    print(f"tests: {tests['counts']} in {test_s:.0f} s", flush=True)

    left = args.budget - (time.monotonic() - start) - REPORT_RESERVE
    bench_cmd = [sys.executable, "tools/benchmark.py", "--suite", "gpu", "--quick", "--budget", f"{left * 0.85:.0f}",
                 "--out", str(out / "benchmark.json"), "--md", str(out / "benchmark.md"), *args.bench_args.split()]
    if args.dry_run:
        bench_cmd += ["--device", "cpu", "--dry-run", "--batch", "1"]
    for stale in ("benchmark.json", "benchmark.md"):  # a benchmark that dies early must not report an old run
        (out / stale).unlink(missing_ok=True)
    bench_code, bench_s = run_step(bench_cmd, out / "benchmark.log", left)
    bench = {"exit": bench_code}
    if (out / "benchmark.json").exists():
        bench |= json.loads((out / "benchmark.json").read_text())
    bench_md = (out / "benchmark.md").read_text() if (out / "benchmark.md").exists() else ""
    print(f"benchmark: exit {bench_code} in {bench_s:.0f} s", flush=True)

    timings = {"tests": test_s, "benchmark": bench_s, "total": time.monotonic() - start}
    write_report(out, {"environment": env, "tests": tests, "benchmark": bench, "seconds": timings},
                 markdown(env, tests, bench, bench_md, timings))
    print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
    return 0 if tests["exit"] == 0 and bench_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
