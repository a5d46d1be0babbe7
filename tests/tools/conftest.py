"""Fixtures for the tools tests: the tools loaded as modules, a tiny shapes dataset, a tiny attnzoo model."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from attnzoo.data import ShapesSpec, make_shapes_dataset

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
# a DaViT small enough for a CPU step in well under a second at 32 px
TINY_DAVIT = ["--model", "davit_tiny", "--model-args",
              json.dumps({"embed_dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]})]
# training flags for a few fast, deterministic-enough steps
FAST = ["--img-size", "32", "--batch-size", "4", "--workers", "0", "--warmup-epochs", "0.5"]


def load_tool(name: str):
    """tools/<name>.py as a module (tools/ is scripts, not a package)."""
    module_name = f"attnzoo_tools_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture(autouse=True)
def one_thread():
    """The machine's cores are shared: one intra-op thread is several times faster than two fighting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """5 classes x (4 train, 2 val) images of 32 px."""
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes",
                               ShapesSpec(train_per_class=4, val_per_class=2, image_size=32, seed=0))


def tool_env() -> dict[str, str]:
    """Environment for a tool run as a subprocess: one thread, attnzoo importable, no stray backend."""
    env = {k: v for k, v in os.environ.items() if k != "ATTNZOO_BACKEND"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env
