"""tools/publish.py, convert.py and eval.py: timm's Hub layout written, loaded back through timm (local-dir:,
and hf-hub: from an offline cache), and measured; bad checkpoints rejected with the keys that do not fit."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from .conftest import FAST, TINY_DAVIT, load_tool

train, publish, convert, evaluate = (load_tool(n) for n in ("train", "publish", "convert", "eval"))


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    torch.set_num_threads(1)
    assert train.main([str(shapes), "--output", str(out), *TINY_DAVIT, *FAST, "--epochs", "1"]) == 0
    return out


def _eval(capsys, *argv: str) -> dict:
    assert evaluate.main([*argv, "--workers", "0", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_publish_writes_a_hub_folder_timm_loads_and_eval_measures(trained, shapes, tmp_path, capsys):
    hub = tmp_path / "hub"
    assert publish.main([str(trained), "--out", str(hub)]) == 0
    assert "same predictions" in capsys.readouterr().out
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((hub / "config.json").read_text())
    assert config["architecture"] == "davit_tiny" and config["num_classes"] == 5
    assert config["label_names"] == ["circle", "cross", "square", "star", "triangle"]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    model = timm.create_model(f"local-dir:{hub}", pretrained=True)
    ckpt = trained / "checkpoints" / json.loads((trained / "checkpoints" / "last.json").read_text())["checkpoint"]
    trained_weights = load_file(ckpt / "model.safetensors")
    assert all(torch.equal(v, trained_weights[k]) for k, v in model.state_dict().items())
    # eval.py on the published folder measures what the training run logged for its val split
    logged = (trained / "log.csv").read_text().splitlines()[1].split(",")
    result = _eval(capsys, f"local-dir:{hub}", str(shapes))
    assert result["images"] == 10 and result["top1"] == pytest.approx(float(logged[5]))
    assert result["model_img_per_s"] > 0
    assert re.search(rf"Top-1 \(shapes val\):\*\* {float(logged[5]):.2f}%", (hub / "README.md").read_text())


def test_published_folder_loads_from_the_hub_offline(trained, shapes, tmp_path, offline_hub, capsys):
    hub = tmp_path / "hub"
    publish.publish(publish.find_checkpoint(trained), hub)
    weights = offline_hub("someone/davit-shapes", load_file(hub / "model.safetensors"))
    shutil.copy(hub / "config.json", weights.parent / "config.json")
    local = timm.create_model(f"local-dir:{hub}", pretrained=True).eval()
    remote = timm.create_model("hf-hub:someone/davit-shapes", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(local(x), remote(x))
    assert _eval(capsys, "hf-hub:someone/davit-shapes", str(shapes))["images"] == 10


def _authors_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's DaViT keys renamed back to the Microsoft release's (what timm's checkpoint_filter_fn undoes)."""
    out = {}
    for k, v in state_dict.items():
        k = k.replace("stem.conv", "patch_embeds.0.proj").replace("head.fc.", "head.").replace("head.norm.", "norms.")
        k = re.sub(r"stages\.(\d+)\.downsample\.conv", r"patch_embeds.\1.proj", k)
        k = re.sub(r"stages\.(\d+)\.downsample\.norm", r"patch_embeds.\1.norm", k)
        k = k.replace("stem.norm", "patch_embeds.0.norm")
        k = re.sub(r"stages\.(\d+)\.blocks", r"main_blocks.\1", k).replace("cpe1", "cpe.0").replace("cpe2", "cpe.1")
        out[k] = v
    return out


def test_convert_an_authors_checkpoint_through_the_filter_fn(tmp_path, capsys):
    kwargs = json.loads(TINY_DAVIT[3])
    original = timm.create_model("davit_tiny", num_classes=10, **kwargs).state_dict()
    authors = _authors_layout(original)
    assert "patch_embeds.0.proj.weight" in authors and "stem.conv.weight" not in authors
    pth = tmp_path / "DaViT_tiny_authors.pth"
    torch.save({"state_dict": authors}, pth)
    hub = tmp_path / "hub"
    assert convert.main(["davit_tiny", str(pth), "--out", str(hub),
                         "--model-args", json.dumps({**kwargs, "num_classes": 10})]) == 0
    loaded = timm.create_model(f"local-dir:{hub}", pretrained=True).state_dict()
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in original)


def test_checkpoint_that_does_not_fit_names_the_keys(trained, shapes, tmp_path, capsys):
    ckpt = trained / "checkpoints" / json.loads((trained / "checkpoints" / "last.json").read_text())["checkpoint"]
    other = json.dumps({"embed_dims": [8, 16, 32, 48], "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]})
    assert evaluate.main(["davit_tiny", str(shapes), "--checkpoint", str(ckpt / "model.safetensors"),
                          "--model-args", other, "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "does not fit model davit_tiny" in err and "shape (checkpoint vs model)" in err
    assert "stages.3.blocks.0.0.attn.qkv.weight (192, 64) vs (144, 48)" in err and re.search(r"\(\d+ in all\)", err)
    out = tmp_path / "hub"
    assert convert.main(["davit_tiny", str(ckpt / "model.safetensors"), "--out", str(out)]) == 2
    assert "shape (checkpoint vs model)" in capsys.readouterr().err  # a 1000-class head by default
    assert not out.exists()


def test_eval_rejects_unknown_models_and_missing_folders(shapes, tmp_path, capsys):
    assert evaluate.main(["maxvit_tiny_tf_22", str(shapes), "--workers", "0"]) == 2
    assert "closest registered names: maxvit_tiny_tf_224" in capsys.readouterr().err
    assert evaluate.main(["davit_tiny", str(tmp_path / "nope"), "--workers", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert publish.main([str(tmp_path), "--out", str(tmp_path / "hub")]) == 2
    assert "neither a run folder" in capsys.readouterr().err


def test_publish_pushes_the_checked_folder_to_the_named_repo(trained, tmp_path, monkeypatch, capsys):
    """--repo: the repo is created (kept when it exists) and the folder timm reloaded is uploaded whole; the card
    names the repo. The Hub client is replaced by a recorder (no network here), a failing one by an HTTP error."""
    import huggingface_hub
    from huggingface_hub.utils import HfHubHTTPError

    calls = []

    def create_repo(repo_id, private=False, exist_ok=False, **kwargs):
        calls.append(("create", repo_id, private, exist_ok))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(repo_id, folder_path, commit_message, **kwargs):
        calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        return f"https://huggingface.co/{repo_id}/commit/1"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    hub = tmp_path / "hub"
    assert publish.main([str(trained), "--out", str(hub), "--repo", "someone/davit-shapes", "--private"]) == 0
    assert calls == [("create", "someone/davit-shapes", True, True),
                     ("upload", "someone/davit-shapes", ["README.md", "config.json", "model.safetensors"])]
    assert "hf-hub:someone/davit-shapes" in (hub / "README.md").read_text()
    assert "pushed: https://huggingface.co/someone/davit-shapes/commit/1" in capsys.readouterr().out

    def refused(*args, **kwargs):
        import httpx2  # the HTTP client huggingface-hub 2 is built on

        request = httpx2.Request("POST", "https://huggingface.co/api/models/someone/davit-shapes/commit/main")
        raise HfHubHTTPError("401 Client Error: Unauthorized", response=httpx2.Response(401, request=request))

    monkeypatch.setattr(huggingface_hub, "upload_folder", refused)
    assert publish.main([str(trained), "--out", str(hub), "--overwrite", "--repo", "someone/davit-shapes"]) == 2
    err = capsys.readouterr().err
    assert "pushing" in err and "Unauthorized" in err and "huggingface-cli upload someone/davit-shapes" in err
    assert (hub / "model.safetensors").is_file()  # the folder stays complete for a retry
    assert publish.main([str(trained), "--out", str(tmp_path / "hub2"), "--repo", "not a repo"]) == 2
    assert "is not a Hub repo id" in capsys.readouterr().err
