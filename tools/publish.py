"""Turn a training checkpoint of tools/train.py into timm's Hub layout, check that timm loads it back, and
optionally push it to the Hugging Face Hub.

    python tools/publish.py runs/demo --out runs/demo/hub                  # the run's last checkpoint
    python tools/publish.py runs/demo --out runs/demo/hub --ema --repo ORG/NAME

The checkpoint's state.json and weights must match the sha256 digests state.json records. The folder
(config.json with the pretrained_cfg, the class names and the sha256 of model.safetensors, which is the
checkpoint's own file byte for byte; model.safetensors; README.md with the run's measured top-1/top-5) is
written under a temporary name and loaded with ``timm.create_model("local-dir:...", pretrained=True)``; only
when the reloaded model gives the same predictions as the checkpoint's, on the run's own val images when they
are still there, is it renamed to --out (with --overwrite, the old folder is replaced atomically). Afterwards
``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` loads the pushed copy.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import timm
import torch
from timm.data import create_transform

import attnzoo  # noqa: F401  (registers attnzoo's models with timm)
from attnzoo.cli import tool_main
from attnzoo.common import InputError, UnreadableSample
from attnzoo.data import image_folder
from attnzoo.engine import find_checkpoint, task_state, verify_checkpoint
from attnzoo.hub import create_model, load_weights, save_hub_folder
from attnzoo.tasks import get_task


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a run folder of tools/train.py (its last checkpoint) or a checkpoint folder")
    p.add_argument("--out", required=True, help="the Hub folder to write")
    p.add_argument("--ema", action="store_true", help="publish the EMA weights")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--repo", help="also upload the folder to this Hugging Face Hub repo (ORG/NAME)")
    p.add_argument("--private", action="store_true", help="create --repo as a private repo")
    return p.parse_args(argv)


def sample_inputs(data: str, config: dict, n: int = 16) -> torch.Tensor:
    """``n`` val images of the run's ``data`` spread over the split (the readable ones), transformed as eval
    does; random images if the data is gone."""
    images = []
    try:
        dataset = image_folder(data, "val", transform=create_transform(**config, is_training=False))
    except InputError:
        dataset = []
    for i in range(0, len(dataset), max(1, len(dataset) // n)):
        with contextlib.suppress(UnreadableSample):
            images.append(dataset[i][0])
    if not images:
        return torch.randn(n, *config["input_size"], generator=torch.Generator().manual_seed(0))
    return torch.stack(images[:n])


def publish(checkpoint: Path, out: Path, ema: bool = False, overwrite: bool = False,
            repo: str | None = None) -> tuple[Path, dict]:
    """Write the Hub folder and check the reload; returns it and the numbers that went into the card. ``repo`` is
    the Hub repo the card's usage example names (``ORG/<folder name>`` when not given)."""
    state = verify_checkpoint(checkpoint, [])  # state.json matches its own digest before anything is read from it
    task, own = task_state(state)
    if not get_task(task).publishable:
        raise InputError(f"{checkpoint} was trained with --task {task}, whose model is not a timm classifier: "
                         "tools/publish.py exports classification runs (--task classification, sparsifiner) only")
    args, classes, metrics, config = state["args"], own["classes"], state["metrics"], own["data_config"]
    weights = checkpoint / ("ema.safetensors" if ema else "model.safetensors")
    if not weights.is_file():
        raise InputError(f"{weights} does not exist" + (" (the run kept no EMA: --ema-decay 0)" if ema else ""))
    digest = verify_checkpoint(checkpoint, [weights.name])["sha256"][weights.name]
    model = create_model(args["model"], num_classes=len(classes), **args["model_args"])
    load_weights(model, weights)
    model.eval()
    prefix = "ema_" if ema else ""
    numbers = {f"Top-1 ({Path(args['data']).name} val)": metrics.get(f"{prefix}top1"),
               f"Top-5 ({Path(args['data']).name} val)": metrics.get(f"{prefix}top5")}
    card = {
        "description": f"{args['model']} fine-tuned with attnzoo's tools/train.py on {Path(args['data']).name}.",
        "details": {
            "Model Type": "Image classification", "Dataset": Path(args["data"]).name,
            "Classes": ", ".join(classes), "Steps": state["step"], "Epochs": state["epoch"],
            "Weights": "EMA" if ema else "final",
            **{k: f"{v:.2f}%" for k, v in numbers.items() if v is not None},
        },
        "usage": f"```python\nimport attnzoo, timm\nmodel = timm.create_model('hf-hub:{repo or 'ORG/' + out.name}',"
                 " pretrained=True)\n```",
    }
    data_config = {k: config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
                   if k in config}
    x = sample_inputs(args["data"], config)

    def check(folder: Path) -> None:
        if json.loads((folder / "config.json").read_text())["sha256"]["model.safetensors"] != digest:
            raise RuntimeError(f"the model.safetensors written for {out} differs from {weights}; nothing written")
        reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        with torch.no_grad():
            ours, theirs = model(x), reloaded(x)
        if not torch.equal(ours.argmax(-1), theirs.argmax(-1)) or not torch.allclose(ours, theirs, atol=1e-5):
            raise RuntimeError(f"{out} reloaded through timm gives different predictions from {weights}; nothing "
                               "written")

    save_hub_folder(model, out, label_names=classes, card=card, data_config=data_config, overwrite=overwrite,
                    check=check)
    return out, {"checked_images": len(x), **numbers}


def push(folder: Path, repo: str, private: bool) -> str:
    """Create ``repo`` (a model repo; kept if it exists) and upload the folder as one commit; returns its URL."""
    from huggingface_hub import create_repo, upload_folder
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except ValueError as e:
        raise InputError(f"--repo {repo!r} is not a Hub repo id (expected ORG/NAME): {e}") from None
    try:
        repo_id = create_repo(repo, private=private, exist_ok=True).repo_id
        return str(upload_folder(repo_id=repo_id, folder_path=str(folder),
                                 commit_message="Add model (attnzoo publish)"))
    except Exception as e:  # no network, no token, no write access: errors of the Hub client and its HTTP library
        raise InputError(f"pushing {folder} to the Hub repo {repo} failed ({type(e).__name__}: {e}); the folder "
                         f"is complete: retry with `huggingface-cli upload {repo} {folder}`") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> None:
        folder, numbers = publish(find_checkpoint(Path(args.checkpoint)), Path(args.out), args.ema, args.overwrite,
                                  args.repo)
        print(f"wrote {folder} (config.json, model.safetensors, README.md)")
        print(f"reloaded with timm.create_model('local-dir:{folder}', pretrained=True): same predictions on "
              f"{numbers.pop('checked_images')} images; " + ", ".join(f"{k} {v:.2f}%" for k, v in numbers.items()
                                                                      if v is not None))
        if args.repo:
            print(f"pushed: {push(folder, args.repo, args.private)}")
            print(f"load it with timm.create_model('hf-hub:{args.repo}', pretrained=True)")

    return tool_main("publish.py", run)


if __name__ == "__main__":
    sys.exit(main())
