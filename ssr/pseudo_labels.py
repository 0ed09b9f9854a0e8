"""Pseudo-label export and the seed ablation (paper Table 3) over a split.

Every image gets the CAM of each Table 3 row (CAM only, + CLIP attention,
+ DINO attention, + SGC mask); each row is scored against ground truth where
it exists ("seed mIoU"), and the configured method's labels are written as
palette PNGs for the retraining stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ssr.cam import class_slots
from ssr.config import Params
from ssr.data.dataset import WholeImages, collate
from ssr.data.layout import write_label_png
from ssr.figures import save_overlay
from ssr.metrics import confusion_matrix, format_table, segmentation_scores
from ssr.model import ABLATION_ROWS, SSR, FrozenBackbones, cams_to_labels, refined_cams

ROW_TITLES = {"cam": "CAM only", "clip": "+ CLIP attention", "dino": "+ DINO attention", "sgc": "+ SGC mask", "method": "configured method"}


def export_pseudo_labels(backbones: FrozenBackbones, model: SSR, params: Params, root: Path, split: str, long_side: int,
                         out_dir: Path, *, device, figures_dir: Path | None = None, batch_size: int = 8,
                         progress: bool = True) -> dict:
    """Write out_dir/{id}.png for every image of `split`; return flat seed metrics for every row."""
    data = WholeImages(root, split, long_side=long_side, patch_size=backbones.patch_size,
                       superpixels=root / "superpixels.h5")
    names = data.classes
    rows = list(ABLATION_ROWS) + ["method"]
    conf = {row: np.zeros((len(names), len(names) + 1), np.int64) for row in rows}
    computed: set[str] = set()
    pl = params.pseudo_labels
    figures_left = pl.figures if figures_dir is not None else 0
    model.eval()
    # Images of one size share a batch; VOC's mixed sizes fall back to batches of one.
    order = sorted(range(len(data)), key=lambda i: data.ids[i])
    bar = tqdm(total=len(data), desc=f"pseudo-labels {split}", disable=not progress)
    for start in range(0, len(order), batch_size):
        items = [data[i] for i in order[start:start + batch_size]]
        groups: dict[tuple, list] = {}
        for item in items:
            groups.setdefault(tuple(item["image"].shape), []).append(item)
        for group in groups.values():
            batch = collate(group)
            images = batch["image"].to(device)
            classes, valid = class_slots(batch["labels"], device)
            cam = refined_cams(backbones, model, images, classes, valid, batch["regions"].to(device), params.affinity,
                               params.sgc, num_regions=params.superpixels.n_clusters)
            cams = dict(cam.cams, method=cam.method)
            for row, value in cams.items():
                computed.add(row)
                for b, item in enumerate(group):
                    size = item["original"].shape[:2]
                    label = cams_to_labels(value[b:b + 1], classes[b:b + 1], valid[b:b + 1], cam.grid, size, bg_power=pl.bg_power,
                                           ignore_low=pl.ignore_low, ignore_high=pl.ignore_high)[0].cpu().numpy().astype(np.uint8)
                    if item["gt"] is not None:
                        conf[row] += confusion_matrix(label, item["gt"], len(names))
                    if row == "method":
                        write_label_png(out_dir / f"{item['id']}.png", label)
                        if figures_left > 0:
                            figures_left -= 1
                            save_overlay(figures_dir / f"{item['id']}.png", item["original"], item["gt"],
                                         {r: _upsampled(cams[r][b], valid[b], cam.grid, size) for r in cams}, label)
            bar.update(len(group))
    bar.close()

    metrics: dict = {}
    for row in rows:
        if row not in computed:
            metrics[f"{row}_available"] = 0
            continue
        scores = segmentation_scores(conf[row], names)
        if progress:
            print(f"[{ROW_TITLES[row]}]")
            print(format_table(scores, names))
        for key in ("miou", "precision", "recall", "confusion_ratio"):
            metrics[f"{row}_{key}"] = scores[key]
    return metrics


def _upsampled(cam: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(S, N) -> max over valid slots, (H, W) in [0, 1]."""
    up = F.interpolate(cam[valid].reshape(-1, 1, *grid).float(), size=size, mode="bilinear", align_corners=False)
    return up.amax(dim=0)[0].clamp(0, 1).cpu().numpy() if len(up) else np.zeros(size, np.float32)
