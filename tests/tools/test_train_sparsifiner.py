"""tools/train.py --task sparsifiner: the reconstruction phase trains only the connectivity predictors, the
distillation phase only the rest, and the teacher is the dense DeiT with the student's starting weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from attnzoo.engine import Run
from attnzoo.tasks import get_task

from .conftest import FAST, load_tool

train = load_tool("train")
TINY = ["--model", "sparsifiner_deit_small_patch16_224", "--model-args",
        json.dumps(dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, basis_topk=2))]
RUN = [*TINY, *FAST, "--task", "sparsifiner", "--sparsifiner-recon-epochs", "1", "--epochs", "2", "--mixup", "0",
       "--cutmix", "0", "--aa", "", "--reprob", "0", "--lr", "1e-2", "--warmup-epochs", "0"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    name = json.loads((run / "checkpoints" / "last.json").read_text())["checkpoint"]
    return load_file(run / "checkpoints" / name / "model.safetensors")


def _changed(before: dict, after: dict) -> tuple[set[str], set[str]]:
    """(predictor keys that changed, other keys that changed)"""
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    return {k for k in moved if ".mask_predictor." in k}, {k for k in moved if ".mask_predictor." not in k}


def test_phases_train_the_predictor_then_the_backbone(shapes, tmp_path):
    out = tmp_path / "run"
    # the initial weights: train.py seeds with --seed (0) and then builds the model
    args = train.parse_args([str(shapes), *RUN])
    torch.manual_seed(0)
    task = get_task("sparsifiner")(args, Run(args.amp))
    model, train_set, _ = task.build()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = task.teacher.state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in initial.items() if ".mask_predictor." not in k)
    steps_per_epoch = len(train_set) // 4

    assert train.main([str(shapes), "--output", str(out), *RUN, "--max-steps", str(steps_per_epoch)]) == 0
    after_recon = _weights(out)
    predictor, rest = _changed(initial, after_recon)
    assert predictor and not rest  # phase 1: the predictors only

    assert train.main([str(shapes), "--output", str(out), "--resume", "--workers", "0"]) == 0
    after_distill = _weights(out)
    predictor, rest = _changed(after_recon, after_distill)
    assert rest and not predictor  # phase 2: everything but the predictors
    assert any(k.startswith("blocks.") for k in rest) and "head.weight" in rest


def test_a_model_that_is_not_a_sparsifiner_is_refused(shapes, tmp_path, capsys):
    argv = [str(shapes), "--output", str(tmp_path / "r"), *FAST, "--task", "sparsifiner",
            "--model", "deit_tiny_patch16_224", "--img-size", "32"]
    assert train.main(argv) == 2
    assert "is not a Sparsifiner" in capsys.readouterr().err


@pytest.mark.parametrize("recon", [True, False])
def test_loss_is_the_phase_loss(shapes, recon):
    args = train.parse_args([str(shapes), *RUN])
    torch.manual_seed(0)
    task = get_task("sparsifiner")(args, Run(args.amp))
    model, _, _ = task.build()
    task.set_epoch(0 if recon else 1)
    model.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    loss = task.loss(model, (x, y))
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all((".mask_predictor." in n) == recon for n in grads)
    assert timm.models.model_entrypoint("sparsifiner_deit_small_patch16_224")  # registered through attnzoo
