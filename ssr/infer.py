"""Inference with the trained decoder: multi-scale + flip, optional DenseCRF, mIoU.

One machinery serves `ssr.predict`, `ssr predict` and every `ssr evaluate`: `predict_stream`
runs the network over a stream of images (batched where they share a size) and hands the
DenseCRF to a `CrfPool`, which refines earlier images in worker processes while the network
computes the next ones. `evaluate_model` scores a split with it, keeping each image's
predictions in a `PredictionStore` so that an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ssr.backbones import clip_visual_forward
from ssr.config import InferParams
from ssr.crf import CrfJob, CrfPool, crf_size
from ssr.data.dataset import read_ground_truth, snap_size
from ssr.data.download import atomic_dir
from ssr.data.layout import DatasetLayout, read_image, read_label_png, write_json, write_label_png
from ssr.data.transforms import normalise, to_unit
from ssr.figures import FigureCandidates, prediction_figure, replace_figures
from ssr.images import to_rgb
from ssr.metrics import confusion_matrix, format_table, segmentation_scores
from ssr.model import SSR, FrozenBackbones, autocast
from ssr.progress import progress_bar

logger = logging.getLogger(__name__)


@torch.no_grad()
def batch_probs(backbones: FrozenBackbones, model: SSR, images: torch.Tensor, scales: list[float], flip: bool,
                autocast_dtype=None) -> torch.Tensor:
    """Class probabilities of a batch of images of one size, averaged over scales and flips.

    images (B, 3, h, w) in [0, 1] -> (B, C + 1, h, w) probabilities at the input size.
    """
    b, _, h, w = images.shape
    patch = backbones.patch_size
    total = torch.zeros(b, model.decoder.classify.out_channels, h, w, device=images.device)
    count = 0
    for scale in scales:
        size = snap_size(h, w, round(max(h, w) * scale), patch)
        x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        views = torch.cat([x, x.flip(-1)]) if flip else x
        with autocast(images.device.type, autocast_dtype):
            visual = clip_visual_forward(backbones.clip.visual, normalise(views, backbones.clip_mean, backbones.clip_std))
            logits, _ = model.decoder(visual.tokens[: backbones.depth - 1], visual.grid)
        probs = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False).softmax(dim=1)
        # a view and its flip summed first, then added: the order of the sums the reference run was made with
        total += probs[:b] + probs[b:].flip(-1) if flip else probs
        count += 2 if flip else 1
    return total / count


def network_input(original: np.ndarray, long_side: int, patch_size: int, device) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, h, w) in [0, 1] on `device`, the long side `long_side`, sides multiples of the patch."""
    size = snap_size(*original.shape[:2], long_side, patch_size)
    image = to_unit(original).to(device)[None]
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)[0]


def image_probs(backbones: FrozenBackbones, model: SSR, original: np.ndarray, long_side: int, infer: InferParams, *,
                device, autocast_dtype=None) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (C + 1, H, W) float32 class probabilities at the image's own size."""
    image = network_input(original, long_side, backbones.patch_size, device)
    probs = batch_probs(backbones, model, image[None], infer.scales, infer.flip, autocast_dtype)
    return F.interpolate(probs, size=original.shape[:2], mode="bilinear", align_corners=False)[0].cpu().numpy()


@dataclass
class Prediction:
    """One image through `predict_stream`."""
    key: object                      # the caller's handle (an image id, a path)
    image: np.ndarray                # (H, W, 3) uint8 RGB, as segmented
    labels: np.ndarray               # (H, W) uint8, argmax of the decoder's probabilities
    labels_crf: np.ndarray | None    # (H, W) uint8 after DenseCRF, when it ran
    probs: np.ndarray | None         # (C + 1, H, W) float32, the final probabilities (after DenseCRF when it ran), if asked

    @property
    def final(self) -> np.ndarray:
        """What is saved as the prediction: after DenseCRF when it ran."""
        return self.labels if self.labels_crf is None else self.labels_crf


def _network_stream(backbones: FrozenBackbones, model: SSR, images: Iterable[tuple[object, np.ndarray]], *, long_side: int,
                    infer: InferParams, device, batch_size: int, keep_probs: bool, autocast_dtype):
    """-> ((key, image, labels, probs), CrfJob or None) per image, in order; `batch_size` images at a time,
    one network pass per group of them that share a network input size."""
    if batch_size < 1:
        raise ValueError(f"batch size: must be >= 1, got {batch_size}")
    model.eval()
    iterator = iter(images)
    while True:
        chunk = [item for _, item in zip(range(batch_size), iterator, strict=False)]
        if not chunk:
            return
        inputs = [network_input(image, long_side, backbones.patch_size, device) for _, image in chunk]
        out: list = [None] * len(chunk)
        groups: dict[tuple[int, int], list[int]] = {}
        for k, x in enumerate(inputs):
            groups.setdefault(tuple(x.shape[-2:]), []).append(k)
        for members in groups.values():
            probs = batch_probs(backbones, model, torch.stack([inputs[k] for k in members]), infer.scales, infer.flip,
                                autocast_dtype)
            for k, p in zip(members, probs, strict=True):
                out[k] = p
        for (key, image), probs in zip(chunk, out, strict=True):
            height, width = image.shape[:2]
            full = F.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)[0]
            labels = full.argmax(0).to(torch.uint8).cpu().numpy()
            job = None
            if infer.crf:
                size = crf_size(height, width, infer.crf_max_side)
                if size == (height, width):
                    job = CrfJob(image, full.cpu().numpy(), size, keep_probs)
                else:
                    import cv2

                    small = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]
                    job = CrfJob(cv2.resize(image, size[::-1], interpolation=cv2.INTER_AREA), small.cpu().numpy(),
                                 (height, width), keep_probs)
            kept = full.cpu().numpy() if keep_probs and job is None else None
            yield (key, image, labels, kept), job


def predict_stream(backbones: FrozenBackbones, model: SSR, images: Iterable[tuple[object, np.ndarray]], *, long_side: int,
                   infer: InferParams, device, batch_size: int = 1, crf_pool: CrfPool | None = None, keep_probs: bool = False,
                   autocast_dtype=None) -> Iterator[Prediction]:
    """(key, (H, W, 3) uint8 RGB) pairs -> a `Prediction` each, in order, DenseCRF (`infer.crf`) in `crf_pool`.

    `images` is drawn lazily, so a generator that reads files keeps only the images in flight
    in memory. Without a pool DenseCRF runs in this process.
    """
    network = _network_stream(backbones, model, images, long_side=long_side, infer=infer, device=device,
                              batch_size=batch_size, keep_probs=keep_probs, autocast_dtype=autocast_dtype)
    pool = crf_pool or CrfPool(0)
    for (key, image, labels, probs), refined in pool.map(network, infer):
        labels_crf = None
        if refined is not None:
            labels_crf, crf_probs = refined
            probs = crf_probs if keep_probs else None
        yield Prediction(key, image, labels, labels_crf, probs)


def inference_params(trained, **overrides) -> tuple[InferParams, int]:
    """A loaded model's recorded inference settings with `overrides` (None = as recorded) -> (infer params, long side).

    overrides: scales, flip, crf, crf_max_side (InferParams fields) and long_side.
    """
    long_side = overrides.pop("long_side", None)
    long_side = trained.config["dataset_params"]["long_side"] if long_side is None else long_side
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(changes) - set(InferParams.model_fields)
    if unknown:
        raise TypeError(f"unknown inference settings: {', '.join(sorted(unknown))}")
    infer = InferParams(**{**trained.infer.model_dump(), **changes})
    if long_side < 1:
        raise ValueError(f"long side: must be >= 1, got {long_side}")
    return infer, long_side


def predict(trained, image, *, crf: bool | None = None, scales: list[float] | None = None, flip: bool | None = None,
            long_side: int | None = None, crf_max_side: int | None = None, background="white",
            probabilities: bool = False):
    """Segment one image with a model from `ssr.load_model`.

    image: a path, a PIL image or an array, converted by `ssr.images.to_rgb` (greyscale,
    palette, 16-bit, channels first, float in [0, 1]; transparency composited on
    `background`, "white" or "black"; files and PIL images upright by their EXIF orientation).
    The model's recorded inference settings (long side, scales, flip, DenseCRF, its maximum
    side) apply unless overridden here. Returns (H, W) uint8 class indices into
    `trained.classes` (0 = background) at the image's (upright) size; with `probabilities`,
    (labels, (C + 1, H, W) float32 class probabilities, after DenseCRF when it ran).
    """
    rgb = to_rgb(image, background, name="predict: image")
    infer, side = inference_params(trained, crf=crf, scales=scales, flip=flip, crf_max_side=crf_max_side,
                                   long_side=long_side)
    device = trained.backbones.text.device
    (out,) = predict_stream(trained.backbones, trained.model, [(None, rgb)], long_side=side, infer=infer, device=device,
                            keep_probs=probabilities)
    return (out.final, out.probs) if probabilities else out.final


# ------------------------------------------------------------------ scoring a split


def model_digest(backbones: FrozenBackbones, model: SSR) -> str:
    """SHA-256 of the trained weights and the prompt embeddings: which model a stored prediction came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(backbones.text.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class PredictionStore:
    """One model's predictions on a split, image by image, so that an interrupted evaluation resumes.

        {folder}/settings.json           model digest, split, long side, inference params
        {folder}/predictions/{id}.png    argmax of the decoder's probabilities
        {folder}/predictions_crf/{id}.png  after DenseCRF (when infer.crf)

    Each PNG is written atomically; an image counts as done when all of its PNGs exist. A
    folder written under other settings is emptied first (logged): its predictions belong to
    another model or configuration.
    """

    def __init__(self, folder: Path, settings: dict):
        self.folder = Path(folder)
        self.crf = bool(settings["infer"]["crf"])
        path = self.folder / "settings.json"
        if path.is_file():
            try:
                recorded = json.loads(path.read_text())
            except json.JSONDecodeError:
                recorded = None
            if recorded != settings:
                logger.info("%s: written under other settings (another model or inference params): starting over", path)
                for sub in ("predictions", "predictions_crf"):
                    shutil.rmtree(self.folder / sub, ignore_errors=True)
        write_json(path, settings)

    def _paths(self, image_id: str) -> list[Path]:
        names = ("predictions", "predictions_crf") if self.crf else ("predictions",)
        return [self.folder / name / f"{image_id}.png" for name in names]

    def done(self, image_id: str) -> bool:
        return all(p.is_file() for p in self._paths(image_id))

    def read(self, image_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        labels = [read_label_png(p) for p in self._paths(image_id)]
        return labels[0], (labels[1] if self.crf else None)

    def write(self, image_id: str, labels: np.ndarray, labels_crf: np.ndarray | None) -> None:
        for path, label in zip(self._paths(image_id), (labels, labels_crf), strict=False):
            write_label_png(path, label)


def saved_predictions(store: Path, crf: bool) -> Path:
    """The folder of a `PredictionStore` holding what is saved as the prediction: after DenseCRF when it ran."""
    return Path(store) / ("predictions_crf" if crf else "predictions")


class SplitImages:
    """The images of one split and their ground truth where it exists (a test split has none, nor weak labels)."""

    def __init__(self, root: Path, split: str):
        self.layout = DatasetLayout(root)
        self.ids = self.layout.split(split)
        self.classes = self.layout.classes()

    def original(self, image_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The image as stored, (H, W, 3) uint8, and its ground truth (H, W) uint8 or None."""
        original = read_image(self.layout.image_path(image_id))
        path = self.layout.label_path(image_id)
        gt = read_ground_truth(path, original.shape[:2], len(self.classes)) if path.exists() else None
        return original, gt


def evaluate_model(backbones: FrozenBackbones, model: SSR, root: Path, split: str, long_side: int, infer: InferParams,
                   *, device, store: Path, pred_dir: Path | None = None, figures: int = 4, progress: bool = True,
                   tables: bool | None = None, autocast_dtype=None, crf_pool: CrfPool | None = None,
                   batch_size: int = 1) -> dict:
    """Decoder predictions on every image of `split`, those with ground truth scored, with and without
    DenseCRF -> flat metrics dict (empty when no image of the split has ground truth).

    Predictions go to a `PredictionStore` in `store`; those already there (an interrupted run
    of the same model and settings) are read back, not recomputed. With `pred_dir`, the saved
    predictions (after DenseCRF when `infer.crf`) also go to pred_dir/{id}.png and 2 x `figures`
    strips (image | ground truth | prediction | after DenseCRF; the lowest-mIoU images and a fixed
    random sample, see `FigureCandidates`) to pred_dir/figures/; that folder appears under its name
    (replacing an earlier one) only once all of it is written. `tables` (default: `progress`)
    prints the per-class tables.
    """
    args = (backbones, model, root, split, long_side, infer)
    kwargs = dict(device=device, store=store, figures=figures, progress=progress, autocast_dtype=autocast_dtype,
                  crf_pool=crf_pool, batch_size=batch_size, tables=progress if tables is None else tables)
    if pred_dir is None:
        return _evaluate_model(*args, pred_dir=None, **kwargs)
    with atomic_dir(pred_dir) as staged:
        return _evaluate_model(*args, pred_dir=staged, **kwargs)


def _evaluate_model(backbones: FrozenBackbones, model: SSR, root: Path, split: str, long_side: int, infer: InferParams, *,
                    device, store: Path, pred_dir: Path | None, figures: int, progress: bool, tables: bool,
                    autocast_dtype, crf_pool: CrfPool | None, batch_size: int) -> dict:
    data = SplitImages(root, split)
    names = data.classes
    settings = {"model": model_digest(backbones, model), "split": split, "images": len(data.ids), "long_side": long_side,
                "infer": infer.model_dump()}
    kept = PredictionStore(store, settings)
    done = {image_id for image_id in data.ids if kept.done(image_id)}
    if done:
        logger.info("%s: %d of %d predictions already there, reused", store, len(done), len(data.ids))

    def todo():
        for image_id in data.ids:
            if image_id not in done:
                original, gt = data.original(image_id)
                yield (image_id, gt), original

    stream = predict_stream(backbones, model, todo(), long_side=long_side, infer=infer, device=device, batch_size=batch_size,
                            crf_pool=crf_pool, autocast_dtype=autocast_dtype)
    conf = np.zeros((len(names), len(names) + 1), np.int64)
    conf_crf = np.zeros_like(conf)
    scored = 0
    strips = FigureCandidates(figures) if pred_dir is not None else None
    for image_id in progress_bar(data.ids, desc=f"evaluate {split}", unit="img", progress=progress):
        if image_id in done:
            original, gt = data.original(image_id)
            pred, pred_crf = kept.read(image_id)
        else:
            out = next(stream)
            (key, gt), original, pred, pred_crf = out.key, out.image, out.labels, out.labels_crf
            assert key == image_id, (key, image_id)
            kept.write(image_id, pred, pred_crf)
        saved = pred if pred_crf is None else pred_crf
        if gt is not None:
            scored += 1
            conf += confusion_matrix(pred, gt, len(names))
            if pred_crf is not None:
                conf_crf += confusion_matrix(pred_crf, gt, len(names))
        if pred_dir is not None:
            write_label_png(pred_dir / f"{image_id}.png", saved)
            iou = None if gt is None else segmentation_scores(confusion_matrix(saved, gt, len(names)), names)["miou"]
            strips.offer(image_id, iou, lambda original=original, gt=gt, pred=pred, pred_crf=pred_crf, iou=iou: {
                "image": original, "gt": gt, "pred": pred, "pred_crf": pred_crf, "iou": iou})
    if strips is not None:
        _write_strips(strips, pred_dir / "figures", names, scored=len(data.ids), crf=infer.crf)
    if not scored:
        return {}
    scores = segmentation_scores(conf, names)
    if tables:
        print(format_table(scores, names))
    out = dict(scores)
    if infer.crf:
        crf_scores = segmentation_scores(conf_crf, names)
        if tables:
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


# The VOC evaluation server's folder for class segmentations (the devkit's VOCinit.m:
# results/VOC2012/Segmentation/{competition}_{testset}_cls/{id}.png). Competition 6 is the one
# for methods trained with data from outside VOC, as SSR is (CLIP's pretraining); 5 is VOC only.
VOC_SUBMISSION = Path("results", "VOC2012", "Segmentation", "comp6_test_cls")


def write_submission(saved: Path, ids: list[str], target: Path) -> Path:
    """Class-indexed label PNGs saved/{id}.png -> target/results/VOC2012/Segmentation/comp6_test_cls/{id}.png.

    The folder appears under its name, replacing an earlier one, once complete; it is ready to
    tar: `tar -czf submission.tgz -C {target} results`. -> the PNGs' folder.
    """
    with atomic_dir(target) as staged:
        folder = staged / VOC_SUBMISSION
        folder.mkdir(parents=True)
        for image_id in ids:
            shutil.copyfile(saved / f"{image_id}.png", folder / f"{image_id}.png")
    return target / VOC_SUBMISSION
