"""Schedules: a value (learning rate, weight decay, momentum) as a function of the step.

Every trainer of the package draws its schedule here: `poly` for SSR training
(`ssr.train`, WeCLIP's schedule) and the retrained segmenter (`ssr.retrain`, DeepLab's),
`cosine` for the demo CLIP and DINO pretraining (`ssr.demo_clip`, `ssr.demo_dino`).
Steps count from 0; with `warmup` > 0 the value rises linearly to its peak over the
first `warmup` steps ((step + 1) / warmup of it).
"""

from __future__ import annotations

import math


def poly(step: int, total: int, base: float, *, power: float = 0.9, warmup: int = 0) -> float:
    """Linear warmup to `base`, then base * (1 - progress) ** power, reaching 0 at step `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (1 - min(progress, 1.0)) ** power


def cosine(step: int, total: int, start: float, end: float = 0.0, *, warmup: int = 0) -> float:
    """Linear warmup to `start`, then half a cosine from `start` down (or up) to `end` at step `total`."""
    if step < warmup:
        return start * (step + 1) / warmup
    step, total = step - warmup, total - warmup
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step, total) / max(1, total)))
