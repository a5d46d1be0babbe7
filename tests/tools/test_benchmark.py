"""tools/benchmark.py: the op-shape capture finds every op call of a model; the GPU suite's alternatives
(SDPA, FlexAttention) compute what ours computes, checked on the CPU so that the one-shot GPU run compares like
with like; both suites run end to end at tiny sizes."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from .conftest import load_tool

benchmark = load_tool("benchmark")


def test_capture_finds_l2vit_window_calls():
    """L²ViT's window blocks are DaViT's, calling the op bound in attnzoo.backbones.davit: all 12 calls."""
    calls = benchmark.capture_op_calls("l2vit_tiny", 1, "cpu", torch.float32)
    assert Counter(op for op, _, _ in calls) == {"window_attention": 6, "linear_attention": 6}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_gpu_suite_cases_check_against_ours(tmp_path):
    """--dry-run builds the GPU suite's cases on the CPU (FlexAttention eager) and checks every alternative's
    forward against ours: each is within fp32 rounding, none dropped."""
    out = tmp_path / "b.json"
    code = benchmark.main(["--suite", "gpu", "--device", "cpu", "--dry-run", "--quick", "--batch", "1",
                           "--compile-backend", "none", "--models", "none", "--keep-rates", "0.5",
                           "--op-models", "davit_tiny,maxvit_tiny_tf_224,halonet26t,sparsifiner_deit_small_patch16_224",
                           "--out", str(out), "--md", str(tmp_path / "b.md")])
    report = json.loads(out.read_text())
    assert code == 0 and not report["failed_sections"]
    rows = [r for r in report["rows"] if r["group"] == "op"]
    alternatives = {r["name"]: set(r["diff"]) for r in rows}
    assert alternatives == {"window_attention": {"sdpa", "flex"}, "channel_attention": {"torch", "sdpa"},
                            "halo_attention": {"sdpa", "flex"}, "sparse_attention": {"sdpa", "flex"}}
    assert all(not r["errors"] for r in report["rows"]), [r["errors"] for r in report["rows"]]
    assert any("+bias" in r["shape"] for r in rows if r["name"] == "window_attention")  # MaxViT's bias as score_mod
    assert [r["shape"].split(":")[0] for r in report["rows"] if r["group"] == "keep"] == ["keep 0.5 (98/197 keys)"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_gpu_suite_runs_on_cpu(tmp_path):
    """Every timed path of the GPU suite at tiny sizes: ops forward and backward through SDPA and FlexAttention,
    the keep-rate sweep, a model eager and compiled (the eager compile backend), the report."""
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    code = benchmark.main(["--suite", "gpu", "--device", "cpu", "--quick", "--batch", "1", "--compile-backend",
                           "eager", "--op-models", "davit_tiny,halonet26t,sparsifiner_deit_small_patch16_224",
                           "--models", "ela_b_resnet18", "--keep-rates", "0.5", "--out", str(out), "--md", str(md)])
    report = json.loads(out.read_text())
    # FlexAttention has no backward on the CPU (on a GPU it does): that one error is expected here
    cpu_only = {"flex": "NotImplementedError: FlexAttention does not support backward on CPU"}
    errors = [(r["mode"], k, e) for r in report["rows"] for k, e in r["errors"].items()]
    assert code == 0 and all(m == "fwd+bwd" and e.startswith(cpu_only.get(k, "-")) for m, k, e in errors), errors
    modes = {(r["name"], r["mode"]) for r in report["rows"] if r["group"] == "model"}
    assert modes == {("ela_b_resnet18", m) for m in ("infer", "train", "infer compiled", "train compiled")}
    assert all(set(r["ms"]) == ({"ours", "sdpa", "flex"} if r["mode"] == "fwd" else {"ours", "sdpa"})
               for r in report["rows"] if r["group"] == "op"
               and r["name"] in ("window_attention", "halo_attention", "sparse_attention"))
    assert "vs FlexAttention" in md.read_text() and "vs best" in md.read_text()


def test_cpu_suite_runs(tmp_path):
    """The CPU suite's tables at a tiny size: ops against the torch path and the reference, the sweep, a model."""
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    code = benchmark.main(["--device", "cpu", "--quick", "--batch", "1", "--op-models", "ela_b_resnet18",
                           "--models", "ela_b_resnet18", "--keep-rates", "0.5", "--out", str(out), "--md", str(md)])
    report = json.loads(out.read_text())
    assert code == 0
    assert {(r["group"], r["mode"]) for r in report["rows"]} == {
        ("op", "fwd"), ("op", "fwd+bwd"), ("keep", "fwd"), ("keep", "fwd+bwd"), ("model", "infer"), ("model", "train")}
    assert all(set(r["ms"]) == {"ours", "torch", "reference"} for r in report["rows"] if r["group"] == "op")
    text = md.read_text()
    assert "| op | model: q k v shapes | pass | ours ms | vs torch path | vs reference |" in text
    assert "| ela_b_resnet18 | 1x3x224x224 vs resnet18 | train |" in text


def test_budget_sections_pass_unused_time_on():
    budget = benchmark.Budget(100.0)
    assert budget.until(0.5).fits("a", cost=10) and not budget.until(0.05).fits("b", cost=10)
    assert budget.fits("c", cost=10) and not budget.fits("d", cost=200)
    assert budget.skipped == ["b", "d"]
    assert benchmark.Budget(None).until(0.1).fits("e", cost=1e9)


def test_input_pipeline_case(shapes, tmp_path):
    """attnzoo's training loader against timm's create_loader on the same folder, images/s side by side."""
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    code = benchmark.main(["--device", "cpu", "--quick", "--op-models", "none", "--models", "none", "--keep-rates",
                           "none", "--loader-data", str(shapes), "--loader-workers", "0", "--loader-batch", "2",
                           "--out", str(out), "--md", str(md)])
    report = json.loads(out.read_text())
    row, = report["rows"]
    assert code == 0 and row["group"] == "loader" and not row["errors"]
    assert set(row["ms"]) == {"ours", "timm"} and all(v > 0 for v in row["ms"].values())
    assert "| input pipeline | data | ours img/s | timm img/s | ours vs timm |" in md.read_text()
    assert f"| train loader | shapes: 20 images, 0 workers, batch 2 | {2e3 / row['ms']['ours']:.1f} |" in md.read_text()
