"""The run's log: ``log.csv`` (one row per epoch), TensorBoard events when tensorboard is installed, and
``curves.png`` (loss and the task's metric) at the end, each file replaced atomically; :class:`Throughput`, the
images per second and the share of the time spent waiting for data, per log interval and per epoch."""
from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..common import atomic_file, atomic_write

__all__ = ["Log", "Throughput"]


class Throughput:
    """Wall time, time blocked on the data loader and images, since :meth:`reset`. :meth:`timed` wraps the
    loader; the loop's ``loss.item()`` synchronises the device each step, so wall time includes the compute."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.started, self.waited, self.images = time.perf_counter(), 0.0, 0

    def timed(self, loader: Iterable) -> Iterator:
        it = iter(loader)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.waited += time.perf_counter() - t
            yield item

    def report(self, world: int = 1) -> dict[str, float]:
        """``img_per_s`` (this process's images x ``world``) and ``data_wait`` (the fraction of the wall time)."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {"img_per_s": self.images * world / elapsed, "data_wait": self.waited / elapsed}


class Log:
    """Written by the main process only (``main``); a resumed run (``resumed_step``) keeps the rows of
    ``log.csv`` up to its checkpoint and forgets those the killed run wrote after it."""

    def __init__(self, output: Path, main: bool, resumed_step: int | None, metric: str):
        self.main, self.csv, self.png, self.metric = main, output / "log.csv", output / "curves.png", metric
        self.rows: list[dict] = []
        self.tb = None
        if not main:
            return
        if resumed_step is not None and self.csv.is_file():
            with self.csv.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resumed_step]
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(output / "tensorboard"))
        except ImportError:
            print("tensorboard is not installed: logging to log.csv only", flush=True)

    def write(self, row: dict) -> None:
        if not self.main:
            return
        self.rows.append(row)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in self.rows for k in r)))
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.csv, text.getvalue())
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("epoch", "step"):
                    self.tb.add_scalar(key, value, row["step"])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard only (the per-interval numbers; ``log.csv`` keeps one row per epoch)."""
        if self.main and self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.main or not self.rows:
            return
        if self.tb is not None:
            self.tb.close()
        try:
            import matplotlib
        except ImportError:
            print("matplotlib is not installed: no curves.png", flush=True)
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        col = lambda key: [float(r[key]) for r in self.rows if r.get(key) not in (None, "")]
        epochs = col("epoch")
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        ax_loss.plot(epochs, col("train_loss"), label="train")
        if col("val_loss"):
            ax_loss.plot(epochs, col("val_loss"), label="val")
        ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
        for key in (self.metric, "top5", f"ema_{self.metric}"):
            if col(key):
                ax_acc.plot(epochs, col(key), label=key)
        ax_acc.set(xlabel="epoch", ylabel=self.metric, title=f"val {self.metric}")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        with atomic_file(self.png, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
