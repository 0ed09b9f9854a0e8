"""PASCAL VOC 2012 + SBD ("VOC aug") to the canonical layout (see ssr/data/layout.py).

Splits follow the WSSS convention:

    train_aug = (SBD train + SBD val + VOC train) - VOC val    10,582 images
    train     = VOC train                                       1,464 images
    val       = VOC val                                         1,449 images

Images come from VOC2012/JPEGImages (a superset of SBD's images). Labels come
from VOC2012/SegmentationClass where an image has one (palette PNGs whose 255
object borders are kept), otherwise from SBD `cls/{id}.mat` (`GTcls.Segmentation`)
or from a pre-converted `SegmentationClassAug/{id}.png`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.io

from ssr.config import DownloadParams
from ssr.data.download import atomic_dir, fetch_archive, link_or_copy
from ssr.data.layout import (
    IGNORE_INDEX,
    DatasetError,
    DatasetLayout,
    image_labels_from_mask,
    image_size,
    read_label_png,
    write_json,
    write_label_png,
)
from ssr.progress import progress_bar

logger = logging.getLogger(__name__)

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]

LabelLoader = Callable[[str], np.ndarray]


def read_ids(path: Path) -> list[str]:
    """One image id a line (VOC ImageSets and SBD list files)."""
    if not path.is_file():
        raise DatasetError(f"{path}: image list not found")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: image list is empty")
    return ids


def check_label_values(label: np.ndarray, path: Path | str, num_classes: int = len(VOC_CLASSES)) -> np.ndarray:
    """Return `label` as uint8 if it only holds 0..num_classes-1 and 255; DatasetError otherwise."""
    values = np.unique(label)
    bad = [int(v) for v in values if not (0 <= v < num_classes or v == IGNORE_INDEX)]
    if bad:
        raise DatasetError(f"{path}: label values {bad[:5]} outside 0..{num_classes - 1} and {IGNORE_INDEX}")
    return label.astype(np.uint8)


def read_sbd_mat(path: Path) -> np.ndarray:
    """(H, W) uint8 class map from an SBD `cls/{id}.mat` file (`GTcls.Segmentation`)."""
    if not path.is_file():
        raise DatasetError(f"{path}: SBD label file not found")
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
        segmentation = np.asarray(mat["GTcls"].Segmentation)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
        raise DatasetError(f"{path}: not an SBD class label file with GTcls.Segmentation ({err})") from err
    if segmentation.ndim != 2:
        raise DatasetError(f"{path}: GTcls.Segmentation must be 2-D, got shape {segmentation.shape}")
    return check_label_values(segmentation, path)


def _find_voc(archives: Path | None, download: DownloadParams, cache_dir: Path, progress: bool) -> Path:
    if archives is not None and (archives / "VOCdevkit" / "VOC2012").is_dir():
        logger.info("VOC 2012: using the tree %s", archives / "VOCdevkit" / "VOC2012")
        return archives / "VOCdevkit" / "VOC2012"
    tree = fetch_archive(download.voc_url, download.voc_md5, cache_dir=cache_dir, archives=archives,
                         progress=progress)
    voc = tree / "VOCdevkit" / "VOC2012"
    if not voc.is_dir():
        raise DatasetError(f"{tree}: the VOC archive holds no VOCdevkit/VOC2012 directory")
    return voc


def _find_aug(archives: Path | None, download: DownloadParams, cache_dir: Path,
              progress: bool) -> tuple[set[str], LabelLoader]:
    """Ids that have an augmented (SBD) label, and a function reading one."""
    if archives is not None and (archives / "SegmentationClassAug").is_dir():
        aug = archives / "SegmentationClassAug"
        logger.info("SBD: using the pre-converted labels %s", aug)
        ids = {p.stem for p in aug.glob("*.png")}
        if not ids:
            raise DatasetError(f"{aug}: no PNG labels found")
        return ids, lambda image_id: check_label_values(read_label_png(aug / f"{image_id}.png"),
                                                        aug / f"{image_id}.png")
    if archives is not None and (archives / "benchmark_RELEASE" / "dataset").is_dir():
        sbd = archives / "benchmark_RELEASE" / "dataset"
        logger.info("SBD: using the tree %s", sbd)
    else:
        tree = fetch_archive(download.sbd_url, download.sbd_md5, cache_dir=cache_dir, archives=archives,
                             progress=progress)
        sbd = tree / "benchmark_RELEASE" / "dataset"
        if not sbd.is_dir():
            raise DatasetError(f"{tree}: the SBD archive holds no benchmark_RELEASE/dataset directory")
    ids = set(read_ids(sbd / "train.txt")) | set(read_ids(sbd / "val.txt"))
    return ids, lambda image_id: read_sbd_mat(sbd / "cls" / f"{image_id}.mat")


def prepare_voc(root: Path, download: DownloadParams, *, archives: Path | None = None,
                cache_dir: Path | None = None, progress: bool = True) -> None:
    """Write VOC 2012 + SBD in the canonical layout under `root` (e.g. data/voc).

    Sources, per dataset, first found wins: an extracted tree in `archives`
    (`VOCdevkit/VOC2012`; `SegmentationClassAug/` or `benchmark_RELEASE/` for
    SBD), the official archive in `archives` (checksummed, never downloaded),
    a download into `cache_dir` (default `root.parent / "downloads"`), resumable.
    The layout is built beside `root` and renamed onto it at the end.
    """
    root = Path(root)
    archives = Path(archives) if archives is not None else None
    cache_dir = Path(cache_dir) if cache_dir is not None else root.parent / "downloads"
    voc = _find_voc(archives, download, cache_dir, progress)
    aug_ids, read_aug = _find_aug(archives, download, cache_dir, progress)

    sets = voc / "ImageSets" / "Segmentation"
    train, val = read_ids(sets / "train.txt"), read_ids(sets / "val.txt")
    train_aug = sorted((aug_ids | set(train)) - set(val))
    ids = sorted(set(train_aug) | set(val))

    with atomic_dir(root) as tmp:
        layout = DatasetLayout(tmp)
        layout.images_dir.mkdir()
        layout.labels_dir.mkdir()
        image_labels = {}
        for image_id in progress_bar(ids, desc="voc labels", unit="img", progress=progress):
            jpg = voc / "JPEGImages" / f"{image_id}.jpg"
            if not jpg.is_file():
                raise DatasetError(f"{jpg}: image not found (listed in the VOC or SBD splits)")
            png = voc / "SegmentationClass" / f"{image_id}.png"
            if png.is_file():
                label = check_label_values(read_label_png(png), png)
            elif image_id in aug_ids:
                label = read_aug(image_id)
            else:
                raise DatasetError(f"{png}: label not found, and {image_id} has no SBD label either")
            if label.shape != image_size(jpg):
                raise DatasetError(f"{image_id}: label shape {label.shape} does not match image {jpg} "
                                   f"of size {image_size(jpg)}")
            link_or_copy(jpg, layout.images_dir / f"{image_id}.jpg")
            write_label_png(layout.label_path(image_id), label)
            image_labels[image_id] = image_labels_from_mask(label, len(VOC_CLASSES))
        layout.write_split("train_aug", train_aug)
        layout.write_split("train", sorted(train))
        layout.write_split("val", sorted(val))
        write_json(tmp / "classes.json", VOC_CLASSES)
        write_json(tmp / "image_labels.json", image_labels)
    logger.info("VOC: %d train_aug, %d train, %d val images in %s", len(train_aug), len(train), len(val), root)
