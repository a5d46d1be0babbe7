"""Multi-node training as torchrun runs it: two torchrun agents (``--nnodes=2 --nproc_per_node=1``) meeting at a
c10d rendezvous on localhost, gloo on the CPU. Global rank 0 alone writes; the run resumes exactly."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from .conftest import FAST, ROOT, TINY_DAVIT, tool_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_nodes(data: Path, outputs: tuple[Path, Path], *extra: str) -> list[subprocess.Popen]:
    """One torchrun per "node", started together; node i writes to outputs[i] (one shared folder normally)."""
    rdzv = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{_free_port()}",
            "--rdzv-id=attnzoo-test", "--max-restarts=0"]
    return [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *rdzv, str(ROOT / "tools" / "train.py"), str(data),
         "--output", str(out), *TINY_DAVIT, *FAST, "--epochs", "2", "--batch-size", "2", "--drop-path", "0.1",
         *extra], env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for out in outputs]


def _wait(*procs: subprocess.Popen) -> None:
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(log[-3000:] for log in logs)


def _checkpoint(out: Path) -> Path:
    return out / "checkpoints" / json.loads((out / "checkpoints" / "last.json").read_text())["checkpoint"]


def test_two_torchrun_nodes_write_once_and_resume_exactly(shapes, tmp_path):
    shared, node1 = tmp_path / "run", tmp_path / "node1-local"
    # the second node given its own --output: global rank 0 (on the first) is the only writer, so it stays empty;
    # alongside, the uninterrupted 4-step run
    _wait(*_two_nodes(shapes, (shared, node1), "--max-steps", "2"),
          *_two_nodes(shapes, (tmp_path / "whole", tmp_path / "whole"), "--max-steps", "4"))
    assert not node1.exists() or not any(node1.rglob("*"))
    state = json.loads((_checkpoint(shared) / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2
    assert state["rng"][0] != state["rng"][1]  # two ranks, each its own training randomness (seed + rank)
    _wait(*_two_nodes(shapes, (shared, shared), "--max-steps", "4", "--resume"))
    a, b = (load_file(_checkpoint(o) / "model.safetensors") for o in (shared, tmp_path / "whole"))
    assert json.loads((_checkpoint(shared) / "state.json").read_text())["step"] == 4
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
