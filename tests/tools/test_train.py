"""tools/train.py: outputs, exact resumption after SIGKILL, DDP, fine-tuning with a new head, bad input (more in
test_errors.py)."""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

from attnzoo.tasks import create_model

from .conftest import FAST, ROOT, TINY_DAVIT, load_tool, tool_env

train = load_tool("train")


def _checkpoint(run: Path) -> Path:
    return run / "checkpoints" / json.loads((run / "checkpoints" / "last.json").read_text())["checkpoint"]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("model", "ema", "optimizer"):
        if (folder / f"{name}.safetensors").is_file():
            out.update({f"{name}/{k}": v for k, v in load_file(folder / f"{name}.safetensors").items()})
    return out


def test_run_writes_safetensors_checkpoint_csv_and_plot(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    rc = train.main([str(shapes), "--output", str(out), *TINY_DAVIT, *FAST, "--epochs", "2", "--accum-steps", "2",
                     "--ema-decay", "0.9"])
    assert rc == 0
    printed = capsys.readouterr().out
    ckpt = _checkpoint(out)
    # 20 images / batch 4 = 5 micro-batches an epoch, in optimizer steps of 2 + 2 + 1
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (6, 2, 0)
    assert sorted(p.name for p in ckpt.iterdir()) == ["ema.safetensors", "model.safetensors",
                                                      "optimizer.safetensors", "state.json"]
    assert not [p for p in out.rglob("*") if p.suffix in (".pth", ".pt", ".pkl", ".tmp")]
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,lr,train_loss,val_loss,top1,top5") and len(rows) == 3
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if importlib.util.find_spec("tensorboard") is None:
        assert printed.count("tensorboard is not installed") == 1
    # the checkpoint loads into the model it came from, strictly; the optimizer state has every parameter
    model = timm.create_model("davit_tiny", num_classes=5, **json.loads(TINY_DAVIT[3]))
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    n_params = len(list(model.parameters()))
    assert len({k.split(".")[1] for k in load_file(ckpt / "optimizer.safetensors") if k.startswith("state.")}) \
        == n_params


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "train.py"), str(data), "--output", str(out), *TINY_DAVIT, *FAST,
            "--epochs", "2", "--drop-path", "0.1", "--ema-decay", "0.9", *extra]


def test_killed_and_resumed_run_reaches_the_same_weights(shapes, tmp_path):
    """Augmentation, mixup and drop-path all draw random numbers; SIGKILL mid-epoch, resume, compare at step 8."""
    env = tool_env()
    args = ("--max-steps", "8", "--checkpoint-every", "2")
    whole_log = (tmp_path / "whole.log").open("w")  # a file, not a pipe nobody reads while the runs go on
    whole = subprocess.Popen(_train_cmd(shapes, tmp_path / "whole", *args), env=env, stdout=whole_log,
                             stderr=subprocess.STDOUT)  # alongside the run to be killed
    killed = subprocess.Popen(_train_cmd(shapes, tmp_path / "killed", *args), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = tmp_path / "killed" / "checkpoints" / "last.json"
    deadline = time.monotonic() + 300
    while not pointer.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    stopped_at = json.loads(pointer.read_text())["step"]
    assert stopped_at < 8
    assert whole.wait() == 0, (tmp_path / "whole.log").read_text()[-3000:]

    resumed = subprocess.run(_train_cmd(shapes, tmp_path / "killed", "--resume", "--max-steps", "8"), env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and f"at step {stopped_at}" in resumed.stdout
    a, b = _tensors(_checkpoint(tmp_path / "whole")), _tensors(_checkpoint(tmp_path / "killed"))
    assert a.keys() == b.keys()
    assert [k for k in a if k.startswith("model/") and not torch.equal(a[k], b[k])] == []
    assert [k for k in a if not torch.equal(a[k], b[k]) and not k.startswith("optimizer/rng.")] == []
    # the epoch the kill cut in two has the same log.csv row (its partial sums were in the checkpoint)
    rows = [list(csv.DictReader((tmp_path / run / "log.csv").open())) for run in ("whole", "killed")]
    for row in (*rows[0], *rows[1]):
        del row["seconds"], row["img_per_s"], row["data_wait"]
    assert rows[0] == rows[1] and len(rows[0]) == 1


def test_two_ddp_processes_match_one_process_with_twice_the_batch(shapes, tmp_path):
    """torchrun, gloo on the CPU: rank r takes every other sample of the same order, so 2 x batch 2 = 1 x batch 4."""
    env = tool_env()
    common = ("--epochs", "1", "--mixup", "0", "--cutmix", "0", "--drop-path", "0")
    single = subprocess.run(_train_cmd(shapes, tmp_path / "one", *common), env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    cmd = _train_cmd(shapes, tmp_path / "two", *common, "--batch-size", "2")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *cmd[1:]], env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = _checkpoint(tmp_path / "one"), _checkpoint(tmp_path / "two")
    assert json.loads((two / "state.json").read_text())["world_size"] == 2
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    row_one, row_two = ((p.parent.parent / "log.csv").read_text().splitlines()[1].split(",") for p in (one, two))
    assert row_one[1] == row_two[1]  # steps
    assert float(row_one[5]) == float(row_two[5])  # val top-1, gathered over the two shards
    assert abs(float(row_one[4]) - float(row_two[4])) < 1e-4  # val loss


def test_pretrained_fine_tuning_gets_the_hub_weights_and_a_new_head(offline_hub, tmp_path):
    kwargs = json.loads(TINY_DAVIT[3])
    published = timm.create_model("davit_tiny", num_classes=1000, **kwargs).state_dict()
    offline_hub("timm/davit_tiny.msft_in1k", published)
    args = train.parse_args(["unused", *TINY_DAVIT, "--pretrained"])
    model = create_model(args, num_classes=7)
    own = model.state_dict()
    assert own["head.fc.weight"].shape == (7, 64)
    body = [k for k in own if not k.startswith("head.fc.")]
    assert body and all(torch.equal(own[k], published[k]) for k in body)
    # the same through a local file
    file = offline_hub("timm/davit_tiny.msft_in1k", published, filename="local.safetensors")
    args = train.parse_args(["unused", *TINY_DAVIT, "--pretrained-file", str(file)])
    said = []
    own = create_model(args, log=said.append, num_classes=3).state_dict()
    assert all(torch.equal(own[k], published[k]) for k in body) and own["head.fc.bias"].shape == (3,)
    assert len(said) == 1 and "new classifier (head.fc.bias, head.fc.weight" in said[0]
    # the same class count: nothing to say, the head loaded too
    said.clear()
    own = create_model(args, log=said.append, num_classes=1000).state_dict()
    assert not said and torch.equal(own["head.fc.weight"], published["head.fc.weight"])


def test_pretrained_file_loads_strictly(shapes, tmp_path, capsys):
    """A file that does not hold the model's weights is an error naming the keys, not a run from random
    weights; only the classifier may differ."""
    file = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3)}, file)
    argv = [str(shapes), "--output", str(tmp_path / "r"), *TINY_DAVIT, *FAST, "--max-steps", "1",
            "--pretrained-file", str(file)]
    _fails(capsys, argv, f"checkpoint {file} does not fit model davit_tiny", "missing from the checkpoint",
           "not in the model", "encoder.weight")
    body = {k: v for k, v in timm.create_model("davit_tiny", num_classes=5, **json.loads(TINY_DAVIT[3]))
            .state_dict().items() if "stages.3" not in k}
    save_file(body, file)
    _fails(capsys, argv, "missing from the checkpoint", "stages.3.")


# ---------------------------------------------------------------------------------------------------- bad input


def _fails(capsys, argv: list[str], *expected: str) -> None:
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err


def test_missing_or_empty_data_folder(tmp_path, capsys):
    out = tmp_path / "run"
    _fails(capsys, [str(tmp_path / "nope"), "--output", str(out), *TINY_DAVIT], "data folder", "does not exist")
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    _fails(capsys, [str(tmp_path / "empty"), "--output", str(out), *TINY_DAVIT], "has no images")
    (tmp_path / "flat").mkdir()
    _fails(capsys, [str(tmp_path / "flat"), "--output", str(out), *TINY_DAVIT], "has no train/ sub-folder")
    assert not out.exists()  # nothing half-written


def test_an_empty_class_folder_is_named(shapes, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "train" / "zebra").mkdir()
    _fails(capsys, [str(data), "--output", str(tmp_path / "r"), *TINY_DAVIT],
           "train: class folder(s) zebra hold no image")
    assert not (tmp_path / "r").exists()


def test_unregistered_model_lists_the_closest_names(shapes, tmp_path, capsys):
    _fails(capsys, [str(shapes), "--output", str(tmp_path / "r"), "--model", "davit_tiyn"],
           "'davit_tiyn' is not registered", "davit_tiny")
    assert not (tmp_path / "r").exists()


def test_resume_needs_a_checkpoint_and_a_finished_run_needs_resume(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    _fails(capsys, [str(shapes), "--output", str(out), *TINY_DAVIT, "--resume"], "no checkpoint")
    assert train.main([str(shapes), "--output", str(out), *TINY_DAVIT, *FAST, "--max-steps", "1"]) == 0
    _fails(capsys, [str(shapes), "--output", str(out), *TINY_DAVIT, *FAST], "already holds a run", "--resume")
