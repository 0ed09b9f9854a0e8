"""Semantic segmentation scores from a confusion matrix.

Conventions:
- Label maps hold class indices 0..C-1 (0 = background) and IGNORE_INDEX (255).
- Ground-truth pixels equal to `ignore_index` are skipped.
- A prediction outside [0, C) (e.g. 255, "no decision" in a pseudo-label) is
  counted as wrong, never dropped: the confusion matrix has one extra column,
  index C, for such pixels. They are false negatives of their ground-truth
  class and false positives of no class.
- Classes absent from both ground truth and prediction (IoU union 0) carry no
  information: their IoU is None and they are left out of every mean.
- IoU, precision, recall and accuracy are on a 0-1 scale; the two ratios (false to true
  positives, swapped to all foreground pixels) are plain ratios. Undefined scores are None
  (valid JSON, unlike NaN).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ssr.data.layout import IGNORE_INDEX, DatasetError, read_label_png


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Pixel counts by (ground truth, prediction).

    pred, gt: integer label maps of the same shape.
    Returns (C, C + 1) int64: rows = ground truth class, columns = predicted
    class, last column = predictions outside [0, C). Sums over images add up.
    A ground-truth value outside [0, C) other than `ignore_index` raises ValueError.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(gt.dtype, np.integer)):
        raise ValueError(f"label maps must be integer arrays, got {pred.dtype} and {gt.dtype}")
    c = int(num_classes)
    keep = gt != ignore_index
    gt = gt[keep].astype(np.int64)
    pred = pred[keep].astype(np.int64)
    bad = (gt < 0) | (gt >= c)
    if bad.any():
        raise ValueError(f"ground truth has value {int(gt[bad][0])} outside [0, {c}) that is not ignore_index {ignore_index}")
    pred = np.where((pred < 0) | (pred >= c), c, pred)
    return np.bincount(gt * (c + 1) + pred, minlength=c * (c + 1)).reshape(c, c + 1)


def iou_key(class_name: str) -> str:
    """Score key of a class's IoU: 'iou_' + name, whitespace runs as '_' ("traffic light" -> iou_traffic_light)."""
    return "iou_" + "_".join(str(class_name).split())


def _ratio(num: float, den: float):
    return float(num / den) if den > 0 else None


def segmentation_scores(conf: np.ndarray, class_names: list[str]) -> dict:
    """Flat dict of scores from a confusion matrix.

    conf: (C, C + 1) from `confusion_matrix`, or a plain (C, C).
    Keys: miou, precision, recall, pixel_accuracy, confusion_ratio, class_swap_ratio,
    and iou_{name} per class (spaces in a name become '_').
    - precision / recall: means over the scored classes (union > 0) of
      TP / (TP + FP) and TP / (TP + FN); a 0/0 inside them (a class only in
      the ground truth, or only in the prediction) counts as 0.
    - confusion_ratio: SeCo's (CVPR 2024) "m-ConfusionRatio", which SSR's Table 5
      reports: the mean over classes of FP / TP (false positives per true positive,
      background included). Classes with no true positive make FP / TP infinite and
      are left out of the mean; the ratio is None when no class has one.
    - class_swap_ratio: share of ground-truth foreground pixels (classes 1..C-1)
      predicted as a different foreground class.
    """
    conf = np.asarray(conf, dtype=np.int64)
    c = conf.shape[0]
    if conf.ndim != 2 or conf.shape[1] not in (c, c + 1):
        raise ValueError(f"confusion matrix must be (C, C) or (C, C + 1), got {conf.shape}")
    if len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for a {c}-class confusion matrix")
    square = conf[:, :c]
    tp = np.diag(square).astype(np.float64)
    gt_total = conf.sum(1).astype(np.float64)  # includes out-of-range predictions
    pred_total = square.sum(0).astype(np.float64)
    union = gt_total + pred_total - tp
    scored = union > 0

    iou = np.divide(tp, union, out=np.zeros(c), where=scored)
    precision = np.divide(tp, pred_total, out=np.zeros(c), where=pred_total > 0)
    recall = np.divide(tp, gt_total, out=np.zeros(c), where=gt_total > 0)

    fg_rows = conf[1:]
    fg_total = fg_rows.sum()
    fg_confused = square[1:, 1:].sum() - np.trace(square[1:, 1:])
    total = conf.sum()
    with_tp = tp > 0
    fp_per_tp = (pred_total - tp)[with_tp] / tp[with_tp]

    scores = {
        "miou": float(iou[scored].mean()) if scored.any() else None,
        "precision": float(precision[scored].mean()) if scored.any() else None,
        "recall": float(recall[scored].mean()) if scored.any() else None,
        "pixel_accuracy": _ratio(tp.sum(), total),
        "confusion_ratio": float(fp_per_tp.mean()) if with_tp.any() else None,
        "class_swap_ratio": _ratio(fg_confused, fg_total),
    }
    for k, name in enumerate(class_names):
        scores[iou_key(name)] = float(iou[k]) if scored[k] else None
    return scores


def accumulate_label_dirs(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, num_classes: int,
                          ids: list[str] | None = None) -> np.ndarray:
    """Summed (C, C + 1) confusion matrix of `pred_dir/{id}.png` against `gt_dir/{id}.png`.

    ids: image ids to score; None = every PNG in gt_dir.
    A missing file, a shape mismatch or an out-of-range ground-truth value
    raises DatasetError naming the file(s).
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if ids is None:
        gt_files = sorted(gt_dir.glob("*.png"))
        if not gt_files:
            raise DatasetError(f"{gt_dir}: no ground-truth label PNGs found")
    else:
        gt_files = [gt_dir / f"{i}.png" for i in ids]
    conf = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    for gt_path in gt_files:
        if not gt_path.is_file():
            raise DatasetError(f"{gt_path}: ground-truth label file not found")
        pred_path = pred_dir / gt_path.name
        if not pred_path.is_file():
            raise DatasetError(f"{pred_path}: prediction missing for ground truth {gt_path}")
        gt = read_label_png(gt_path)
        pred = read_label_png(pred_path)
        if pred.shape != gt.shape:
            raise DatasetError(f"{pred_path}: prediction shape {pred.shape} differs from ground truth {gt_path} shape {gt.shape}")
        try:
            conf += confusion_matrix(pred, gt, num_classes)
        except ValueError as err:
            raise DatasetError(f"{gt_path}: {err}") from err
    return conf


def evaluate_label_dirs(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, num_classes: int,
                        class_names: list[str] | None = None, ids: list[str] | None = None) -> dict:
    """Scores (see `segmentation_scores`) of predicted label PNGs against ground-truth ones,
    matched by file name. class_names defaults to "0", "1", ..."""
    conf = accumulate_label_dirs(pred_dir, gt_dir, num_classes, ids)
    if class_names is None:
        class_names = [str(k) for k in range(num_classes)]
    return segmentation_scores(conf, class_names)


def _pct(value) -> str:
    return "     -" if value is None else f"{100 * value:6.2f}"


def format_table(scores: dict, class_names: list[str]) -> str:
    """Per-class IoU table (in %) followed by the summary scores (ratios as plain numbers), for printing."""
    summary = [("mIoU", "miou"), ("precision", "precision"), ("recall", "recall"),
               ("confusion ratio", "confusion_ratio"), ("class swap ratio", "class_swap_ratio"),
               ("pixel accuracy", "pixel_accuracy")]
    width = max(len(s) for s in [label for label, _ in summary] + [str(n) for n in class_names])
    lines = [f"{'class':<{width}}  IoU %", "-" * (width + 8)]
    for name in class_names:
        lines.append(f"{str(name):<{width}}  {_pct(scores.get(iou_key(name)))}")
    lines.append("-" * (width + 8))
    for label, key in summary:
        value = scores.get(key)
        shown = _pct(value) if not key.endswith("_ratio") else ("n/a" if value is None else f"{value:.3f}")
        lines.append(f"{label:<{width}}  {shown}")
    return "\n".join(lines)


def aggregate_seeds(per_seed: list[dict]) -> dict:
    """Metrics of several training seeds -> their mean under each key, plus key_std, key_min, key_max.

    The std is the sample standard deviation (ddof 1; 0 for a single seed). A seed whose value
    is None (a class it never saw) is left out of that key; a key None in every seed stays
    None. Non-numeric values, and integers every seed shares (counts, flags), must agree and are
    kept as they are. `seeds` counts the seeds.
    """
    if not per_seed:
        raise ValueError("no seeds to aggregate")
    out: dict = {"seeds": len(per_seed)}
    for key in per_seed[0]:
        values = [m.get(key) for m in per_seed]
        numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if any(isinstance(v, (str, bool)) for v in values):
            if len(set(map(str, values))) != 1:
                raise ValueError(f"{key}: seeds disagree ({values})")
            out[key] = values[0]
            continue
        if all(type(v) is int for v in values) and len(set(values)) == 1:
            out[key] = values[0]  # a count or flag the seeds share (iterations, *_available)
            continue
        if not numbers:
            out[key] = None
            continue
        array = np.array(numbers)
        out[key] = float(array.mean())
        out[f"{key}_std"] = float(array.std(ddof=1)) if len(array) > 1 else 0.0
        out[f"{key}_min"] = float(array.min())
        out[f"{key}_max"] = float(array.max())
    return out
