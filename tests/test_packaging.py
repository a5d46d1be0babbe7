"""pyproject.toml declares what attnzoo imports: with only the core dependencies installed, every module of
attnzoo imports (except those documented as needing an extra, which say which), every tool's ``--help`` works,
argument parsing imports only the chosen task, and classification training runs.

"Only the core dependencies" without building a second environment: a subprocess whose import system cannot see
any installed distribution outside the core dependencies' requirement closure (read from pyproject.toml and the
installed distributions' metadata), so an undeclared import fails here as it would in a fresh ``pip install``.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from attnzoo.data import ShapesSpec, make_shapes_dataset

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
# the modules that need an optional extra (their docstrings say so), and the extra their ImportError names
NEEDS_EXTRA = {"attnzoo.det": "det"}
TOOLS = sorted(p.stem for p in (ROOT / "tools").glob("*.py"))


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _core_closure() -> set[str]:
    """The distributions a core install (``pip install attnzoo``, no extra) brings in."""
    pending = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    seen: set[str] = set()
    while pending:
        req = pending.pop()
        name = _canonical(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        try:
            requires = md.distribution(name).requires or []
        except md.PackageNotFoundError:  # e.g. a platform-specific dependency not installed here
            continue
        seen.add(name)
        pending += [Requirement(r) for r in requires]
    return seen


def _hidden_packages() -> list[str]:
    """Top-level import names that only distributions outside the core closure provide."""
    core = _core_closure() | {"attnzoo"}
    return sorted(top for top, dists in md.packages_distributions().items()
                  if not {_canonical(d) for d in dists} & core and top.isidentifier())


# installed first thing in the subprocess: the path finder cannot see the hidden packages (find_spec returns None
# and `import` raises ModuleNotFoundError, as when they are not installed)
_PRELUDE = """
import importlib.machinery, sys
HIDDEN = frozenset({hidden!r})
class CoreOnly(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return super().find_spec(name, path, target)
sys.meta_path[:] = [CoreOnly if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
assert not HIDDEN & set(sys.modules), HIDDEN & set(sys.modules)
"""

_IMPORT_ALL = """
import importlib, json, pathlib
failures = {}
for path in sorted(p for p in pathlib.Path("attnzoo").rglob("*.py") if p.name != "__main__.py"):  # runs a CLI
    name = ".".join(path.with_suffix("").parts).removesuffix(".__init__")
    try:
        importlib.import_module(name)
    except ImportError as e:
        failures[name] = [type(e).__name__, getattr(e, "extra", None), str(e)]
print(json.dumps(failures))
"""

_TOOLS = """
import contextlib, io, json, runpy, sys
results = {}
def run(tool, *args):
    sys.argv = [f"tools/{tool}.py", *args]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(f"tools/{tool}.py", run_name="__main__")
    except SystemExit as e:
        return e.code, out.getvalue()
    return None, out.getvalue()
for tool in TOOLS:
    code, out = run(tool, "--help")
    results[tool] = [code, "usage:" in out]
    if tool == "train":
        results["train imports"] = sorted(m for m in sys.modules if m.startswith(("attnzoo.tasks.", "attnzoo.heads.",
                                                                                  "attnzoo.det")))
code, out = run("train", "--task", "oat", "--help")
results["train --task oat"] = [code, "--oat-task" in out]
print(json.dumps(results))
"""

_MAIN = """
import importlib, sys
sys.path.insert(0, "tools")
sys.exit(importlib.import_module(TOOL).main(ARGV))
"""


def _core_only(body: str, **values) -> subprocess.CompletedProcess:
    script = _PRELUDE.format(hidden=_hidden_packages()) + "".join(f"{k} = {v!r}\n" for k, v in values.items()) + body
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_hidden_packages_are_the_extras():
    hidden = set(_hidden_packages())
    assert {"mmengine", "mmcv", "mmdet", "mmseg", "matplotlib", "pytest"} <= hidden
    assert not {"torch", "timm", "numpy", "yaml", "PIL", "tqdm", "safetensors"} & hidden


def test_every_module_imports_with_only_the_core_dependencies():
    done = _core_only(_IMPORT_ALL)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.splitlines()[-1])
    undocumented = {m: f for m, f in failures.items() if not any(m == p or m.startswith(p + ".") for p in NEEDS_EXTRA)}
    assert undocumented == {}
    for module, (kind, extra, message) in failures.items():
        wanted = next(e for p, e in NEEDS_EXTRA.items() if module == p or module.startswith(p + "."))
        assert (kind, extra) == ("MissingExtraError", wanted) and f"attnzoo[{wanted}]" in message, (module, message)
    assert set(NEEDS_EXTRA) <= set(failures)  # the extra is really needed, so the list stays honest


def test_every_tool_helps_and_parsing_imports_only_the_chosen_task():
    done = _core_only(_TOOLS, TOOLS=TOOLS)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    assert {tool: results[tool] for tool in TOOLS} == {tool: [0, True] for tool in TOOLS}
    assert results["train imports"] == ["attnzoo.tasks.classification"]
    assert results["train --task oat"] == [0, True]


def test_classification_trains(tmp_path):
    data = make_shapes_dataset(tmp_path / "shapes", ShapesSpec(train_per_class=2, val_per_class=1, image_size=32))
    model_args = json.dumps({"embed_dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]})
    argv = [str(data), "--output", str(tmp_path / "run"), "--model", "davit_tiny", "--model-args", model_args,
            "--img-size", "32", "--batch-size", "2", "--workers", "0", "--epochs", "1", "--max-steps", "1"]
    done = _core_only(_MAIN, TOOL="train", ARGV=argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.json").is_file()


@pytest.mark.parametrize("tool", ["train", "eval"])
def test_a_config_without_the_det_extra_is_one_line_naming_it(tool):
    done = _core_only(_MAIN, TOOL=tool, ARGV=[str(ROOT / "configs/davit/retinanet_davit-t_fpn_1x_coco.py"), "x.pth"])
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip() == (f"{tool}.py: error: attnzoo.det needs the 'det' extra (mmcv is not installed): "
                                   "pip install 'attnzoo[det]'")
