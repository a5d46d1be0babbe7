"""What the tools do on a bad day: unreadable images met in the loader (no start-up scan), log.csv and the options
across a resume, SIGINT/SIGTERM, and one line naming the file with exit status 2 (bad input) or 1 (environment)
for corrupt files, full disks, read-only or missing folders."""
from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from attnzoo.cli import tool_main
from attnzoo.common import InputError, UnreadableSample
from attnzoo.engine.sampler import SeededSamples

from .conftest import FAST, TINY_DAVIT, load_tool, tool_env
from .test_train import _checkpoint, _tensors, _train_cmd

train, publish, convert, evaluate = (load_tool(n) for n in ("train", "publish", "convert", "eval"))


def _rows(run: Path) -> list[dict]:
    """log.csv's rows without the wall-clock columns (time, speed, the share spent waiting for data)."""
    rows = list(csv.DictReader((run / "log.csv").open()))
    for row in rows:
        del row["seconds"], row["img_per_s"], row["data_wait"]
    return rows


def _one_line_error(capsys, status: int, rc: int, *expected: str) -> str:
    assert rc == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


def _truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: its header parses (``Image.verify`` passes), its pixels do not decode."""
    Image.effect_noise((64, 64), 64).convert("RGB").save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as image:
        image.verify()
    return path


# -------------------------------------------------------------------------------- unreadable images, no scan


def test_a_short_run_opens_only_the_images_it_trains_on(tmp_path, monkeypatch, capsys):
    """3,000 training images, 2 steps of 4: 8 images opened, none before the first step."""
    data = tmp_path / "many"
    image = Image.new("RGB", (8, 8))
    for split, per_class in (("train", 1500), ("val", 4)):
        for c in ("a", "b"):
            (data / split / c).mkdir(parents=True)
            for i in range(per_class):
                image.save(data / split / c / f"{i}.png")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    assert train.main([str(data), "--output", str(tmp_path / "run"), *TINY_DAVIT, *FAST, "--max-steps", "2"]) == 0
    assert len(opened) == 8 and all("/train/" in p for p in opened), opened


class _Flaky(Dataset):
    """Index 3 cannot be read; every other sample is its index plus a draw from the seeded generator."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int):
        if index == 3:
            raise UnreadableSample("x/3.jpg", "OSError: image file is truncated")
        return index, torch.rand(()).item()


def test_an_unreadable_sample_is_replaced_by_a_function_of_its_seed():
    samples = SeededSamples(_Flaky())
    (good, draw), unreadable = samples[(3, 1234)]
    assert unreadable == [("x/3.jpg", "OSError: image file is truncated")] and good != 3
    assert samples[(3, 1234)] == ((good, draw), unreadable)  # again, as a resumed run would load it
    assert samples[(good, 99)][1] == []
    picked = {samples[(3, seed)][0][0] for seed in range(20)}
    assert 3 not in picked and len(picked) > 1  # drawn from the seed, not always the next index


def test_a_truncated_jpeg_is_decoded_named_counted_and_replaced(shapes, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "train" / "circle" / "circle_00000.png").unlink()  # 20 images: every one is in an epoch's batches
    bad_train = _truncated_jpeg(data / "train" / "circle" / "cut.jpg")
    bad_val = _truncated_jpeg(data / "val" / "star" / "cut.jpg")
    assert train.main([str(data), "--output", str(tmp_path / "run"), *TINY_DAVIT, *FAST, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"unreadable image, replaced by another sample: {bad_train}: OSError") == 1
    assert out.count(f"unreadable image, replaced by another sample: {bad_val}: OSError") == 1
    [row] = _rows(tmp_path / "run")
    assert (row["unreadable"], row["val_unreadable"]) == ("1", "1")
    # eval leaves it out and counts it
    assert evaluate.main(["davit_tiny", str(data), "--checkpoint",
                          str(_checkpoint(tmp_path / "run") / "model.safetensors"), "--model-args",
                          TINY_DAVIT[3], "--img-size", "32",
                          "--workers", "0"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert (result["images"], result["skipped"]) == (10, 1) and f"left out: {bad_val}" in out


# ----------------------------------------------------------------------------------------------------- resume


def test_log_sums_survive_resume_and_changed_options_are_said(shapes, tmp_path, capsys):
    """One epoch (5 steps) straight, and as 2 steps + a resume: the same log.csv row and weights, a truncated
    image replaced alike. The resume changes --max-steps (this command line's) and --lr (the run's own): one line
    each says which value is kept."""
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "train" / "cross" / "cross_00001.png").unlink()
    _truncated_jpeg(data / "train" / "cross" / "cut.jpg")  # in the epoch's 2nd batch: before the cut
    common = [str(data), *TINY_DAVIT, *FAST, "--epochs", "2"]
    assert train.main([*common, "--output", str(tmp_path / "whole"), "--max-steps", "5"]) == 0
    assert train.main([*common, "--output", str(tmp_path / "cut"), "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert train.main([*common, "--output", str(tmp_path / "cut"), "--resume", "--max-steps", "5",
                       "--lr", "0.5"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume:")]
    assert said == ["resume: --lr 0.5 ignored: the run's 0.001 is kept (a resumed run may change only DATA, "
                    "--output, --max-steps, --workers, --prefetch-factor, --log-interval)",
                    "resume: --max-steps 5 from this command line (the run had 2)"]
    assert _rows(tmp_path / "whole") == _rows(tmp_path / "cut") and len(_rows(tmp_path / "cut")) == 1
    assert _rows(tmp_path / "cut")[0]["unreadable"] == "1"
    a, b = _tensors(_checkpoint(tmp_path / "whole")), _tensors(_checkpoint(tmp_path / "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model/"))
    # a resume without --max-steps goes on to the end of --epochs, and says so; again, there is nothing left
    assert train.main([*common, "--output", str(tmp_path / "cut"), "--resume", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "resume: --max-steps unset from this command line (the run had 5)" in out and "--epochs" not in out
    assert json.loads((tmp_path / "cut" / "checkpoints" / "last.json").read_text())["step"] == 10
    assert train.main([*common, "--output", str(tmp_path / "cut"), "--resume"]) == 0
    assert "nothing to do: the run is at step 10" in capsys.readouterr().out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_that_resumes_exactly(shapes, tmp_path, signum):
    """Signalled after its first step (SIGINT to the whole process group, as Ctrl-C, loader worker included):
    the step in progress finishes, a checkpoint is written, the exit status is 128 + the signal; resumed, the
    run reaches the weights of an uninterrupted one."""
    args = ("--max-steps", "10", "--checkpoint-every", "1", "--workers", "1")  # 2 epochs
    log = (tmp_path / "stopped.log").open("w")
    stopped = subprocess.Popen(_train_cmd(shapes, tmp_path / "stopped", *args), env=tool_env(), stdout=log,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    pointer = tmp_path / "stopped" / "checkpoints" / "last.json"
    deadline = time.monotonic() + 300
    while not pointer.exists() and stopped.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(stopped.pid, signum)
    err = stopped.communicate(timeout=300)[1]
    assert stopped.returncode == 128 + signum, err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith(f"train.py: stopped: {signum.name} after step "), err
    step = json.loads(pointer.read_text())["step"]
    assert 1 <= step < 10 and f"after step {step}: checkpoint " in last and "--resume" in last
    assert train.main(_train_cmd(shapes, tmp_path / "stopped", "--resume")[2:]) == 0
    assert train.main(_train_cmd(shapes, tmp_path / "whole", *args)[2:]) == 0
    a, b = _tensors(_checkpoint(tmp_path / "whole")), _tensors(_checkpoint(tmp_path / "stopped"))
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k]) and not k.startswith("optimizer/rng.")] == []
    assert _rows(tmp_path / "whole") == _rows(tmp_path / "stopped") and len(_rows(tmp_path / "whole")) == 2


# ---------------------------------------------------------------------------------------------- corrupt files


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    torch.set_num_threads(1)
    assert train.main([str(shapes), "--output", str(out), *TINY_DAVIT, *FAST, "--max-steps", "1"]) == 0
    return out


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _cut(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_corrupt_checkpoint_files_are_named(run_copy, shapes, tmp_path, capsys):
    ckpt = _checkpoint(run_copy)
    weights = ckpt / "model.safetensors"
    # truncated safetensors: eval --checkpoint, convert, publish, train --resume
    _cut(weights)
    loose = shutil.copy(weights, tmp_path / "loose.safetensors")  # outside a checkpoint: no digest to check
    for path, problem in ((weights, "is corrupt: its sha256 is"), (loose, "is not a readable safetensors file")):
        _one_line_error(capsys, 2, evaluate.main(["davit_tiny", str(shapes), "--checkpoint", str(path)]),
                        f"eval.py: error: {'' if path == weights else 'checkpoint '}{path} {problem}")
        _one_line_error(capsys, 2, convert.main(["davit_tiny", str(path), "--out", str(tmp_path / "hub")]),
                        f"{path} {problem}")
    _one_line_error(capsys, 2, publish.main([str(run_copy), "--out", str(tmp_path / "hub")]), str(weights))
    _one_line_error(capsys, 2, train.main([str(shapes), "--output", str(run_copy), "--resume"]),
                    f"{weights} is corrupt")
    # a header that is not safetensors'
    loose.write_bytes(b"\xff" * 64)
    _one_line_error(capsys, 2, convert.main(["davit_tiny", str(loose), "--out", str(tmp_path / "hub")]),
                    "header too large")
    # a corrupt state.json, then a corrupt last.json
    (ckpt / "state.json").write_text('{"step": 1, "ar')
    _one_line_error(capsys, 2, publish.main([str(run_copy), "--out", str(tmp_path / "hub")]),
                    f"{ckpt / 'state.json'} is corrupt")
    _one_line_error(capsys, 2, train.main([str(shapes), "--output", str(run_copy), "--resume"]), "state.json")
    pointer = run_copy / "checkpoints" / "last.json"
    pointer.write_bytes(b"\x00" * 10)
    _one_line_error(capsys, 2, publish.main([str(run_copy), "--out", str(tmp_path / "hub")]), f"{pointer} is corrupt")
    assert not (tmp_path / "hub").exists()


def test_truncated_and_foreign_pth_files_are_named(tmp_path, capsys):
    pth = tmp_path / "authors.pth"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, pth)
    _cut(pth)
    _one_line_error(capsys, 2, convert.main(["davit_tiny", str(pth), "--out", str(tmp_path / "hub")]),
                    f"checkpoint {pth} cannot be read with torch.load(weights_only=True): PytorchStreamReader")
    pth.write_bytes(b"not a torch file at all")
    _one_line_error(capsys, 2, convert.main(["davit_tiny", str(pth), "--out", str(tmp_path / "hub")]), str(pth))


def test_broken_hub_folders_are_named(trained, shapes, tmp_path, capsys):
    hub = tmp_path / "hub"
    assert publish.main([str(trained), "--out", str(hub)]) == 0
    config = hub / "config.json"
    good = config.read_text()
    argv = [f"local-dir:{hub}", str(shapes), "--workers", "0"]
    config.write_text(good[:40])
    _one_line_error(capsys, 2, evaluate.main(argv), f"{config} is corrupt")
    config.write_text(good.replace('"davit_tiny"', '"davit_nonesuch"'))
    _one_line_error(capsys, 2, evaluate.main(argv), f"{config}: architecture 'davit_nonesuch' is not registered")
    config.write_text(good)
    _cut(hub / "model.safetensors", 0.9)
    _one_line_error(capsys, 2, evaluate.main(argv), f"{hub / 'model.safetensors'} is corrupt")


# ------------------------------------------------------------------------------------------------ environment


def test_a_folder_that_cannot_be_made_is_an_environment_error(trained, shapes, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    _one_line_error(capsys, 1, train.main([str(shapes), "--output", str(blocker / "run"), *TINY_DAVIT, *FAST,
                                           "--max-steps", "1"]), "train.py: error: ", str(blocker))
    _one_line_error(capsys, 1, publish.main([str(trained), "--out", str(blocker / "hub")]), str(blocker))


def _raises(e: BaseException):
    def body():
        raise e
    return body


@pytest.mark.parametrize(("error", "status", "expected"), [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/log.csv"), 1,
     "t.py: error: runs/x/log.csv: No space left on device (ENOSPC): free space or choose another folder"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/run"), 1, "/ro/run: Read-only file system (EROFS)"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/x/hub"), 1, "/x/hub: Permission denied (EACCES)"),
    (FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/gone"), 1, "/gone: No such file or directory"),
    (FileNotFoundError("Caught FileNotFoundError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                       "call last):\n  ...\nFileNotFoundError: [Errno 2] No such file: 'coco/x.jpg'"), 1,
     "t.py: error: [Errno 2] No such file: 'coco/x.jpg'"),
    (InputError("Caught InputError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
                "  ...\nattnzoo.common.InputError: 11 unreadable samples in a row, e.g. x.jpg"), 2,
     "t.py: error: 11 unreadable samples in a row, e.g. x.jpg"),
    (InputError("bad thing"), 2, "t.py: error: bad thing"),
    (KeyboardInterrupt(), 130, "t.py: stopped: interrupted (SIGINT)"),
])
def test_each_failure_family_is_one_line_and_a_status(error, status, expected, capsys, monkeypatch):
    monkeypatch.delenv("ATTNZOO_DEBUG", raising=False)
    cleaned = []
    assert tool_main("t.py", _raises(error), cleanup=lambda: cleaned.append(1)) == status
    err = capsys.readouterr().err
    assert err.startswith("t.py: ") and err.count("\n") == 1 and expected in err, err
    assert cleaned == [1]


def test_a_bug_keeps_its_traceback_and_debug_re_raises(monkeypatch):
    with pytest.raises(ZeroDivisionError):
        tool_main("t.py", _raises(ZeroDivisionError()))
    monkeypatch.setenv("ATTNZOO_DEBUG", "1")
    with pytest.raises(InputError):
        tool_main("t.py", _raises(InputError("bad thing")))
