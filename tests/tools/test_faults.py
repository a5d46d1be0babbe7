"""A user's bad day, injected: kill -9 at file operations, a full disk, a read-only folder, two runs at once,
flipped bits. Nothing is lost (the previous result or the new one, never neither), resumes reach the same
weights, and every failure is named.

The faults come from ``faultshim.c``, an LD_PRELOAD library built here with the system compiler, which counts
the file operations under one folder and kills the process at operation N, fails writes with ENOSPC past a byte
budget, or fails every change with EROFS. ``fault_driver.py`` runs the tools under it, each run a fork of one
process that imported them once. The default tests kill at every operation of a checkpoint write and at a sample
of those of publish, convert and eval; ``-m slow`` kills at every one of theirs too and resumes every killed run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from attnzoo.common import InputError, recover, sha256_file, verify_hub_folder
from attnzoo.engine import last_checkpoint, output_lock, verify_checkpoint

from .conftest import FAST, TINY_DAVIT, load_tool, tool_env

HERE = Path(__file__).resolve().parent
TINY_ARGS = json.loads(TINY_DAVIT[3])
train, publish, evaluate = (load_tool(n) for n in ("train", "publish", "eval"))
EVERY = pytest.param(True, marks=pytest.mark.slow, id="every-op")
SAMPLE = pytest.param(False, id="sampled")


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) on PATH to build the LD_PRELOAD fault injector tests/tools/faultshim.c")
    lib = tmp_path_factory.mktemp("shim") / "faultshim.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(lib), str(HERE / "faultshim.c"), "-ldl"], check=True)
    return lib


class Driver:
    """A fault_driver.py process under the injector: ``driver(*jobs)`` runs the jobs one after the other (all at
    once with ``together``), each returning (status, stdout, stderr, pid)."""

    def __init__(self, shim: Path, folder: Path):
        self.folder, self.n = folder, 0
        self.log = (folder / "driver.err").open("w")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "fault_driver.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**tool_env(), "LD_PRELOAD": str(shim)})

    def __call__(self, *jobs: dict, together: bool = False) -> list[tuple[int, str, str, int]]:
        for job in jobs:
            self.n += 1
            job.setdefault("stdout", str(self.folder / f"{self.n}.out"))
            job.setdefault("stderr", str(self.folder / f"{self.n}.err"))
            job["argv"] = [str(a) for a in job["argv"]]
            job["dir"] = str(job.get("dir", ""))
            job["copy"] = [str(p) for p in job.get("copy", ())]
        self.proc.stdin.write(json.dumps({"jobs": jobs, "together": together}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, (self.folder / "driver.err").read_text()[-3000:]
        return [(status, Path(j["stdout"]).read_text(), Path(j["stderr"]).read_text(), pid)
                for (status, pid), j in zip(json.loads(line), jobs, strict=True)]

    def ops(self, job: dict) -> list[str]:
        """The file operations ``job`` makes (one "N operation path" line each), from a run without faults."""
        log = self.folder / f"ops{self.n + 1}.log"
        [(status, _, err, _)] = self(dict(job, log=str(log)))
        assert status == 0, err[-3000:]
        return log.read_text().splitlines()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def drive(shim, tmp_path_factory) -> Driver:
    driver = Driver(shim, tmp_path_factory.mktemp("driver"))
    yield driver
    driver.close()


def kill_points(ops: list[str], every: bool, n: int = 4) -> list[int]:
    """Operations to kill at: all, or ``n`` spread over them plus every rename (where a replace commits)."""
    if every:
        return list(range(1, len(ops) + 1))
    renames = [i + 1 for i, line in enumerate(ops) if line.split()[1].startswith("rename")]
    spread = [1 + round(i * (len(ops) - 1) / (n - 1)) for i in range(n)]
    return sorted({*spread, *renames, *(r + 1 for r in renames if r < len(ops))})


def leftovers(folder: Path) -> list[str]:
    """Temporary entries (``.NAME.TOKEN.tmp``/``.old``, the lock) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {f"{f.stem}/{k}": v for f in sorted(checkpoint.glob("*.safetensors")) for k, v in load_file(f).items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor's data: the header still parses
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------ the runs


@pytest.fixture(scope="module")
def runs(shapes, drive, tmp_path_factory) -> dict:
    """``step1``: a run stopped after one step (EMA on); ``step2``: it resumed to step 2 under the injector
    without faults (both checkpoints kept), with the file operations that resume made."""
    root = tmp_path_factory.mktemp("runs")
    step1 = root / "step1"
    torch.set_num_threads(1)
    assert train.main([str(shapes), "--output", str(step1), *TINY_DAVIT, *FAST, "--epochs", "2", "--max-steps", "1",
                       "--ema-decay", "0.9"]) == 0
    step2 = root / "step2"
    ops = drive.ops(resume_job(shapes, step2, copy=step1))
    return {"step1": step1, "step2": step2, "ops": ops, "data": shapes, "root": root}


def resume_job(data: Path, run: Path, copy: Path | None = None, **faults) -> dict:
    job = {"tool": "train", "argv": [data, "--output", run, "--resume", "--max-steps", "2", "--workers", "0"],
           "dir": run, **faults}
    if copy is not None:
        job["copy"] = [copy, run]
    return job


def test_a_run_holds_its_folder_and_no_other_run_proceeds(runs, drive, tmp_path):
    """The lock: a second run into a held folder exits 2 naming the holder's pid; two runs started together
    into one folder cannot both proceed, and the one that ran left a whole run."""
    held = tmp_path / "held"
    shutil.copytree(runs["step1"], held)
    with output_lock(held):
        [(status, _, err, _)] = drive(resume_job(runs["data"], held))
    assert status == 2 and f"in use by another run (pid {os.getpid()}" in err, err[-2000:]
    assert last_checkpoint(held).name == "step-00000001"  # untouched

    both = tmp_path / "both"
    job = {"tool": "train", "argv": [runs["data"], "--output", both, *TINY_DAVIT, *FAST, "--epochs", "1",
                                     "--max-steps", "3", "--checkpoint-every", "1"]}
    results = sorted(drive(dict(job), dict(job), together=True))
    assert [status for status, *_ in results] == [0, 2], results
    (_, _, _, winner), (_, _, err, _) = results
    assert f"in use by another run (pid {winner}" in err or "already holds a run" in err, err[-2000:]
    state = verify_checkpoint(last_checkpoint(both))
    assert state["step"] == 3 and leftovers(both / "checkpoints") == [] and leftovers(both) == []


@pytest.mark.parametrize("every", [SAMPLE, EVERY])
def test_kill_at_each_operation_of_a_checkpoint_write_loses_nothing(runs, drive, tmp_path, every):
    """kill -9 at each file operation of a resumed run (its lock, its checkpoint write, last.json): last.json
    names an intact checkpoint holding step 1's or step 2's exact weights, and resuming (all killed runs with
    -m slow, a sample by default) reaches step 2's exact weights, with nothing temporary left."""
    ops, data = runs["ops"], runs["data"]
    assert any("checkpoints/.step-00000002." in line for line in ops) and any("last.json" in line for line in ops)
    old, new = tensors(runs["step1"] / "checkpoints" / "step-00000001"), tensors(last_checkpoint(runs["step2"]))
    points = list(range(1, len(ops) + 1))  # every operation of the write, in both modes
    killed = [tmp_path / f"k{k}" for k in points]
    results = drive(*(resume_job(data, run, copy=runs["step1"], kill_at=k)
                      for k, run in zip(points, killed, strict=True)))
    for k, run, (status, _, err, _) in zip(points, killed, results, strict=True):
        assert status == -9, (k, ops[k - 1], err[-2000:])
        state = verify_checkpoint(last_checkpoint(run))
        assert same(tensors(last_checkpoint(run)), old if state["step"] == 1 else new), (k, ops[k - 1])
    again = killed if every else killed[::max(1, len(killed) // 5)]
    for run, (status, _, err, _) in zip(again, drive(*(resume_job(data, run) for run in again)), strict=True):
        assert status == 0, err[-2000:]
        assert same(tensors(last_checkpoint(run)), new), run.name
        assert leftovers(run / "checkpoints") == [] and leftovers(run) == [], run.name


def flip_a_digit(path: Path) -> None:
    """The first digit after the point of the first fraction in JSON file ``path``: still valid JSON."""
    text = path.read_text()
    at = re.search(r'": -?\d+\.\d', text).end() - 1
    path.write_text(text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1:])
    json.loads(path.read_text())


@pytest.mark.parametrize("file, corrupt", [("model.safetensors", flip_last_byte), ("state.json", flip_a_digit)])
def test_a_corrupt_checkpoint_is_named_and_resume_falls_back(runs, tmp_path, capsys, file, corrupt):
    """A flipped bit in the newest checkpoint's weights, or a changed digit in its state.json: publish and eval
    name the file (exit 2); resume warns, naming it, and continues from the previous checkpoint to the same
    weights."""
    run = tmp_path / "run"
    shutil.copytree(runs["step2"], run)
    newest = last_checkpoint(run)
    corrupt(newest / file)
    assert publish.main([str(run), "--out", str(tmp_path / "hub")]) == 2
    err = capsys.readouterr().err
    assert f"{newest / file} is corrupt" in err and not (tmp_path / "hub").exists()
    assert evaluate.main(["davit_tiny", str(runs["data"]), "--model-args", TINY_DAVIT[3], "--checkpoint",
                          str(newest / "model.safetensors"), "--workers", "0"]) == 2
    assert f"{newest / file} is corrupt" in capsys.readouterr().err
    assert train.main([str(runs["data"]), "--output", str(run), "--resume", "--max-steps", "2", "--workers",
                       "0"]) == 0
    out = capsys.readouterr().out
    assert f"warning: {newest / file} is corrupt" in out
    assert "previous intact checkpoint step-00000001" in out and "at step 1 " in out
    assert same(tensors(last_checkpoint(run)), tensors(last_checkpoint(runs["step2"])))


def test_a_state_json_without_its_own_digest_still_has_its_files_checked(runs, tmp_path):
    """A checkpoint written before state.json recorded its own digest: accepted, its tensor files still checked."""
    folder = tmp_path / "old"
    shutil.copytree(last_checkpoint(runs["step2"]), folder)
    state = json.loads((folder / "state.json").read_text())
    del state["state_sha256"]
    (folder / "state.json").write_text(json.dumps(state, indent=1))
    assert verify_checkpoint(folder)["step"] == 2
    flip_last_byte(folder / "model.safetensors")
    with pytest.raises(InputError, match="model.safetensors is corrupt"):
        verify_checkpoint(folder)


# ---------------------------------------------------------------------------------------- publish, convert, eval


@pytest.fixture(scope="module")
def hubs(runs) -> dict:
    """Hub folders published from step 1 (to be replaced) and from step 2 (what replaces it)."""
    old, new = runs["root"] / "hub-old", runs["root"] / "hub-new"
    assert publish.main([str(runs["step1"]), "--out", str(old)]) == 0
    assert publish.main([str(runs["step2"]), "--out", str(new)]) == 0
    return {"old": old, "new": new}


def digest(hub: Path) -> str:
    return sha256_file(hub / "model.safetensors")


def test_the_hub_folder_records_the_checkpoints_digest_and_is_checked(runs, hubs, tmp_path, capsys):
    config = json.loads((hubs["new"] / "config.json").read_text())
    state = json.loads((last_checkpoint(runs["step2"]) / "state.json").read_text())
    assert config["sha256"] == {"model.safetensors": state["sha256"]["model.safetensors"]} == \
        {"model.safetensors": digest(hubs["new"])}
    hub = tmp_path / "hub"
    shutil.copytree(hubs["new"], hub)
    flip_last_byte(hub / "model.safetensors")
    assert evaluate.main([f"local-dir:{hub}", str(runs["data"]), "--workers", "0"]) == 2
    assert f"{hub / 'model.safetensors'} is corrupt" in capsys.readouterr().err


def test_a_publish_that_fails_its_reload_check_writes_nothing(runs, hubs, tmp_path, monkeypatch):
    """The check runs on the folder before it is renamed to --out: a failure leaves no folder, or the old one."""
    create = timm.create_model

    def reloaded_wrong(name, **kwargs):
        model = create(name, **kwargs)
        if name.startswith("local-dir:"):
            with torch.no_grad():
                model.get_classifier().bias.add_(torch.arange(5.0))
        return model

    monkeypatch.setattr(publish.timm, "create_model", reloaded_wrong)
    hub = tmp_path / "hub"
    with pytest.raises(RuntimeError, match="different predictions"):
        publish.main([str(runs["step2"]), "--out", str(hub)])
    assert os.listdir(tmp_path) == []
    shutil.copytree(hubs["old"], hub)
    with pytest.raises(RuntimeError, match="different predictions"):
        publish.main([str(runs["step2"]), "--out", str(hub), "--overwrite"])
    assert digest(hub) == digest(hubs["old"]) and os.listdir(tmp_path) == ["hub"]


def replaced_whole(folder: Path, old: Path, new: Path) -> str:
    """Which of ``old``/``new`` the Hub folder ``folder`` holds once what a killed writer left is recovered (the
    next writer or reader does that), checking its digests."""
    recover(folder.parent, folder.name)
    verify_hub_folder(folder)
    assert leftovers(folder.parent) == []
    return {digest(old): "old", digest(new): "new"}[digest(folder)]


@pytest.mark.parametrize("every", [SAMPLE, EVERY])
def test_kill_during_publish_overwrite_leaves_the_old_folder_or_the_new(runs, hubs, drive, tmp_path, every):
    checkpoint = last_checkpoint(runs["step2"])

    def job(i: int, **faults) -> dict:
        out = tmp_path / f"p{i}" / "hub"
        return {"tool": "publish", "argv": [checkpoint, "--out", out, "--overwrite"], "dir": out.parent,
                "copy": [hubs["old"], out], **faults}

    ops = drive.ops(job(0))
    assert any(line.split()[1].startswith("rename") for line in ops)
    points = kill_points(ops, every)
    seen = set()
    for k, (status, _, err, _) in zip(points, drive(*(job(k, kill_at=k) for k in points)), strict=True):
        assert status == -9, (k, err[-2000:])
        seen.add(replaced_whole(tmp_path / f"p{k}" / "hub", hubs["old"], hubs["new"]))
    assert seen == {"old", "new"}  # the kills fell on both sides of the commit


def _authors_files(folder: Path) -> tuple[Path, Path]:
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        files.append(folder / f"weights{seed}.safetensors")
        save_file(timm.create_model("davit_tiny", num_classes=5, **TINY_ARGS).state_dict(), files[-1])
    return files[0], files[1]


@pytest.mark.parametrize("every", [SAMPLE, EVERY])
def test_kill_during_convert_overwrite_leaves_the_old_folder_or_the_new(drive, tmp_path, every):
    a, b = _authors_files(tmp_path)
    convert = load_tool("convert")
    old, new = tmp_path / "old", tmp_path / "new"
    args = ["--model-args", json.dumps({**TINY_ARGS, "num_classes": 5})]
    assert convert.main(["davit_tiny", str(a), "--out", str(old), *args]) == 0
    assert convert.main(["davit_tiny", str(b), "--out", str(new), *args]) == 0

    def job(i: int, **faults) -> dict:
        out = tmp_path / f"c{i}" / "hub"
        return {"tool": "convert", "argv": ["davit_tiny", b, "--out", out, "--overwrite", *args],
                "dir": out.parent, "copy": [old, out], **faults}

    points = kill_points(drive.ops(job(0)), every)
    seen = set()
    for k, (status, _, err, _) in zip(points, drive(*(job(k, kill_at=k) for k in points)), strict=True):
        assert status == -9, (k, err[-2000:])
        seen.add(replaced_whole(tmp_path / f"c{k}" / "hub", old, new))
    assert seen == {"old", "new"}


@pytest.mark.parametrize("every", [SAMPLE, EVERY])
def test_kill_during_eval_out_leaves_the_old_result_or_the_new(runs, hubs, drive, tmp_path, every):
    previous = '{"previous": "result"}'

    def job(i: int, **faults) -> dict:
        folder = tmp_path / f"e{i}"
        folder.mkdir()
        (folder / "metrics.json").write_text(previous)
        return {"tool": "eval", "argv": [f"local-dir:{hubs['new']}", runs["data"], "--workers", "0",
                                         "--out", folder / "metrics.json"], "dir": folder, **faults}

    ops = drive.ops(job(0))
    measured = lambda text: {k: v for k, v in json.loads(text).items() if not k.endswith("_per_s")}  # not timings
    result = measured((tmp_path / "e0" / "metrics.json").read_text())
    assert result["images"] == 10
    points = kill_points(ops, every)
    seen = set()
    for k, (status, _, err, _) in zip(points, drive(*(job(k, kill_at=k) for k in points)), strict=True):
        assert status == -9, (k, err[-2000:])
        text = (tmp_path / f"e{k}" / "metrics.json").read_text()
        seen.add("old" if text == previous else "new" if measured(text) == result else text)
        recover(tmp_path / f"e{k}")
        assert sorted(os.listdir(tmp_path / f"e{k}")) == ["metrics.json"]
    assert seen == {"old", "new"}


# ------------------------------------------------------------------------------------------ full disk, read-only


def _said(err: str, *words: str) -> bool:
    """The last line of stderr, where a tool says in one line why it stopped, names the problem and the folder."""
    last = err.strip().splitlines()[-1] if err.strip() else ""
    return all(w in last for w in words)


def test_a_full_disk_or_a_read_only_folder_fails_cleanly_and_truncates_nothing(runs, hubs, drive, tmp_path):
    """ENOSPC past a byte budget, and EROFS, in train's checkpoint write, publish --overwrite and eval --out:
    exit 1 naming the problem and where; the previous checkpoint, Hub folder and result file are intact, no
    temporary file is left."""
    data, checkpoint = runs["data"], last_checkpoint(runs["step2"])
    cases = []  # (job, what the stderr's last line says, the check that nothing was lost)
    for name, fault, said in (("full", {"space": 4000}, "No space left on device"),
                              ("readonly", {"readonly": True}, "Read-only file system")):
        run = tmp_path / f"train-{name}"
        cases.append((resume_job(data, run, copy=runs["step1"], **fault), said,
                      lambda run=run: last_checkpoint(run).name == "step-00000001" and
                      verify_checkpoint(last_checkpoint(run)) and leftovers(run / "checkpoints") == []))
        hub = tmp_path / f"publish-{name}" / "hub"
        cases.append(({"tool": "publish", "argv": [checkpoint, "--out", hub, "--overwrite"], "dir": hub.parent,
                       "copy": [hubs["old"], hub], **fault}, said,
                      lambda hub=hub: digest(hub) == digest(hubs["old"]) and leftovers(hub.parent) == []))
        out = tmp_path / f"eval-{name}" / "metrics.json"
        out.parent.mkdir()
        out.write_text('{"previous": "result"}')
        cases.append(({"tool": "eval", "argv": [f"local-dir:{hubs['new']}", data, "--workers", "0", "--out", out],
                       "dir": out.parent, **({"space": 10} if name == "full" else fault)}, said,
                      lambda out=out: out.read_text() == '{"previous": "result"}' and leftovers(out.parent) == []))
    for (job, said, intact), (status, _, err, _) in zip(cases, drive(*(job for job, _, _ in cases)), strict=True):
        assert status == 1 and _said(err, said, job["dir"]) and "Traceback" not in err, \
            (job["tool"], job["dir"], err[-2000:])
        assert intact(), (job["tool"], job["dir"])
