"""Progress: a bar on a terminal, a log line every few seconds everywhere else.

`progress_bar` draws a tqdm bar only when stderr (or the `file` given) is a terminal. In a
Snakemake, DVC or SLURM log there is no bar; when the stage was given a `Progress` (the
`ssr` commands pass one, with params.yaml's `progress_interval`), it logs one line through
`logging` (logger `ssr.progress`, level INFO) every `interval` seconds instead, and one when
the loop ends:

    INFO ssr.progress: train demo method seed 0: 120/300 it (40%), 3.98 it/s, ETA 0:00:45; loss 0.52, images/s 63.7
    INFO ssr.progress: evaluate val: 100/100 img (100%), 41.2 img/s, done in 0:00:02

`progress=False` (`ssr ... --no-progress`) turns both off; `--quiet` hides the lines.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """How a stage reports progress: a bar on a terminal, else a log line every `interval` seconds.

    `interval` None logs nothing (a bare `progress=True`); 0 logs every update.
    """

    interval: float | None = None


def progress_bar(iterable=None, *, progress: bool | Progress = True, **kwargs):
    """tqdm(iterable, **kwargs) on a terminal; elsewhere a `ProgressLog` (lines only with a `Progress`).

    Off with `progress` False. Either object has tqdm's `update`, `set_postfix`, `close`,
    iteration and `with`.
    """
    kwargs.setdefault("dynamic_ncols", True)
    if not progress:
        return tqdm(iterable, disable=True, **kwargs)
    file = kwargs.get("file") or sys.stderr
    interval = progress.interval if isinstance(progress, Progress) else None
    if interval is None or _is_terminal(file):
        return tqdm(iterable, disable=None, **kwargs)
    return ProgressLog(iterable, interval=interval, total=kwargs.get("total"), initial=kwargs.get("initial", 0),
                       desc=kwargs.get("desc"), unit=kwargs.get("unit", "it"),
                       divisor=kwargs.get("unit_divisor", 1000) if kwargs.get("unit_scale") else None)


def _is_terminal(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_seconds(seconds: float) -> str:
    """H:MM:SS, hours unbounded (a 7-hour run reads 7:05:00)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ProgressLog:
    """tqdm's counting interface, reported as log lines at most every `interval` seconds.

    The rate and the ETA count only this run's updates (`initial`, e.g. a resumed run's
    first iteration, is excluded), over the wall time since the object was made.
    """

    disable = True  # no bar is drawn (tqdm's attribute, which callers may read)

    def __init__(self, iterable=None, *, interval: float, total: int | None = None, initial: int = 0,
                 desc: str | None = None, unit: str = "it", divisor: int | None = None, clock=time.monotonic):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.interval, self.total, self.desc, self.unit = iterable, interval, total, desc, unit
        self.divisor = divisor  # counts in k/M/G steps of this (tqdm's unit_scale), e.g. 1024 for bytes
        self.n = self.initial = initial
        self.postfix: dict[str, str] = {}
        self._clock = clock
        self._start = self._last = clock()
        self._logged = initial  # the count of the last line written
        self._closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        """Extra fields shown after the counts ("loss 0.52"), as tqdm's set_postfix takes them."""
        self.postfix = {k: str(v) for k, v in {**(ordered_dict or {}), **kwargs}.items()}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        if now - self._last >= self.interval:
            self._log(now)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.n > self._logged:  # the end, unless the last line already showed it
            self._log(self._clock(), done=True)

    def _log(self, now: float, done: bool = False) -> None:
        self._last, self._logged = now, self.n
        logger.info(self.line(now, done))

    def line(self, now: float, done: bool = False) -> str:
        """One progress line: counts, percentage, rate, ETA (or the time taken), then the postfix."""
        elapsed = max(now - self._start, 1e-9)
        rate = (self.n - self.initial) / elapsed
        if self.divisor:  # scaled units read "95.4MB/3.17GB", as tqdm's unit_scale
            counts = "/".join(self._scaled(v) for v in (self.n, self.total) if v is not None)
            speed = f"{self._scaled(rate)}/s"
        else:
            counts = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
            speed = f"{rate:.3g} {self.unit}/s" if rate < 1000 else f"{rate:.0f} {self.unit}/s"
        if self.total:
            counts += f" ({100 * self.n / self.total:.0f}%)"
        parts = [counts, speed]
        finished = not self.total or self.n >= self.total
        if done or (self.total and finished):
            parts.append(f"{'done in' if finished else 'stopped after'} {format_seconds(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"ETA {format_seconds((self.total - self.n) / rate)}")
        text = f"{self.desc}: " if self.desc else ""
        text += ", ".join(parts)
        if self.postfix:
            text += "; " + ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        return text

    def _scaled(self, value: float) -> str:
        return f"{tqdm.format_sizeof(value, divisor=self.divisor)}{self.unit}"
