"""Progress bars (tqdm) where someone watches them.

A bar is drawn only when `progress` is on (`ssr ... --no-progress` turns it off) and stderr
is a terminal: tqdm's `disable=None`. In a Snakemake or DVC log, or under a pipe, there is
no bar, so logs hold lines rather than carriage-return redraws.
"""

from __future__ import annotations

from tqdm import tqdm


def progress_bar(iterable=None, *, progress: bool = True, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs), off unless `progress` and stderr is a terminal."""
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=None if progress else True, **kwargs)
