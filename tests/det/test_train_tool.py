"""tools/train.py and tools/eval.py on mmdetection configs (attnzoo.det.runner): a tiny DaViT RetinaNet and
Mask R-CNN on a tiny shapes COCO set (64 px), atomic checkpoints, exact resumption, COCO mAP, bad input."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet", reason="the det extra is not installed")

from attnzoo.data import ShapesSpec, make_shapes_dataset  # noqa: E402
from attnzoo.det.checkpoint import AtomicLocalBackend  # noqa: E402
from attnzoo.engine import output_lock  # noqa: E402

from ..tools.conftest import ROOT, load_tool, one_thread, tool_env  # noqa: E402, F401  (one_thread: autouse)

train = load_tool("train")
evaluate = load_tool("eval")

# shared by both models: a DaViT with one block a stage and 8-64 channels, 64 px inputs, batch 2, no workers
_COMMON = """
model = dict(backbone=dict(embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                           drop_path_rate=0.3, init_cfg=None))  # stochastic depth: the step draws from torch
_load = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True, with_mask={masks})]
_resize = dict(type='Resize', scale=(64, 64), keep_ratio=True)
_train = [*_load, _resize, dict(type='RandomFlip', prob=0.5), dict(type='PackDetInputs')]
_test = [_load[0], _resize, _load[1],
         dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(pipeline=_train))
val_dataloader = dict(batch_size=5, num_workers=0, persistent_workers=False, dataset=dict(pipeline=_test))
test_dataloader = val_dataloader
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=4, val_begin=100)  # no val
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=3)]
default_hooks = dict(checkpoint=dict(interval=2, by_epoch=False), logger=dict(interval=1))
log_processor = dict(by_epoch=False)
"""
RETINANET = """_base_ = '{root}/configs/davit/retinanet_davit-t_fpn_1x_coco.py'
""" + _COMMON.format(masks=False) + """
model.update(neck=dict(in_channels=[16, 32, 64], out_channels=16),
             bbox_head=dict(in_channels=16, feat_channels=16, stacked_convs=1),
             test_cfg=dict(score_thr=0.0))  # an untrained head's scores are below the default 0.05
val_evaluator = dict(metric='bbox')
test_evaluator = val_evaluator
"""
MASK_RCNN = """_base_ = '{root}/configs/davit/mask-rcnn_davit-t_fpn_1x_coco.py'
""" + _COMMON.format(masks=True) + """
model.update(
    neck=dict(in_channels=[8, 16, 32, 64], out_channels=16),
    rpn_head=dict(in_channels=16, feat_channels=16),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=16), bbox_head=dict(in_channels=16, fc_out_channels=32),
                  mask_roi_extractor=dict(out_channels=16),
                  mask_head=dict(in_channels=16, conv_out_channels=16, num_convs=1)),
    test_cfg=dict(rcnn=dict(score_thr=0.0, max_per_img=20)))
train_cfg.update(max_iters=1)
default_hooks['checkpoint'].update(interval=1)
"""


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """The shapes set as COCO: 10 train and 5 val images of 64 px, 5 categories, boxes and polygons."""
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes",
                               ShapesSpec(train_per_class=2, val_per_class=1, image_size=64, seed=0))


def _config(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(text.format(root=ROOT))
    return path


def _losses(run: Path) -> dict[int, float]:
    """iteration -> training loss, from the scalars.json mmengine's LocalVisBackend wrote in each run of ``run``."""
    rows = [json.loads(line) for f in sorted(run.glob("*/vis_data/scalars.json")) for line in f.read_text().split("\n")
            if line]
    return {row["iter"]: row["loss"] for row in rows if "loss" in row}


def _state(checkpoint: Path) -> dict:
    return torch.load(checkpoint, weights_only=True)  # the allow-list of attnzoo.det makes it loadable so


@pytest.fixture(scope="module")
def retinanet(coco, tmp_path_factory) -> tuple[Path, Path, str]:
    """A 4-iteration RetinaNet run (checkpoints at 2 and 4): its config, its output and what it printed."""
    folder = tmp_path_factory.mktemp("retinanet")
    config = _config(folder, "tiny_retinanet", RETINANET)
    out = folder / "run"
    printed, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)  # as the resumed run in a test will (one_thread is set up after this fixture)
    with contextlib.redirect_stdout(printed):
        rc = train.main([str(config), "--data-root", str(coco), "--output", str(out), "--seed", "0"])
    torch.set_num_threads(threads)
    assert rc == 0, printed.getvalue()[-3000:]
    return config, out, printed.getvalue()


def test_training_writes_checkpoints_atomically_and_the_loss_falls(retinanet, coco):
    config, out, printed = retinanet
    assert f"checkpoint: {out / 'iter_4.pth'}" in printed
    assert sorted(p.name for p in out.glob("*.pth")) == ["iter_2.pth", "iter_4.pth"]
    assert Path((out / "last_checkpoint").read_text()).name == "iter_4.pth"
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]  # no temp file left
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses[4] < losses[1]
    state = _state(out / "iter_4.pth")
    assert state["meta"]["iter"] == 4
    # --data-root took the shapes' categories and sized the classifier for them (5 classes, not COCO's 80)
    assert state["meta"]["dataset_meta"]["classes"] == ("circle", "square", "triangle", "star", "cross")
    num_anchors = 9
    assert state["state_dict"]["bbox_head.retina_cls.weight"].shape[0] == 5 * num_anchors


def test_resumed_run_reaches_the_same_weights(retinanet, coco, tmp_path):
    """A run stopped after its iteration-2 checkpoint (the folder as it was then) resumes to iteration 4 with the
    weights, optimizer and scheduler state of the uninterrupted run, training only iterations 3 and 4."""
    config, whole, _ = retinanet
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(whole / "iter_2.pth", stopped)
    (stopped / "last_checkpoint").write_text(str(whole / "iter_2.pth"))  # written by the run in another folder
    assert train.main([str(config), "--data-root", str(coco), "--output", str(stopped), "--seed", "0",
                       "--resume"]) == 0
    resumed_losses, whole_losses = _losses(stopped), _losses(whole)
    assert sorted(resumed_losses) == [3, 4]  # it went on from iteration 2 rather than starting again
    assert resumed_losses == {i: whole_losses[i] for i in (3, 4)}
    a, b = _state(whole / "iter_4.pth"), _state(stopped / "iter_4.pth")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])] == []
    for pid, entries in a["optimizer"]["state"].items():
        for name, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][pid][name]))
    assert a["param_schedulers"] == b["param_schedulers"]


def test_eval_prints_and_writes_coco_bbox_map(retinanet, coco, tmp_path, capsys):
    config, out, _ = retinanet
    capsys.readouterr()
    rc = evaluate.main([str(config), str(out / "iter_4.pth"), "--data-root", str(coco), "--output",
                        str(tmp_path / "eval"), "--out", str(tmp_path / "metrics.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    results = json.loads(printed[printed.index('{\n  "config"'):])
    assert results == json.loads((tmp_path / "metrics.json").read_text())
    metrics = results["metrics"]
    assert {"coco/bbox_mAP", "coco/bbox_mAP_50", "coco/bbox_mAP_75"} <= metrics.keys()
    assert 0.0 <= metrics["coco/bbox_mAP"] <= metrics["coco/bbox_mAP_50"] <= 1.0


def test_mask_rcnn_trains_and_eval_reports_bbox_and_segm_map(coco, tmp_path, capsys):
    config = _config(tmp_path, "tiny_mask_rcnn", MASK_RCNN)
    assert train.main([str(config), "--data-root", str(coco), "--output", str(tmp_path / "run")]) == 0
    loss = _losses(tmp_path / "run")[1]
    assert torch.isfinite(torch.tensor(loss))
    capsys.readouterr()
    assert evaluate.main([str(config), str(tmp_path / "run" / "iter_1.pth"), "--data-root", str(coco),
                          "--output", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(printed[printed.index('{\n  "config"'):])["metrics"]
    for kind in ("bbox", "segm"):
        assert 0.0 <= metrics[f"coco/{kind}_mAP"] <= 1.0


# about 70 s on 2 shared cores: two torchrun launches of two processes, each importing mmdet
@pytest.mark.slow
def test_torchrun_trains_with_two_gloo_processes_and_evaluates_as_one(retinanet, coco, tmp_path, capsys):
    config = retinanet[0]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp = subprocess.run([*torchrun, str(ROOT / "tools" / "train.py"), str(config), "--data-root", str(coco),
                          "--output", str(tmp_path / "run"), "--cfg-options", "train_cfg.max_iters=2"],
                         env=tool_env(), capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert ddp.stdout.count("checkpoint: ") == 1  # rank 0 reports
    checkpoint = tmp_path / "run" / "iter_2.pth"
    assert "Distributed training: True" in ddp.stdout and _state(checkpoint)["meta"]["iter"] == 2
    args = [str(config), str(checkpoint), "--data-root", str(coco), "--output", str(tmp_path / "eval")]
    ddp = subprocess.run([*torchrun, str(ROOT / "tools" / "eval.py"), *args, "--out", str(tmp_path / "two.json")],
                         env=tool_env(), capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert evaluate.main([*args, "--out", str(tmp_path / "one.json")]) == 0
    # each process evaluates half the images; CocoMetric gathers them before computing the mAP
    two, one = (json.loads((tmp_path / f"{n}.json").read_text())["metrics"] for n in ("two", "one"))
    assert two == one and "coco/bbox_mAP" in one


def test_atomic_backend_leaves_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "iter_2.pth"
    AtomicLocalBackend().put(b"complete", target)
    assert target.read_bytes() == b"complete"

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        AtomicLocalBackend().put(b"partial", target)
    assert target.read_bytes() == b"complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_2.pth"]


# ---------------------------------------------------------------------------------------------------- bad input


def _fails(capsys, tool, argv: list[str], *expected: str) -> None:
    capsys.readouterr()
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err


def test_config_paths_are_rejected_clearly(tmp_path, capsys):
    _fails(capsys, train, [str(tmp_path / "missing.py")], "config", "missing.py does not exist")
    _fails(capsys, evaluate, [str(tmp_path / "missing.py"), "x.pth"], "missing.py does not exist")
    plain = tmp_path / "plain.py"
    plain.write_text("x = 1\n")
    _fails(capsys, train, [str(plain)], "plain.py is not an mmdetection/mmsegmentation config")
    broken = tmp_path / "broken.py"
    broken.write_text("model = dict(\n")
    _fails(capsys, train, [str(broken)], "broken.py cannot be read as an mmengine config", "SyntaxError")


def test_resume_needs_a_checkpoint_and_a_run_needs_resume(retinanet, coco, tmp_path, capsys):
    config, out, _ = retinanet
    args = [str(config), "--data-root", str(coco)]
    _fails(capsys, train, [*args, "--output", str(tmp_path / "empty"), "--resume"], "--resume: no checkpoint in")
    _fails(capsys, train, [*args, "--output", str(out)], "already holds a run (checkpoint iter_4.pth)", "--resume")


def test_a_run_into_a_held_output_exits_naming_the_holder(retinanet, coco, tmp_path, capsys):
    """One run at a time: this process holds the folder, as a run in progress would; a second run exits 2 naming
    its pid and writes nothing there."""
    config = retinanet[0]
    held = tmp_path / "held"
    with output_lock(held):
        _fails(capsys, train, [str(config), "--data-root", str(coco), "--output", str(held)],
               f"in use by another run (pid {os.getpid()}")
        assert sorted(p.name for p in held.iterdir()) == [".lock"]


def test_data_root_errors_name_the_file(retinanet, coco, tmp_path, capsys):
    config = retinanet[0]
    out = ["--output", str(tmp_path / "run")]
    _fails(capsys, train, [str(config), "--data-root", str(tmp_path / "nope"), *out],
           "--data-root", "nope does not exist")
    (tmp_path / "empty").mkdir()
    _fails(capsys, train, [str(config), "--data-root", str(tmp_path / "empty"), *out],
           "annotations/instances_train2017.json (COCO 2017) or", "annotations/instances_train.json")
    bad = tmp_path / "bad"
    shutil.copytree(coco / "annotations", bad / "annotations")
    (bad / "annotations" / "instances_train.json").write_text("{not json")
    _fails(capsys, train, [str(config), "--data-root", str(bad), *out], "instances_train.json: not a readable COCO")
    _fails(capsys, train, [str(config), *out], "data/coco/annotations/instances_train2017.json (train_dataloader) "
           "does not exist", "--data-root")
    assert not (tmp_path / "run").exists()  # nothing written


def test_an_image_the_annotations_name_but_the_folder_lacks_is_named(retinanet, coco, tmp_path, capsys):
    config, out, _ = retinanet
    data = tmp_path / "coco"
    shutil.copytree(coco, data)
    name = json.loads((data / "annotations" / "instances_val.json").read_text())["images"][0]["file_name"]
    missing = data / name  # the shapes set's file names are relative to the data root
    missing.unlink()
    _fails(capsys, evaluate, [str(config), str(out / "iter_4.pth"), "--data-root", str(data), "--output",
                              str(tmp_path / "eval")], f"image {missing} does not exist, yet the annotation file")


def test_eval_rejects_missing_foreign_and_unreadable_checkpoints(retinanet, coco, tmp_path, capsys):
    config, out, _ = retinanet
    args = ["--data-root", str(coco), "--output", str(tmp_path / "eval")]
    _fails(capsys, evaluate, [str(config), str(tmp_path / "none.pth"), *args], "checkpoint", "none.pth does not exist")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    _fails(capsys, evaluate, [str(config), str(garbage), *args], "garbage.pth cannot be loaded")
    # the checkpoint of a RetinaNet with 32 FPN channels does not fit the 16-channel one: the keys are named
    wide = tmp_path / "wide.pth"
    state = _state(out / "iter_4.pth")
    state["state_dict"] = {k: torch.cat([v, v]) if k.startswith("neck.") else v for k, v in state["state_dict"].items()}
    del state["state_dict"]["bbox_head.retina_reg.bias"]
    torch.save(state, wide)
    _fails(capsys, evaluate, [str(config), str(wide), *args], "does not fit the model", "bbox_head.retina_reg.bias",
           "size mismatch for neck.")
