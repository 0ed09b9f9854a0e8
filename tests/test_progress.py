"""Progress in a log: where stderr is not a terminal (Snakemake, DVC, SLURM), a line every
`progress_interval` seconds instead of a bar, with counts, rate and ETA; training adds its losses."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_params

from ssr.cli import main as ssr_main
from ssr.progress import Progress, ProgressLog, format_seconds, progress_bar

BIN = Path(sys.executable).parent
TIME = r"\d+:\d\d:\d\d"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ssr.progress"]


def test_a_line_per_interval_with_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="ssr.progress")
    clock = Clock()
    bar = ProgressLog(total=100, initial=20, interval=10.0, desc="train demo", clock=clock)
    for _ in range(80):
        clock.now += 0.5           # 2 iterations per second
        bar.set_postfix({"loss": "0.52"}, refresh=False)
        bar.update(1)
    bar.close()
    lines = _lines(caplog)
    # every 10 s, i.e. every 20 iterations; the resumed run's first 20 do not count in the rate
    assert lines[0] == "train demo: 40/100 it (40%), 2 it/s, ETA 0:00:30; loss 0.52"
    assert lines[1] == "train demo: 60/100 it (60%), 2 it/s, ETA 0:00:20; loss 0.52"
    assert lines[-1] == "train demo: 100/100 it (100%), 2 it/s, done in 0:00:40; loss 0.52"
    assert len(lines) == 4   # the last interval's line is the end: not repeated by close()


def test_an_interrupted_loop_says_it_stopped_and_sizes_are_scaled(caplog):
    caplog.set_level(logging.INFO, logger="ssr.progress")
    clock = Clock()
    with ProgressLog(total=10, interval=60.0, desc="seeds train", unit="img", clock=clock) as bar:
        clock.now += 4
        bar.update(3)
    clock = Clock()
    download = ProgressLog(total=4 * 2**30, interval=0.0, desc="VOCtrainval.tar", unit="B", divisor=1024, clock=clock)
    clock.now += 8
    download.update(2**30)
    assert _lines(caplog) == ["seeds train: 3/10 img (30%), 0.75 img/s, stopped after 0:00:04",
                              "VOCtrainval.tar: 1.00GB/4.00GB (25%), 128MB/s, ETA 0:00:24"]


def test_bars_on_a_terminal_lines_elsewhere_nothing_when_off():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress_bar(range(3), file=io.StringIO(), progress=Progress(5.0)), ProgressLog)
    assert not progress_bar(range(3), file=Terminal(), progress=Progress(5.0)).disable       # a bar, no lines
    assert progress_bar(range(3), file=io.StringIO(), progress=True).disable               # no interval: no lines
    assert not isinstance(progress_bar(range(3), file=io.StringIO(), progress=True), ProgressLog)
    assert progress_bar(range(3), file=io.StringIO(), progress=False).disable              # --no-progress
    assert not isinstance(progress_bar(range(3), file=io.StringIO(), progress=False), ProgressLog)
    assert format_seconds(7 * 3600 + 5 * 60 + 9.4) == "7:05:09"


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tiny_clip_dir):
    """The tiny demo's long stages as Snakemake runs them: `ssr <stage> ... > log 2>&1`."""
    base = tmp_path_factory.mktemp("progress")
    path, _ = write_tiny_params(base, base / "data", tiny_clip_dir, progress_interval=0.0)
    for stage in ("prepare", "superpixels"):
        assert ssr_main([stage, "--dataset", "demo", "--params", str(path), "--quiet"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    logs = {}
    for stage in ("train", "pseudo-labels", "evaluate"):
        log = base / f"{stage}.log"
        with open(log, "w") as out:  # a file, as in Snakemake's and DVC's logs: not a terminal
            proc = subprocess.run([str(BIN / "ssr"), stage, "--dataset", "demo", "--params", str(path), "--threads", "1"],
                                  cwd=base, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600)
        logs[stage] = log.read_text()
        assert proc.returncode == 0, logs[stage][-3000:]
    return logs


def test_train_logs_iterations_losses_images_per_second_and_eta(logged_run):
    log = logged_run["train"]
    losses = r"loss [-\d.e]+, loss_ce [-\d.e]+, loss_aff [-\d.e]+, loss_proto [-\d.e]+, tau [-\d.e]+, lr [-\d.e]+"
    line = (rf"INFO ssr\.progress: train demo method seed 0: (\d)/4 it \(\d+%\), [\d.]+ it/s, ETA {TIME}; {losses}, "
            rf"images/s [\d.]+")
    assert [int(n) for n in re.findall(line, log)] == [1, 2, 3], log
    assert re.search(rf"train demo method seed 0: 4/4 it \(100%\), [\d.]+ it/s, done in {TIME}; {losses}", log), log
    assert "\r" not in log   # no bar redraws


@pytest.mark.parametrize("stage,desc,total", [("pseudo-labels", "seeds train", 12), ("evaluate", "evaluate val", 6)])
def test_per_image_stages_log_images_done_rate_and_eta(logged_run, stage, desc, total):
    log = logged_run[stage]
    eta = re.findall(rf"INFO ssr\.progress: {desc}: (\d+)/{total} img \(\d+%\), [\d.]+ img/s, ETA {TIME}", log)
    assert eta and all(0 < int(n) < total for n in eta), log
    assert re.search(rf"{desc}: {total}/{total} img \(100%\), [\d.]+ img/s, done in {TIME}", log), log
    assert "\r" not in log
