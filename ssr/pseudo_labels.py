"""Pseudo-label export and the seed ablation (paper Tables 3 and 4) over a split.

Every image gets the CAM of each Table 3 row (CAM only, + CLIP attention, + DINO
attention, + SGC mask) and of the configured method; the method's labels are written as
palette PNGs for the retraining stage, and each row is scored against ground truth on the
images of the scoring split (the paper scores seeds on VOC `train`, a subset of the
`train_aug` split the labels are exported for).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ssr.cam import class_slots
from ssr.config import Params
from ssr.data.dataset import WholeImages, collate
from ssr.data.download import atomic_dir
from ssr.data.layout import write_label_png
from ssr.figures import ROW_TITLES, FigureCandidates, cam_figure, replace_figures, resize_nearest, sgc_regions
from ssr.metrics import confusion_matrix, format_table, iou_key, segmentation_scores
from ssr.model import ABLATION_ROWS, SSR, FrozenBackbones, cams_to_labels, initial_cams, refined_cams
from ssr.progress import progress_bar
from ssr.superpixels import check_region_maps

SCORE_KEYS = ("miou", "precision", "recall", "confusion_ratio", "class_swap_ratio")
FIGURE_ROWS = (*ABLATION_ROWS, "method")  # Table 3's rows; the figures leave Table 4's plain-CLIP CAM out


def seed_metrics(backbones: FrozenBackbones, model: SSR, params: Params, root: Path, split: str, long_side: int, *,
                 device, score_ids: set[str] | None = None,
                 rows: tuple[str, ...] = (*ABLATION_ROWS, "method", "cam_without_cmpa"),
                 export_dir: Path | None = None, figures_dir: Path | None = None, batch_size: int = 8,
                 progress: bool = True) -> dict:
    """Score the CAM `rows` of every image of `split` whose id is in `score_ids` (None = all).

    With `export_dir`, the method's labels of every image of `split` are written there as
    {id}.png; the folder appears under its name (replacing an earlier one) only once every
    label is written. Returns flat seed metrics: {row}_{miou, precision, ...} per row that
    could run, {row}_available: 0 for one that could not (DINO without DINO weights).
    """
    if "method" not in rows:
        raise ValueError(f"rows {rows}: the method's row is always computed (it is what export writes), so name it")
    args = (backbones, model, params, root, split, long_side)
    kwargs = dict(device=device, score_ids=score_ids, rows=rows, figures_dir=figures_dir, batch_size=batch_size,
                  progress=progress)
    if export_dir is None:
        return _seed_metrics(*args, export_dir=None, **kwargs)
    with atomic_dir(export_dir) as staged:
        return _seed_metrics(*args, export_dir=staged, **kwargs)


def _seed_metrics(backbones: FrozenBackbones, model: SSR, params: Params, root: Path, split: str, long_side: int, *, device,
                  score_ids: set[str] | None, rows: tuple[str, ...], export_dir: Path | None, figures_dir: Path | None,
                  batch_size: int, progress: bool) -> dict:
    data = WholeImages(root, split, long_side=long_side, patch_size=backbones.patch_size, superpixels=root / "superpixels.h5")
    check_region_maps(data.superpixels, params.superpixels, data.ids)
    names = data.classes
    conf = {row: np.zeros((len(names), len(names) + 1), np.int64) for row in rows}
    computed: set[str] = set()
    pl = params.pseudo_labels
    figures = FigureCandidates(pl.figures) if figures_dir is not None else None
    model.eval()
    ids = [i for i in sorted(data.ids) if export_dir is not None or score_ids is None or i in score_ids]
    index = {image_id: k for k, image_id in enumerate(data.ids)}
    bar = progress_bar(total=len(ids), desc=f"seeds {split}", unit="img", progress=progress)
    for start in range(0, len(ids), batch_size):
        items = [data[index[i]] for i in ids[start:start + batch_size]]
        groups: dict[tuple, list] = {}
        for item in items:  # images of one size share a batch; VOC's mixed sizes fall back to batches of one
            groups.setdefault(tuple(item["image"].shape), []).append(item)
        for group in groups.values():
            batch = collate(group)
            images = batch["image"].to(device)
            classes, valid = class_slots(batch["labels"], device)
            cam = refined_cams(backbones, model, images, classes, valid, batch["regions"].to(device), params.affinity,
                               params.sgc, num_regions=params.superpixels.n_clusters,
                               rows=tuple(r for r in rows if r in ABLATION_ROWS))
            cams = dict(cam.rows, method=cam.method)
            if "cam_without_cmpa" in rows:
                cams["cam_without_cmpa"] = initial_cams(backbones, model, images, classes, valid, attn_blocks=0,
                                                        cmpa=False)[0].detach()
            method_labels = {}  # b -> (label, its confusion matrix or None where unscored)
            for row, value in cams.items():
                computed.add(row)
                for b, item in enumerate(group):
                    size = item["original"].shape[:2]
                    label = cams_to_labels(value[b:b + 1], classes[b:b + 1], valid[b:b + 1], cam.grid, size,
                                           pl)[0].cpu().numpy().astype(np.uint8)
                    scored = item["gt"] is not None and (score_ids is None or item["id"] in score_ids)
                    image_conf = confusion_matrix(label, item["gt"], len(names)) if scored else None
                    if scored:
                        conf[row] += image_conf
                    if row == "method":
                        method_labels[b] = (label, image_conf)
                    if row == "method" and export_dir is not None:
                        write_label_png(export_dir / f"{item['id']}.png", label)
            if figures is not None:
                for b, item in enumerate(group):
                    label, image_conf = method_labels[b]
                    iou = None if image_conf is None else segmentation_scores(image_conf, names)["miou"]
                    # called at once (never later, when the loop has moved on); the defaults say so
                    figures.offer(item["id"], iou, lambda b=b, item=item, label=label, iou=iou, classes=classes, valid=valid,
                                  cams=cams, cam=cam, regions=batch["regions"][b]: {
                        "image": item["original"], "gt": item["gt"], "label": label, "iou": iou,
                        "classes": [int(c) + 1 for c in classes[b][valid[b]].tolist()],
                        "cams": {r: _per_class(cams[r][b], valid[b], cam.grid, item["original"].shape[:2])
                                 for r in FIGURE_ROWS if r in cams},
                        # SGC's step for this image: its region map and each class's target regions
                        "regions": resize_nearest(regions.numpy(), item["original"].shape[:2]),
                        "targets": sgc_regions(cam.cam[b][valid[b]], regions.to(device), cam.grid,
                                               params.superpixels.n_clusters, t_hi=params.sgc.t_hi, rho=params.sgc.rho,
                                               keep_best=params.sgc.keep_best, denominator=params.sgc.denominator)})
            bar.update(len(group))
    bar.close()
    if figures is not None:
        _write_cam_figures(figures, figures_dir, names, scored=len(score_ids) if score_ids is not None else len(ids))

    metrics: dict = {}
    for row in rows:
        if row not in computed:
            metrics[f"{row}_available"] = 0
            continue
        scores = segmentation_scores(conf[row], names)
        if progress:
            print(f"[{ROW_TITLES[row]}]")
            print(format_table(scores, names))
        for key in (*SCORE_KEYS, *(iou_key(name) for name in names)):
            metrics[f"{row}_{key}"] = scores[key]
    return metrics


def _write_cam_figures(figures: FigureCandidates, folder: Path, names: list[str], scored: int) -> None:
    """The picked images' CAM figures, titled with their id, why they were picked and the method's per-image mIoU."""
    out = {}
    for name, title, data in figures.titled("pseudo-label mIoU", f"{scored} scored images"):
        score = "" if data["iou"] is None else f", pseudo-label mIoU {data['iou']:.1%}"
        out[name] = cam_figure(data["image"], data["gt"], data["label"], data["cams"], data["classes"], names,
                               regions=data["regions"], targets=data["targets"], title=title + score)
    replace_figures(folder, out)


def _per_class(cam: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(S, N) -> (K, H, W) in [0, 1]: the K valid slots' maps at the image size."""
    up = F.interpolate(cam[valid].reshape(-1, 1, *grid).float(), size=size, mode="bilinear", align_corners=False)
    return up[:, 0].clamp(0, 1).cpu().numpy()
