"""The training process's context: its place in the process group, its device and its autocast dtype; and the
lock that gives one run at a time its output folder."""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from ..common import InputError, recover

__all__ = ["AMP_CHOICES", "LOCK_FILE", "Run", "output_lock"]

AMP_CHOICES = ("auto", "none", "bf16", "fp16")
LOCK_FILE = ".lock"


def _holder(fd: int) -> str:
    """The pid the holder of lock file ``fd`` wrote (it writes it just after locking: wait a moment for it)."""
    for _ in range(20):
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if pid:
            return pid
        time.sleep(0.05)
    return "unknown"


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, log=print) -> Iterator[None]:
    """Hold ``output`` for this run: an exclusive ``flock`` on ``output/.lock`` (holding the pid), which the
    kernel drops when the process dies, even by kill -9. An :class:`InputError` naming the holder's pid when
    another run holds it. Once held, what killed writers left there is finished or rolled back
    (:func:`attnzoo.common.recover`, ``log`` says what). Only rank 0 (``RANK``) locks: the other ranks of a
    torchrun write nothing. An output folder this call created is removed again if the run left it empty.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    output = Path(output)
    created = not output.exists()
    path = output / LOCK_FILE
    while True:
        output.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a run that left the folder empty removed it meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise InputError(f"--output {output} is in use by another run (pid {holder}, which holds {path}): wait "
                             "for it to end or choose another --output") from None
        # the file a releasing run unlinked is no lock any more: lock the one at the path now
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        for folder in (output, output / "checkpoints"):
            for line in recover(folder):
                log(f"{folder}: {line}")
        yield
    finally:
        os.unlink(path)  # before closing: whoever opened it meanwhile sees it is gone and retries
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                output.rmdir()  # only when empty


class Run:
    """One training process. Under torchrun (``WORLD_SIZE`` > 1) it joins the process group (NCCL on GPUs, gloo
    on the CPU); on a GPU machine it takes the GPU ``LOCAL_RANK``.

    ``amp``: the autocast dtype; ``auto`` is bf16 on a CUDA device that supports it, none otherwise.
    """

    world: int
    rank: int
    main: bool  # rank 0: the process that logs and writes
    device: torch.device
    amp_dtype: torch.dtype | None

    def __init__(self, amp: Literal["auto", "none", "bf16", "fp16"] = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.main = self.rank == 0
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if amp not in AMP_CHOICES:
            raise InputError(f"--amp {amp!r}: choose one of {', '.join(AMP_CHOICES)}")
        if amp == "auto":
            amp = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
        if amp == "fp16" and self.device.type != "cuda":
            raise InputError("--amp fp16 needs a CUDA device (use bf16 or none on the CPU)")
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]

    def log(self, message: str) -> None:
        """Print ``message`` on the main process."""
        if self.main:
            print(message, flush=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's autocast (a no-op without AMP)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the processes (float64)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj: object) -> list[object]:
        """``obj`` of every process, in rank order (a list of one alone)."""
        if self.world == 1:
            return [obj]
        gathered: list[object] = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    @staticmethod
    def close() -> None:
        """Leave the process group, if any (safe to call in every case)."""
        if dist.is_initialized():
            dist.destroy_process_group()
