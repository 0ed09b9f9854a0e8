"""Inference with the trained decoder: multi-scale + flip, optional DenseCRF, mIoU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ssr.backbones import clip_visual_forward
from ssr.config import InferParams
from ssr.crf import dense_crf
from ssr.data.dataset import WholeImages, snap_size
from ssr.data.download import atomic_dir
from ssr.data.layout import write_label_png
from ssr.data.transforms import normalise, to_unit
from ssr.figures import FigureCandidates, prediction_figure, replace_figures
from ssr.metrics import confusion_matrix, format_table, segmentation_scores
from ssr.model import SSR, FrozenBackbones, autocast
from ssr.progress import progress_bar


@torch.no_grad()
def decoder_probs(backbones: FrozenBackbones, model: SSR, image: torch.Tensor, scales: list[float], flip: bool,
                  autocast_dtype=None) -> torch.Tensor:
    """Class probabilities of one image, averaged over scales and flips.

    image (3, h, w) in [0, 1] -> (C + 1, h, w) probabilities at the input size.
    """
    h, w = image.shape[-2:]
    patch = backbones.patch_size
    total = torch.zeros(model.decoder.classify.out_channels, h, w, device=image.device)
    count = 0
    for scale in scales:
        size = snap_size(h, w, round(max(h, w) * scale), patch)
        x = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
        views = [x, x.flip(-1)] if flip else [x]
        batch = torch.cat(views)
        with autocast(image.device.type, autocast_dtype):
            visual = clip_visual_forward(backbones.clip.visual, normalise(batch, backbones.clip_mean, backbones.clip_std))
            logits, _ = model.decoder(visual.tokens[: backbones.depth - 1], visual.grid)
        logits = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1)
        if flip:
            probs[1] = probs[1].flip(-1)
        total += probs.sum(dim=0)
        count += len(views)
    return total / count


def image_probs(backbones: FrozenBackbones, model: SSR, original: np.ndarray, long_side: int, infer: InferParams, *,
                device, autocast_dtype=None) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (C + 1, H, W) float32 class probabilities at the image's own size."""
    size = snap_size(*original.shape[:2], long_side, backbones.patch_size)
    image = to_unit(original).to(device)[None]
    image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)[0]
    probs = decoder_probs(backbones, model, image, infer.scales, infer.flip, autocast_dtype)
    return F.interpolate(probs[None], size=original.shape[:2], mode="bilinear", align_corners=False)[0].cpu().numpy()


def dense_crf_from_params(image: np.ndarray, probs: np.ndarray, params: InferParams) -> np.ndarray:
    """`dense_crf` with the `infer.crf_*` settings of params.yaml, kernels sized to the image.

    The reference spatial standard deviations are for images of about
    `crf_reference_size` px on the long side (VOC's 500); they scale with the image's
    long side, so a 64 px demo image gets kernels of the same relative extent.
    image (H, W, 3) uint8, probs (C, H, W) -> (C, H, W) float32.
    """
    scale = max(image.shape[:2]) / params.crf_reference_size if params.crf_reference_size else 1.0
    return dense_crf(
        image,
        probs,
        iterations=params.crf_iterations,
        pos_xy_std=params.crf_pos_xy_std * scale,
        pos_w=params.crf_pos_w,
        bi_xy_std=params.crf_bi_xy_std * scale,
        bi_rgb_std=params.crf_bi_rgb_std,
        bi_w=params.crf_bi_w,
    )


def predict(trained, image: np.ndarray, *, crf: bool | None = None) -> np.ndarray:
    """Segment one image with a model from `ssr.load_model`.

    image: (H, W, 3) uint8 RGB. Uses the model's recorded inference settings (long side,
    scales, flip); `crf` overrides whether DenseCRF runs. Returns (H, W) uint8 class
    indices into `trained.classes` (0 = background).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"predict: expected an (H, W, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    infer = trained.infer
    device = trained.backbones.text.device
    probs = image_probs(trained.backbones, trained.model, image, trained.config["dataset_params"]["long_side"], infer,
                        device=device)
    if infer.crf if crf is None else crf:
        probs = dense_crf_from_params(image, probs, infer)
    return probs.argmax(0).astype(np.uint8)


def evaluate_model(backbones: FrozenBackbones, model: SSR, root: Path, split: str, long_side: int, infer: InferParams,
                   *, device, pred_dir: Path | None = None, figures: int = 4, progress: bool = True, autocast_dtype=None) -> dict:
    """Decoder predictions on `split`, scored with and without DenseCRF -> flat metrics dict.

    With `pred_dir`, the saved predictions (after DenseCRF when `infer.crf`) go to pred_dir/{id}.png
    and `figures` strips (image | ground truth | prediction | after DenseCRF; the lowest-mIoU images
    and the first ones, see `FigureCandidates`) to pred_dir/figures/; the folder appears under its
    name (replacing an earlier one) only once all of it is written.
    """
    args = (backbones, model, root, split, long_side, infer)
    kwargs = dict(device=device, figures=figures, progress=progress, autocast_dtype=autocast_dtype)
    if pred_dir is None:
        return _evaluate_model(*args, pred_dir=None, **kwargs)
    with atomic_dir(pred_dir) as staged:
        return _evaluate_model(*args, pred_dir=staged, **kwargs)


def _evaluate_model(backbones: FrozenBackbones, model: SSR, root: Path, split: str, long_side: int, infer: InferParams, *,
                    device, pred_dir: Path | None, figures: int, progress: bool, autocast_dtype) -> dict:
    data = WholeImages(root, split, long_side=long_side, patch_size=backbones.patch_size)
    names = data.classes
    conf = np.zeros((len(names), len(names) + 1), np.int64)
    conf_crf = np.zeros_like(conf)
    strips = FigureCandidates(figures) if pred_dir is not None else None
    model.eval()
    for image_id in progress_bar(data.ids, desc=f"evaluate {split}", unit="img", progress=progress):
        original, gt = data.original(image_id)
        if gt is None:
            continue
        probs = image_probs(backbones, model, original, long_side, infer, device=device, autocast_dtype=autocast_dtype)
        pred = probs.argmax(0).astype(np.uint8)
        conf += confusion_matrix(pred, gt, len(names))
        pred_crf = None
        if infer.crf:
            pred_crf = dense_crf_from_params(original, probs, infer).argmax(0).astype(np.uint8)
            conf_crf += confusion_matrix(pred_crf, gt, len(names))
        if pred_dir is not None:
            saved = pred_crf if infer.crf else pred
            write_label_png(pred_dir / f"{image_id}.png", saved)
            iou = segmentation_scores(confusion_matrix(saved, gt, len(names)), names)["miou"]
            strips.offer(image_id, iou, lambda original=original, gt=gt, pred=pred, pred_crf=pred_crf, iou=iou: {
                "image": original, "gt": gt, "pred": pred, "pred_crf": pred_crf, "iou": iou})
    if strips is not None:
        _write_strips(strips, pred_dir / "figures", names, scored=len(data.ids), crf=infer.crf)
    scores = segmentation_scores(conf, names)
    if progress:
        print(format_table(scores, names))
    out = dict(scores)
    if infer.crf:
        crf_scores = segmentation_scores(conf_crf, names)
        if progress:
            print("with DenseCRF:")
            print(format_table(crf_scores, names))
        out.update({f"crf_{k}": v for k, v in crf_scores.items()})
    return out


def _write_strips(strips: FigureCandidates, folder: Path, names: list[str], scored: int, crf: bool) -> None:
    """The picked images' prediction strips, titled with their id, why they were picked and their mIoU."""
    saved = "after DenseCRF" if crf else "prediction"
    out = {}
    for name, title, data in strips.titled("mIoU", f"{scored} images"):
        score = "" if data["iou"] is None else f", mIoU {data['iou']:.1%} ({saved})"
        out[name] = prediction_figure(data["image"], data["gt"], data["pred"], data["pred_crf"], names, title=title + score)
    replace_figures(folder, out)
