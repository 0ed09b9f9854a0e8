import json

import numpy as np
import pytest

from ssr.data.layout import DatasetError, write_label_png
from ssr.metrics import (
    accumulate_label_dirs,
    confusion_matrix,
    evaluate_label_dirs,
    format_table,
    segmentation_scores,
)

NAMES = ["background", "cat", "dog", "potted plant", "cow"]


def _reference(preds, gts, num_classes, ignore=255):
    """Per-class scores from boolean masks, independent of the confusion matrix."""
    pred = np.concatenate([p.ravel() for p in preds]).astype(np.int64)
    gt = np.concatenate([g.ravel() for g in gts]).astype(np.int64)
    valid = gt != ignore
    ious, precs, recs = [], [], []
    for c in range(num_classes):
        p = (pred == c) & valid
        g = (gt == c) & valid
        union = (p | g).sum()
        if union == 0:
            continue
        inter = (p & g).sum()
        ious.append(inter / union)
        precs.append(inter / p.sum() if p.sum() else 0.0)
        recs.append(inter / g.sum() if g.sum() else 0.0)
    acc = ((pred == gt) & valid).sum() / valid.sum()
    return np.mean(ious), np.mean(precs), np.mean(recs), acc


def _random_pair(rng, shape, num_classes, ignore_share=0.1, bad_pred_share=0.05, skip_class=None):
    gt = rng.integers(0, num_classes, shape)
    pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, num_classes, shape))
    if skip_class is not None:
        gt[gt == skip_class] = 0
        pred[pred == skip_class] = 0
    gt[rng.random(shape) < ignore_share] = 255
    pred[rng.random(shape) < bad_pred_share] = 255
    return pred.astype(np.uint8), gt.astype(np.uint8)


def test_scores_match_a_mask_based_computation():
    rng = np.random.default_rng(0)
    pairs = [_random_pair(rng, (23, 31), 5, skip_class=4) for _ in range(4)]
    conf = sum(confusion_matrix(p, g, 5) for p, g in pairs)
    scores = segmentation_scores(conf, NAMES)
    miou, prec, rec, acc = _reference([p for p, _ in pairs], [g for _, g in pairs], 5)
    assert scores["miou"] == pytest.approx(miou)
    assert scores["precision"] == pytest.approx(prec)
    assert scores["recall"] == pytest.approx(rec)
    assert scores["pixel_accuracy"] == pytest.approx(acc)
    # class 4 appears nowhere: no IoU, and left out of the means above
    assert scores["iou_cow"] is None
    assert scores["iou_potted_plant"] is not None
    json.dumps(scores, allow_nan=False)  # a valid DVC metrics file


def test_confusion_matrix_against_a_loop():
    rng = np.random.default_rng(1)
    pred, gt = _random_pair(rng, (17, 19), 4)
    conf = confusion_matrix(pred, gt, 4)
    assert conf.shape == (4, 5) and conf.dtype == np.int64
    expected = np.zeros((4, 5), dtype=np.int64)
    for p, g in zip(pred.ravel(), gt.ravel(), strict=True):
        if g != 255:
            expected[g, p if p < 4 else 4] += 1
    np.testing.assert_array_equal(conf, expected)


def test_ignore_pixels_are_skipped_and_invalid_predictions_count_as_wrong():
    gt = np.array([[1, 1, 255, 255]])
    pred = np.array([[1, 255, 2, 255]])
    conf = confusion_matrix(pred, gt, 3)
    assert conf.sum() == 2  # the two gt-ignore pixels are gone, whatever their prediction
    scores = segmentation_scores(conf, ["bg", "a", "b"])
    # the 255 prediction is a false negative of class 1 and a false positive of nothing
    assert scores["iou_a"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(0.5)
    assert scores["precision"] == pytest.approx(1.0)
    assert scores["iou_bg"] is None and scores["iou_b"] is None
    assert scores["pixel_accuracy"] == pytest.approx(0.5)


def test_confusion_ratio_on_a_hand_made_case():
    # gt foreground: 4 px of class 1, 4 px of class 2
    gt = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
    # class 1: 1 right, 2 -> class 2 (confused), 1 -> background (missed, not confused)
    # class 2: 3 right, 1 -> class 1 (confused); background pixel -> class 1 (not counted)
    pred = np.array([[1, 2, 2, 0, 2, 2, 2, 1, 1, 0]])
    scores = segmentation_scores(confusion_matrix(pred, gt, 3), ["background", "a", "b"])
    assert scores["class_swap_ratio"] == pytest.approx(3 / 8)
    # SeCo's confusion ratio, mean over classes of FP / TP: background 1 FP (the pixel called "a")
    # over 1 TP; "a" 2 FP (one background, one "b" pixel) over 1 TP; "b" 2 FP over 3 TP.
    assert scores["confusion_ratio"] == pytest.approx((1 / 1 + 2 / 1 + 2 / 3) / 3)
    perfect = segmentation_scores(confusion_matrix(gt, gt, 3), ["background", "a", "b"])
    assert perfect["confusion_ratio"] == perfect["class_swap_ratio"] == 0.0
    assert perfect["miou"] == perfect["precision"] == perfect["recall"] == 1.0
    # a class without a true positive has an infinite FP / TP: it is left out of the mean
    missed = segmentation_scores(confusion_matrix(np.array([[0, 0, 2, 2]]), np.array([[0, 1, 2, 2]]), 3), ["bg", "a", "b"])
    assert missed["confusion_ratio"] == pytest.approx((1 / 1 + 0 / 2) / 2)   # background 1 FP / 1 TP, "b" 0 / 2


def test_square_matrix_is_accepted():
    conf = np.array([[5, 1], [2, 4]])
    scores = segmentation_scores(conf, ["background", "a"])
    assert scores["iou_a"] == pytest.approx(4 / 7)
    assert scores["iou_background"] == pytest.approx(5 / 8)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), 2)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 7), 3)
    with pytest.raises(ValueError, match="class names"):
        segmentation_scores(np.zeros((3, 4), int), ["a", "b"])


def _write_dirs(tmp_path, rng, n=3):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    preds, gts = [], []
    for k in range(n):
        pred, gt = _random_pair(rng, (12 + k, 9), 3)
        write_label_png(pred_dir / f"img{k}.png", pred)
        write_label_png(gt_dir / f"img{k}.png", gt)
        preds.append(pred)
        gts.append(gt)
    return pred_dir, gt_dir, preds, gts


def test_evaluate_label_dirs(tmp_path):
    rng = np.random.default_rng(2)
    pred_dir, gt_dir, preds, gts = _write_dirs(tmp_path, rng)
    scores = evaluate_label_dirs(pred_dir, gt_dir, 3, ["background", "a", "b"])
    miou, prec, rec, acc = _reference(preds, gts, 3)
    assert scores["miou"] == pytest.approx(miou)
    assert scores["precision"] == pytest.approx(prec)
    assert scores["recall"] == pytest.approx(rec)
    assert scores["pixel_accuracy"] == pytest.approx(acc)

    only = evaluate_label_dirs(pred_dir, gt_dir, 3, ids=["img1"])
    assert only["miou"] == pytest.approx(_reference(preds[1:2], gts[1:2], 3)[0])
    assert "iou_0" in only
    np.testing.assert_array_equal(
        accumulate_label_dirs(pred_dir, gt_dir, 3),
        sum(confusion_matrix(p, g, 3) for p, g in zip(preds, gts, strict=True)))

    table = format_table(scores, ["background", "a", "b"])
    assert "background" in table and "mIoU" in table
    assert f"{100 * scores['miou']:.2f}" in table


def test_missing_prediction_names_the_file(tmp_path):
    pred_dir, gt_dir, _, _ = _write_dirs(tmp_path, np.random.default_rng(3))
    (pred_dir / "img1.png").unlink()
    with pytest.raises(DatasetError, match=r"pred/img1\.png"):
        evaluate_label_dirs(pred_dir, gt_dir, 3)
    with pytest.raises(DatasetError, match=r"gt/nope\.png"):
        evaluate_label_dirs(pred_dir, gt_dir, 3, ids=["nope"])
    with pytest.raises(DatasetError, match="no ground-truth"):
        evaluate_label_dirs(pred_dir, tmp_path / "empty", 3)


def test_shape_mismatch_names_both_files(tmp_path):
    pred_dir, gt_dir, _, _ = _write_dirs(tmp_path, np.random.default_rng(4))
    write_label_png(pred_dir / "img0.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DatasetError, match=r"pred/img0\.png.*gt/img0\.png"):
        evaluate_label_dirs(pred_dir, gt_dir, 3)


def test_out_of_range_ground_truth_names_the_file(tmp_path):
    pred_dir, gt_dir, _, _ = _write_dirs(tmp_path, np.random.default_rng(5))
    write_label_png(gt_dir / "img2.png", np.full((14, 9), 9, np.uint8))
    with pytest.raises(DatasetError, match=r"gt/img2\.png.*9"):
        evaluate_label_dirs(pred_dir, gt_dir, 3)
