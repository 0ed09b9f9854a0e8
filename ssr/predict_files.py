"""`ssr predict`: segment image files into a folder of label PNGs and overlays.

For each input image `{stem}.{ext}`:

    {out}/{stem}.png          palette PNG of class indices at the image's (upright) size, in the
                              dataset's colours (the VOC palette, as every label PNG of ssr)
    {out}/{stem}_overlay.jpg  the image with the classes other than background tinted in their colour
    {out}/{stem}.npz          with `probabilities`: "probabilities" (C + 1, H, W) float16 (after
                              DenseCRF when it ran) and "classes" (C + 1 names)

Each file is written atomically; an image whose outputs all exist is skipped unless
`overwrite`, so an interrupted run resumes. A file that cannot be read is logged, skipped and
counted: the others are still written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ssr.crf import CrfPool
from ssr.data.layout import atomic_path, write_label_png
from ssr.figures import colourise
from ssr.images import ImageError, read_rgb
from ssr.infer import predict_stream
from ssr.progress import progress_bar

logger = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.5  # the class colour over the image: half and half keeps both readable


@dataclass
class PredictReport:
    written: list[Path] = field(default_factory=list)   # inputs segmented now
    skipped: list[Path] = field(default_factory=list)   # inputs whose outputs were all there
    failed: list[str] = field(default_factory=list)     # "INPUT: problem"


def output_paths(out: Path, image: Path, probabilities: bool) -> list[Path]:
    """The files written for one input image."""
    stem = image.stem
    return [out / f"{stem}.png", out / f"{stem}_overlay.jpg"] + ([out / f"{stem}.npz"] if probabilities else [])


def check_outputs(files: list[Path], out: Path, probabilities: bool) -> None:
    """ValueError when two inputs would write the same outputs, or an output would replace an input."""
    by_stem: dict[str, Path] = {}
    clashes = []
    for path in files:
        if path.stem in by_stem:
            clashes.append(f"{by_stem[path.stem]} and {path}")
        by_stem.setdefault(path.stem, path)
    if clashes:
        more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
        raise ValueError(f"inputs with the same name would write the same outputs in {out}: {'; '.join(clashes[:3])}{more}; "
                         f"predict them into separate --out folders")
    inputs = {p.resolve() for p in files}
    for path in files:
        for target in output_paths(out, path, probabilities):
            if target.resolve() in inputs:
                raise ValueError(f"{target}: an output would replace the input image {target}; choose another --out folder")


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image, (H, W) labels -> the image with every non-background pixel tinted in its class colour."""
    tinted = (1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * colourise(labels).astype(np.float32)
    return np.where((labels != 0)[..., None], np.rint(tinted), image).astype(np.uint8)


def write_outputs(paths: list[Path], image: np.ndarray, labels: np.ndarray, probs: np.ndarray | None,
                  classes: list[str]) -> None:
    write_label_png(paths[0], labels)
    with atomic_path(paths[1]) as tmp:
        Image.fromarray(overlay(image, labels)).save(tmp, format="JPEG", quality=90)
    if len(paths) > 2:
        with atomic_path(paths[2]) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, probabilities=probs.astype(np.float16), classes=np.array(classes))


def predict_files(trained, files: list[Path], out: Path, *, infer, long_side: int, batch_size: int = 1, workers: int = 0,
                  probabilities: bool = False, overwrite: bool = False, background="white",
                  progress: bool = True) -> PredictReport:
    """Segment `files` with a model from `ssr.load_model` into `out` (see the module docstring).

    infer, long_side: the inference settings (`ssr.infer.inference_params`); workers: DenseCRF
    processes (0: in this one).
    """
    out = Path(out)
    check_outputs(files, out, probabilities)
    report = PredictReport()
    todo = []
    for path in files:
        if not overwrite and all(p.is_file() for p in output_paths(out, path, probabilities)):
            report.skipped.append(path)
        else:
            todo.append(path)
    if report.skipped:
        logger.info("%d of %d images already segmented in %s: skipped (--overwrite redoes them)", len(report.skipped),
                    len(files), out)
    bar = progress_bar(total=len(todo), desc="predict", unit="image", progress=progress)

    def readable():
        for path in todo:
            try:
                image = read_rgb(path, background)
            except ImageError as err:
                logger.error("%s; skipped", err)
                report.failed.append(str(err))
                bar.update()
                continue
            yield path, image

    device = trained.backbones.text.device
    with CrfPool(workers if infer.crf else 0) as pool:
        for prediction in predict_stream(trained.backbones, trained.model, readable(), long_side=long_side, infer=infer,
                                         device=device, batch_size=batch_size, crf_pool=pool, keep_probs=probabilities):
            write_outputs(output_paths(out, prediction.key, probabilities), prediction.image, prediction.final,
                          prediction.probs, trained.classes)
            report.written.append(prediction.key)
            bar.update()
    bar.close()
    return report
