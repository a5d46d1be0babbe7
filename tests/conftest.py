"""Shared fixtures."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An offline Hugging Face cache in a temporary folder.

    Returns ``put(repo_id, state_dict, filename="model.safetensors")``, which stores the file exactly where
    ``hf_hub_download`` looks for it (``models--ORG--NAME/snapshots/REV/`` with ``refs/main``), so timm's real
    pretrained-loading code runs against it with ``HF_HUB_OFFLINE=1`` and no network.
    """
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads its settings at import; it was imported before this test ran
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))

    def put(repo_id: str, state_dict: dict[str, torch.Tensor], filename: str = "model.safetensors") -> Path:
        revision = hashlib.sha1(repo_id.encode()).hexdigest()
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        path = snapshot / filename
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
        return path

    return put
