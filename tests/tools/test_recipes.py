"""configs/imagenet/: one recipe per family, each a valid tools/train.py --config file; a recipe trains with
command-line overrides."""
from __future__ import annotations

import json

import pytest
import timm
import yaml

from .conftest import FAST, ROOT, TINY_DAVIT, load_tool

train = load_tool("train")
RECIPES = sorted((ROOT / "configs" / "imagenet").glob("*.yaml"))
FAMILIES = {"davit", "maxvit", "halonet", "l2vit", "ravlt", "sparsifiner", "ninformer", "ela", "ulsam"}


def test_one_recipe_per_family():
    assert {p.stem for p in RECIPES} == FAMILIES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_read_by_the_parser(recipe):
    config = yaml.safe_load(recipe.read_text())
    args = train.parse_args(["DATA", "--config", str(recipe)])  # an unknown key or a bad choice exits here
    assert {k: getattr(args, k) for k in config} == config
    text = recipe.read_text()
    # the paper's number and where the recipe comes from, or why there is none and the closest published one
    assert ("Reported:" in text and "Recipe source:" in text) or \
        ("NO PUBLISHED" in text and "Closest published recipe" in text)
    assert timm.is_model(args.model), args.model


def test_command_line_overrides_a_recipe(shapes, tmp_path, capsys):
    recipe = ROOT / "configs" / "imagenet" / "davit.yaml"
    out = tmp_path / "run"
    assert train.main([str(shapes), "--config", str(recipe), "--output", str(out), *TINY_DAVIT, *FAST,
                       "--max-steps", "2", "--warmup-epochs", "1"]) == 0
    state = json.loads(next((out / "checkpoints").glob("step-*/state.json")).read_text())
    config = yaml.safe_load(recipe.read_text())
    args = state["args"]
    assert state["step"] == 2
    assert (args["batch_size"], args["warmup_epochs"], args["img_size"]) == (4, 1.0, 32)  # overridden
    assert {k: args[k] for k in ("lr", "weight_decay", "min_lr", "aa", "mixup", "epochs")} == \
        {k: config[k] for k in ("lr", "weight_decay", "min_lr", "aa", "mixup", "epochs")}  # from the recipe


def test_a_bad_recipe_key_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1.0e-3\nwarmup: 5\n")
    with pytest.raises(SystemExit):
        train.parse_args(["DATA", "--config", str(bad)])
    assert "'warmup' is not an option of train.py" in capsys.readouterr().err
    bad.write_text("sched: plateau\n")
    with pytest.raises(SystemExit):
        train.parse_args(["DATA", "--config", str(bad)])
    assert "sched 'plateau': choose one of cosine" in capsys.readouterr().err
