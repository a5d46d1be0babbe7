"""`make gpu-check` and tools/gpu_check.py: a clear refusal without a GPU (before any set-up), and the whole check
dry-run on the CPU, so that its one run on a GPU finds a working report."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT, load_tool, tool_env

gpu_check = load_tool("gpu_check")
NO_GPU = shutil.which("nvidia-smi") is None and not torch.cuda.is_available()


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU: `make gpu-check` would run for real")
def test_make_gpu_check_refuses_without_a_gpu():
    """The Makefile target probes first, with the system Python and no torch: no venv set-up, a non-zero exit."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    run = subprocess.run(["make", "--no-print-directory", "gpu-check", f"PYTHON={sys.executable}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=tool_env())
    assert run.returncode != 0
    assert "make gpu-check: needs a CUDA GPU, and no NVIDIA driver here (nvidia-smi is not on the PATH)" in run.stderr
    assert "pip install" not in run.stdout + run.stderr  # refused before the set-up


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_refusal_exit_status(capsys):
    assert gpu_check.main(["--probe"]) == gpu_check.NO_GPU
    assert gpu_check.main([]) == gpu_check.NO_GPU
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_pytest_log_summary():
    """The report's test summary from pytest's verbose log, with or without xdist, also when the run was stopped
    mid-test."""
    log = "\n".join([
        "tests/kernels/test_cuda.py::test_fused_matches_reference[fp32-a] PASSED      [ 1%]",
        "tests/kernels/test_cuda.py::test_fused_matches_reference[fp16-a] FAILED      [ 2%]",
        "tests/kernels/test_cuda.py::test_past_int32_offsets[window] SKIPPED (needs)  [ 3%]",
        "tests/kernels/test_cuda.py::test_fused_matches_reference[bf16-b] ",
        "FAILED tests/kernels/test_cuda.py::test_fused_matches_reference[fp16-a] - AssertionError: out0: error",
    ])
    summary = gpu_check.test_summary(log, None)
    assert summary["counts"] == {"FAILED": 1, "PASSED": 1, "SKIPPED": 1}
    assert summary["stopped_at_deadline"] and summary["unfinished"] == [log.splitlines()[3].strip()]
    assert summary["failures"] == [log.splitlines()[-1]]
    xdist = "\n".join([
        "tests/kernels/test_cuda.py::test_a[x] ",
        "tests/kernels/test_cuda.py::test_a[y] ",
        "[gw1] [ 14%] SKIPPED tests/kernels/test_cuda.py::test_a[x] ",
        "[gw0] [100%] PASSED tests/kernels/test_cuda.py::test_a[y] ",
    ])
    both = gpu_check.merge(summary, gpu_check.test_summary(xdist, 0))
    assert both["counts"] == {"FAILED": 1, "PASSED": 2, "SKIPPED": 2} and both["stopped_at_deadline"]


@pytest.mark.slow
def test_dry_run_writes_the_report(tmp_path):
    """Every step of the check on the CPU: the CUDA tests (which skip here), the GPU benchmark building and
    checking one model's cases, the report from both."""
    out = tmp_path / "gpu-check"
    code = gpu_check.main(["--dry-run", "--out", str(out), "--budget", "300",
                           "--pytest-args", "tests/kernels/test_cuda.py", "-k", "ela_pool",
                           "--bench-args", "--op-models ela_b_resnet18 --models none --keep-rates none"])
    report = json.loads((out / "report.json").read_text())
    assert code == 0, (out / "benchmark.log").read_text()[-2000:]
    assert report["tests"]["exit"] == 0 and report["tests"]["counts"]["SKIPPED"] >= 7  # 6 cases + 1 large
    assert {r["name"] for r in report["benchmark"]["rows"]} == {"ela_pool", "ela_gate"}
    text = (out / "report.md").read_text()
    assert "## CUDA tests" in text and "| ela_pool | ela_b_resnet18:" in text


def test_a_failed_report_write_leaves_the_previous_report(tmp_path, monkeypatch):
    gpu_check.write_report(tmp_path, {"run": 1}, "# run 1\n")
    assert json.loads((tmp_path / "report.json").read_text()) == {"run": 1}

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", crash)
    with pytest.raises(OSError, match="No space left"):
        gpu_check.write_report(tmp_path, {"run": 2}, "# run 2\n")
    monkeypatch.undo()
    assert json.loads((tmp_path / "report.json").read_text()) == {"run": 1}
    assert (tmp_path / "report.md").read_text() == "# run 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]  # no temporary file left
    gpu_check.write_report(tmp_path, {"run": 2}, "# run 2\n")
    assert (tmp_path / "report.md").read_text() == "# run 2\n"
