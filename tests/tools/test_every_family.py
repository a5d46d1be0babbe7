"""Every tool over one model of every family (issue 15): a run either works (exit 0, its output written) or exits
2 with one line on stderr that names the model or the argument at fault, never a traceback.

The sample is the smallest model of each family in attnzoo's registry (tools/model_table.py's listing; the slow
test below checks "smallest"), at a small input size the family takes; Sparsifiner, built for one size, is
narrowed and built for 32 px by --model-args (which the Hub folder then carries), and HaloNet's is its cheapest
to run rather than its smallest. No network: weights are random, written by the tests, or served from an
offline Hugging Face cache; pretrained weights that cannot be had are an error naming the model. The slow sweep
runs every registered model through visualize and eval.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from attnzoo.data import ShapesSpec, make_shapes_dataset
from attnzoo.data.oat import GridSearchSpec, make_grid_search, write_oat_folder
from attnzoo.tasks import TASKS

from ..heads.test_cca import write_asen
from ..heads.test_dcal import _write_cub
from .conftest import TINY_DAVIT, load_tool

train, evaluate, visualize, convert, publish, benchmark, model_table = (
    load_tool(n) for n in ("train", "eval", "visualize", "convert", "publish", "benchmark", "model_table"))

TINY_SPARSIFINER_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, basis_topk=2)
# family -> (its smallest model, an input size it takes (None: the only one it takes), --model-args)
SAMPLE = {
    "davit": ("davit_tiny", 32, {}),
    "maxvit": ("maxvit_pico_rw_256", 64, {}),
    # halonet_h1 has the fewest parameters but halo layers from stride 4 on: ~1 s a 256-px image on one core
    "halonet": ("haloregnetz_b", None, {}),  # 224: its halo blocks tile no size below 216
    "l2vit": ("l2vit_tiny", 32, {}),
    "ravlt": ("ravlt_t", 32, {}),
    "sparsifiner": ("sparsifiner_deit_small_patch16_224", None, TINY_SPARSIFINER_ARGS),
    "ninformer": ("ninformer_cifar", None, {}),
    "ela": ("ela_b_mobilenetv2_100", 32, {}),
    "ulsam": ("ulsam_mobilenetv2_100", 32, {}),
}
CHEAPEST_NOT_SMALLEST = {"halonet": "halonet_h1"}
FAMILIES = sorted(SAMPLE)
# a tiny Sparsifiner (a ViT with a class token) for the tasks that train one
TINY_SPARSIFINER = ["--model", "sparsifiner_deit_small_patch16_224", "--model-args", json.dumps(TINY_SPARSIFINER_ARGS)]
STEP = ["--max-steps", "1", "--batch-size", "2", "--workers", "0"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """5 classes x (2 train, 1 val) images of 32 px: the full-size models here run on few images."""
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes",
                               ShapesSpec(train_per_class=2, val_per_class=1, image_size=32, seed=0))


def _size(family: str) -> list[str]:
    size = SAMPLE[family][1]
    return ["--img-size", str(size)] if size else []


def _model_args(family: str, **more) -> list[str]:
    kwargs = {**SAMPLE[family][2], **more}
    return ["--model-args", json.dumps(kwargs)] if kwargs else []


def _refused(capsys, rc: int, tool: str, *named: str) -> str:
    """Exit status 2 and one line ``TOOL.py: error: ...`` that contains each of ``named``."""
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and err.startswith(f"{tool}.py: error: ") and "Traceback" not in err, err
    assert all(n in err for n in named), (named, err)
    return err


def _checkpoint(run: Path) -> Path:
    return run / "checkpoints" / json.loads((run / "checkpoints" / "last.json").read_text())["checkpoint"]


def _image(shapes: Path) -> str:
    return str(next((shapes / "val" / "star").glob("*.png")))


def test_the_sample_is_one_model_of_every_family():
    families = model_table.attnzoo_models()
    assert sorted(families) == FAMILIES
    assert all(SAMPLE[f][0] in families[f] for f in FAMILIES)


@pytest.mark.slow
def test_the_sample_is_the_smallest_model_of_each_family():
    def params(name: str) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in timm.create_model(name).parameters())

    for family, names in model_table.attnzoo_models().items():
        assert CHEAPEST_NOT_SMALLEST.get(family, SAMPLE[family][0]) == min(names, key=params), family


@pytest.mark.parametrize("family", FAMILIES)
def test_train_publish_eval_visualize_convert(family, shapes, tmp_path, capsys):
    """The classification path of the README's tools section, one step of training and every tool after it."""
    name, size = SAMPLE[family][0], _size(family)
    run, hub = tmp_path / "run", tmp_path / "hub"
    assert train.main([str(shapes), "--model", name, *_model_args(family), "--output", str(run), *STEP, *size]) == 0
    weights = _checkpoint(run) / "model.safetensors"
    assert publish.main([str(run), "--out", str(hub)]) == 0
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    out = tmp_path / "eval.json"
    assert evaluate.main([f"local-dir:{hub}", str(shapes), "--workers", "0", "--batch-size", "5", *size,
                          "--out", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == 5
    vis = tmp_path / "vis"
    assert visualize.main([f"local-dir:{hub}", _image(shapes), "--out", str(vis), *size]) == 0
    levels = len(timm.create_model(name, features_only=True, **SAMPLE[family][2]).feature_info.channels())
    assert len(list((vis / "features").glob("*.png"))) == levels
    converted = tmp_path / "converted"
    assert convert.main([name, str(weights), "--out", str(converted), *_model_args(family, num_classes=5)]) == 0
    original, written = load_file(weights), load_file(converted / "model.safetensors")
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_weights_that_cannot_be_had_are_named(family, shapes, tmp_path, offline_hub, capsys):
    """An empty offline cache: a model without published weights, or whose weights are not in the cache, is
    an error naming it in eval and visualize (pretrained by default) and train --pretrained."""
    name = SAMPLE[family][0]
    _refused(capsys, evaluate.main([name, str(shapes), "--workers", "0", *_size(family)]), "eval", name)
    _refused(capsys, visualize.main([name, _image(shapes), "--out", str(tmp_path / "vis"), *_size(family)]),
             "visualize", name)
    _refused(capsys, train.main([str(shapes), "--model", name, "--pretrained", "--output", str(tmp_path / "r"),
                                 *STEP, *_size(family)]), "train", name)


def test_pretrained_weights_from_the_cache(shapes, tmp_path, offline_hub, capsys):
    """visualize's and eval's default mode: the tag's weights, here from the offline cache."""
    name = "maxvit_rmlp_pico_rw_256"
    model = timm.create_model(name)
    offline_hub("timm/maxvit_rmlp_pico_rw_256.sw_in1k", model.state_dict())
    vis = tmp_path / "vis"
    assert visualize.main([name, _image(shapes), "--out", str(vis), "--img-size", "64"]) == 0
    blocks = sum(len(stage.blocks) for stage in model.stages)
    assert len(list((vis / "attention").glob("*.png"))) == 2 * blocks  # block and grid attention in each
    assert evaluate.main([name, str(shapes), "--workers", "0", "--img-size", "64"]) == 0
    assert '"images": 5' in capsys.readouterr().out
    _refused(capsys, visualize.main([f"{name}.no_such_tag", _image(shapes), "--out", str(vis)]), "visualize",
             f"{name}.no_such_tag", f"{name}.sw_in1k")


# sizes each family refuses, and why: built for one size (timm's check), halo blocks that do not tile, MBConv
# shortcuts that pool without padding (MaxViT's rw models)
REFUSED_SIZES = [("ninformer", 64), ("sparsifiner", 64), ("halonet", 100), ("maxvit", 50)]


@pytest.mark.parametrize("family,size", REFUSED_SIZES)
def test_an_input_size_the_model_refuses_is_named(family, size, shapes, tmp_path, capsys):
    name = SAMPLE[family][0]
    weights = tmp_path / "w.safetensors"
    save_file(timm.create_model(name, num_classes=5).state_dict(), str(weights))
    img = ["--img-size", str(size)]
    named = (f"--img-size {size}", f"model {name}")
    _refused(capsys, train.main([str(shapes), "--model", name, "--output", str(tmp_path / "r"), *STEP, *img]),
             "train", *named)
    _refused(capsys, evaluate.main([name, str(shapes), "--checkpoint", str(weights), "--workers", "0", *img]),
             "eval", *named)
    _refused(capsys, visualize.main([name, _image(shapes), "--out", str(tmp_path / "v"), "--no-pretrained", *img]),
             "visualize", *named)


def test_model_arguments_the_model_does_not_take_are_named(shapes, tmp_path, capsys):
    name, bad = "ulsam_mobilenetv2_100", ["--model-args", '{"no_such_argument": 1}']
    weights = tmp_path / "w.safetensors"
    save_file(timm.create_model(name, num_classes=5).state_dict(), str(weights))
    named = (f"model '{name}'", "no_such_argument")
    _refused(capsys, train.main([str(shapes), "--model", name, *bad, "--output", str(tmp_path / "r"), *STEP]),
             "train", *named)
    _refused(capsys, evaluate.main([name, str(shapes), "--checkpoint", str(weights), *bad]), "eval", *named)
    _refused(capsys, visualize.main([name, _image(shapes), "--out", str(tmp_path / "v"), "--no-pretrained", *bad]),
             "visualize", *named)
    _refused(capsys, convert.main([name, str(weights), "--out", str(tmp_path / "h"), *bad]), "convert", *named)
    assert not (tmp_path / "h").exists()


# option values out of range: argparse's one-line error naming the option, before anything runs
BAD_VALUES = [("train", "--batch-size", "0"), ("train", "--accum-steps", "0"), ("train", "--epochs", "0"),
              ("train", "--workers", "-1"), ("train", "--img-size", "0"), ("train", "--lr", "-1"),
              ("train", "--drop-path", "1"), ("train", "--opt", "no_such_optimizer"), ("eval", "--batch-size", "0"),
              ("eval", "--workers", "-1"), ("visualize", "--img-size", "x")]


@pytest.mark.parametrize("tool,option,value", BAD_VALUES)
def test_an_option_value_out_of_range_is_named(tool, option, value, shapes, tmp_path, capsys):
    positional = {"train": [str(shapes), "--output", str(tmp_path / "r")], "eval": ["davit_tiny", str(shapes)],
                  "visualize": ["davit_tiny", _image(shapes), "--out", str(tmp_path / "v")]}[tool]
    with pytest.raises(SystemExit) as exit_:
        {"train": train, "eval": evaluate, "visualize": visualize}[tool].main([*positional, option, value])
    assert exit_.value.code == 2
    assert f"error: argument {option}: " in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_an_unknown_auto_augment_spec_is_named(shapes, tmp_path, capsys):
    rc = train.main([str(shapes), "--model", "ulsam_mobilenetv2_100", "--img-size", "32", "--aa", "no-such-policy",
                     "--output", str(tmp_path / "r"), *STEP])
    _refused(capsys, rc, "train", "--aa 'no-such-policy'")


def _task_data(task: str, shapes: Path, root: Path) -> Path:
    if task == "dcal":
        return _write_cub(root / "cub", classes=2, train=2, test=1)
    if task == "cca":
        return write_asen(root / "asen", size=32)
    if task == "oat":
        spec = GridSearchSpec(layouts=6, targets_per_layout=2, rows=2, cols=3, crop=29, seed=1)
        return write_oat_folder(root / "oat", *make_grid_search(spec), {"grid": spec.grid})
    return shapes


# --task NAME: a model of a family it trains, small (the classification task: every family, above)
TASK_RUNS = {
    "classification": ["--model", "ela_b_mobilenetv2_100", "--img-size", "32"],
    "sparsifiner": [*TINY_SPARSIFINER, "--sparsifiner-recon-epochs", "1"],
    "dcal": TINY_SPARSIFINER,
    "cca": [*TINY_DAVIT, "--img-size", "32", "--cca-triplets", "4", "--cca-embed-dim", "16", "--cca-heads", "2"],
    "oat": ["--oat-crop-encoder", "ela_b_mobilenetv2_100", "--oat-d-model", "32", "--oat-heads", "2",
            "--oat-layers", "1", "--oat-ffn", "32"],
}
# and a model or option it cannot train, with what the message names
TASK_REFUSALS = {
    "sparsifiner": ([*TINY_DAVIT], ("--model davit_tiny", "not a Sparsifiner")),
    "dcal": ([*TINY_DAVIT], ("--model davit_tiny", "class token")),
    "oat": (["--oat-crop-encoder", "ninformer_cifar"], ("--oat-crop-encoder ninformer_cifar", "29x29")),
}


def test_every_task_is_run():
    assert TASK_RUNS.keys() == TASKS.keys()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_each_task_trains_a_compatible_model_and_refuses_others(task, shapes, tmp_path, capsys):
    data = str(_task_data(task, shapes, tmp_path))
    run = tmp_path / "run"
    assert train.main([data, "--task", task, *TASK_RUNS[task], "--output", str(run), *STEP]) == 0
    assert (_checkpoint(run) / "model.safetensors").is_file()
    capsys.readouterr()
    if task in TASK_REFUSALS:
        argv, named = TASK_REFUSALS[task]
        rc = train.main([data, "--task", task, *argv, "--output", str(tmp_path / "refused"), *STEP])
        _refused(capsys, rc, "train", *named)


def test_detection_modes_name_what_is_missing(tmp_path, capsys):
    """The config forms of eval.py and convert.py --det (their runs: tests/det)."""
    config = Path(__file__).resolve().parents[2] / "configs" / "ravlt" / "retinanet_ravlt-t_fpn_1x_coco.py"
    missing = tmp_path / "missing.pth"
    _refused(capsys, evaluate.main([str(config), str(missing)]), "eval", str(missing))
    _refused(capsys, convert.main(["--det", str(config), str(missing), "--out", str(tmp_path / "o.pth")]),
             "convert", str(missing))
    _refused(capsys, convert.main(["--det", "davit_tiny", str(missing), "--out", str(tmp_path / "o.pth")]),
             "convert", "davit_tiny")


def test_benchmark_cpu_suite_checks_every_family(tmp_path, capsys):
    """--dry-run builds the CPU suite's op cases on each sample model's own shapes and checks every alternative
    against ours; models outside the benchmarked ones, and values that do not parse, are named."""
    out = tmp_path / "b.json"
    common = ["--device", "cpu", "--quick", "--batch", "1", "--out", str(out), "--md", str(tmp_path / "b.md")]
    names = ",".join(SAMPLE[f][0] for f in FAMILIES)
    assert benchmark.main([*common, "--dry-run", "--op-models", names, "--models", "none",
                           "--keep-rates", "0.5"]) == 0
    report = json.loads(out.read_text())
    assert not report["failed_sections"] and all(not r["errors"] for r in report["rows"])
    assert {r["name"] for r in report["rows"] if r["group"] == "op"} >= {"window_attention", "halo_attention",
                                                                          "sparse_attention", "linear_attention"}
    for bad, named in ((["--models", "ninformer_cifar"], "ninformer_cifar"), (["--keep-rates", "half"], "half"),
                       (["--device", "nowhere"], "nowhere")):
        with pytest.raises(SystemExit) as exit_:
            benchmark.main([*common, *bad])
        assert exit_.value.code == 2 and named in capsys.readouterr().err


def test_model_table_prints_and_writes(tmp_path, monkeypatch, capsys):
    assert model_table.main([]) == 0
    printed = capsys.readouterr().out
    assert all(f"`{SAMPLE[f][0]}`" in printed for f in FAMILIES)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{model_table.START}\nold\n{model_table.END}\n")
    monkeypatch.setattr(model_table, "README", readme)
    assert model_table.main(["--write"]) == 0
    assert model_table.readme_table(readme.read_text()) == printed.strip()


# ----------------------------------------------------------------------------------- every model of the registry

MODELS = sorted(n for names in model_table.attnzoo_models().values() for n in names)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_every_model_visualizes_and_evaluates(name, shapes, tmp_path, capsys):
    """visualize --no-pretrained and eval --checkpoint at the model's own size, every registered model."""
    assert visualize.main([name, _image(shapes), "--out", str(tmp_path / "vis"), "--no-pretrained"]) == 0
    weights = tmp_path / "w.safetensors"
    save_file(timm.create_model(name, num_classes=5).state_dict(), str(weights))
    assert evaluate.main([name, str(shapes), "--checkpoint", str(weights), "--workers", "0", "--batch-size", "5",
                          "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["images"] == 5
