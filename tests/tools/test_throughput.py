"""Throughput in the training log: images per second and the share of the time spent waiting for data."""
from __future__ import annotations

import csv
import time

from attnzoo.engine.log import Throughput

from .conftest import FAST, TINY_DAVIT, load_tool

train = load_tool("train")


def _slow(n: int, seconds: float):
    for i in range(n):
        time.sleep(seconds)
        yield i


def test_throughput_tells_a_slow_loader_from_a_slow_step():
    meter = Throughput()
    for _ in meter.timed(_slow(5, 0.02)):  # the loader is the limit
        meter.images += 4
    loader_bound = meter.report(world=2)
    meter.reset()
    for _ in meter.timed(range(5)):  # the step is the limit
        time.sleep(0.02)
        meter.images += 4
    step_bound = meter.report()
    assert loader_bound["data_wait"] > 0.9 and step_bound["data_wait"] < 0.1
    assert 2 * 20 / 0.1 * 0.7 < loader_bound["img_per_s"] <= 2 * 20 / 0.1  # 2 processes x 20 images in >= 0.1 s
    assert 20 / 0.1 * 0.7 < step_bound["img_per_s"] <= 20 / 0.1


def test_log_interval_prints_speed_and_the_epoch_row_has_it(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([str(shapes), "--output", str(out), *TINY_DAVIT, *FAST, "--epochs", "1",
                       "--log-interval", "2"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
    assert [l.split()[1] for l in lines] == ["2", "4"]  # 5 steps an epoch
    assert all(" img/s " in l and " data_wait " in l and l.endswith("%") for l in lines)
    row, = csv.DictReader((out / "log.csv").open())
    assert float(row["img_per_s"]) > 0 and 0 <= float(row["data_wait"]) < 1
