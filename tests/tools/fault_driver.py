"""Runs tools under the fault injector (``faultshim.c``) for tests/tools/test_faults.py, many runs for one start-up.

    LD_PRELOAD=faultshim.so python fault_driver.py      # then one JSON list of jobs per line on stdin

This process imports the tools once; each job is a child forked from it (in turn) that points the injector at
its folder, runs ``tools/<tool>.py``'s ``main(argv)`` in-process with stdout/stderr in files, and exits with its
status (1, as Python does, for an exception that escapes ``main``; -9 when the injector killed it). A line is
``{"jobs": [...], "together": false}`` (together: all started at once); for each the driver prints a JSON list
of [status, pid], one per job. A job: ``{"tool", "argv", "dir", "kill_at", "space", "readonly",
"log", "stdout", "stderr", "copy": [SRC, DST] (copied before the faults start)}``.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import load_tool  # noqa: E402  (tests/tools/conftest.py, importable from here)


def start(job: dict, shim: ctypes.CDLL, tools: dict) -> int:
    """Fork the child that runs ``job``; returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    try:  # the child
        if job.get("copy"):
            shutil.copytree(*job["copy"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            out = os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        shim.fault_configure(str(job["dir"]).encode(), job.get("kill_at", 0), job.get("space", -1),
                             int(job.get("readonly", False)), (job.get("log") or "").encode())
        try:
            status = tools[job["tool"]].main(job["argv"])
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    except BaseException:
        traceback.print_exc()
        os._exit(99)


def wait(pid: int) -> list[int]:
    """[status, pid] of child ``pid`` once it ended: its exit status, or minus the signal that killed it."""
    _, status = os.waitpid(pid, 0)
    return [-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), pid]


def main() -> None:
    shim = ctypes.CDLL(os.environ["LD_PRELOAD"])
    shim.fault_configure.argtypes = [ctypes.c_char_p, ctypes.c_long, ctypes.c_longlong, ctypes.c_int,
                                     ctypes.c_char_p]
    torch.set_num_threads(1)
    tools = {name: load_tool(name) for name in ("train", "publish", "convert", "eval")}
    for line in sys.stdin:
        batch = json.loads(line)
        if batch["together"]:  # all at once
            results = [wait(pid) for pid in [start(job, shim, tools) for job in batch["jobs"]]]
        else:
            results = [wait(start(job, shim, tools)) for job in batch["jobs"]]
        print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
