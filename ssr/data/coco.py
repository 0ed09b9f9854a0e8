"""MS COCO 2014 to the canonical layout (see ssr/data/layout.py), semantic labels via pycocotools.

Label rule: the 80 categories become 1..80 in category-id order (0 is
background). Instances are drawn largest first (by annotation area, ties by
annotation id), so where instances overlap the smaller one stays visible.
Crowd regions (`iscrowd=1`) are drawn last as 255 (ignore) and override
everything under them.

Splits `train` (train2014) and `val` (val2014) hold only images with at least
one non-crowd annotation (the WSSS convention: 82,081 and 40,137 images).
Image ids are file stems, e.g. `COCO_train2014_000000000009`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ssr.config import DownloadParams
from ssr.data.download import atomic_dir, fetch_archive, link_or_copy
from ssr.data.layout import (
    IGNORE_INDEX,
    DatasetError,
    DatasetLayout,
    image_labels_from_mask,
    image_size,
    write_json,
    write_label_png,
)
from ssr.progress import progress_bar

logger = logging.getLogger(__name__)

SPLITS = {"train": "train2014", "val": "val2014"}


def ann_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 0/1 mask of a COCO segmentation (polygons, RLE or compressed RLE).

    The same decoding as `COCO.annToMask`, without needing the COCO index: converting an
    image needs only its own annotations.
    """
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def semantic_label(anns: list[dict], height: int, width: int, cat_to_label: dict[int, int]) -> np.ndarray:
    """(H, W) uint8 label map of one image's annotations (rule in the module docstring)."""
    label = np.zeros((height, width), np.uint8)
    things = sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: (-a["area"], a["id"]))
    crowds = [a for a in anns if a.get("iscrowd", 0)]
    for ann in things:
        label[ann_to_mask(ann["segmentation"], height, width) > 0] = cat_to_label[ann["category_id"]]
    for ann in crowds:
        label[ann_to_mask(ann["segmentation"], height, width) > 0] = IGNORE_INDEX
    return label


def _convert_image(task: tuple) -> tuple[str, list[int]]:
    """Link one image and write its label PNG; returns (id, image-level labels)."""
    info, anns, src, out_root, cat_to_label = task
    image_id = Path(info["file_name"]).stem
    if not src.is_file():
        raise DatasetError(f"{src}: image not found (listed in the annotations)")
    height, width = info["height"], info["width"]
    if image_size(src) != (height, width):
        raise DatasetError(f"{src}: image size {image_size(src)} does not match the annotations' "
                           f"{(height, width)}")
    try:
        label = semantic_label(anns, height, width, cat_to_label)
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(f"{image_id}: malformed annotation ({type(err).__name__}: {err})") from err
    layout = DatasetLayout(out_root)
    link_or_copy(src, layout.images_dir / f"{image_id}.jpg")
    write_label_png(layout.label_path(image_id), label)
    return image_id, image_labels_from_mask(label, len(cat_to_label) + 1)


def load_coco(path: Path) -> COCO:
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its timing
            return COCO(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as err:
        raise DatasetError(f"{path}: not a COCO instances annotation file ({type(err).__name__}: {err})") from err


def _find_sources(archives: Path | None, download: DownloadParams, cache_dir: Path,
                  progress: bool) -> tuple[dict[str, Path], Path]:
    """({split: image directory}, annotations directory)."""
    def tree_or_fetch(subdir: str, url: str, md5: str) -> Path:
        if archives is not None and (archives / subdir).is_dir():
            logger.info("COCO: using the tree %s", archives / subdir)
            return archives / subdir
        tree = fetch_archive(url, md5, cache_dir=cache_dir, archives=archives, progress=progress)
        if not (tree / subdir).is_dir():
            raise DatasetError(f"{tree}: the archive from {url} holds no {subdir}/ directory")
        return tree / subdir

    image_dirs = {
        "train": tree_or_fetch("train2014", download.coco_train_url, download.coco_train_md5),
        "val": tree_or_fetch("val2014", download.coco_val_url, download.coco_val_md5),
    }
    annotations = tree_or_fetch("annotations", download.coco_annotations_url, download.coco_annotations_md5)
    return image_dirs, annotations


def prepare_coco(root: Path, download: DownloadParams, *, archives: Path | None = None,
                 cache_dir: Path | None = None, progress: bool = True) -> None:
    """Write COCO 2014 in the canonical layout under `root` (e.g. data/coco).

    Sources, per archive, first found wins: an extracted tree in `archives`
    (`train2014/`, `val2014/`, `annotations/`), the official zip in `archives`
    (checksummed, never downloaded), a download into `cache_dir` (default
    `root.parent / "downloads"`), resumable.
    The layout is built beside `root` and renamed onto it at the end.
    """
    root = Path(root)
    archives = Path(archives) if archives is not None else None
    cache_dir = Path(cache_dir) if cache_dir is not None else root.parent / "downloads"
    image_dirs, annotations = _find_sources(archives, download, cache_dir, progress)

    with atomic_dir(root) as tmp:
        layout = DatasetLayout(tmp)
        layout.images_dir.mkdir()
        layout.labels_dir.mkdir()
        image_labels, classes, cat_to_label = {}, None, None
        for split, name in SPLITS.items():
            # One split's index at a time: the train index alone takes gigabytes.
            ann_file = annotations / f"instances_{name}.json"
            coco = load_coco(ann_file)
            categories = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
            if cat_to_label is None:
                cat_to_label = {c["id"]: i + 1 for i, c in enumerate(categories)}
                classes = ["background"] + [c["name"] for c in categories]
            elif sorted(cat_to_label) != [c["id"] for c in categories]:
                raise DatasetError(f"{ann_file}: lists other categories than instances_{SPLITS['train']}.json")
            tasks = []
            for coco_id in sorted(coco.getImgIds()):
                anns = coco.imgToAnns.get(coco_id, [])
                if not any(not a.get("iscrowd", 0) for a in anns):
                    continue
                unknown = {a["category_id"] for a in anns} - set(cat_to_label)
                if unknown:
                    raise DatasetError(f"{ann_file}: image {coco_id} "
                                       f"has annotations of unknown categories {sorted(unknown)}")
                info = coco.imgs[coco_id]
                tasks.append((info, anns, image_dirs[split] / info["file_name"], tmp, cat_to_label))
            split_ids = []
            for task in progress_bar(tasks, desc=f"coco {split} labels", unit="img", progress=progress):
                image_id, labels = _convert_image(task)
                image_labels[image_id] = labels
                split_ids.append(image_id)
            del coco, tasks
            layout.write_split(split, sorted(split_ids))
            logger.info("COCO: %d %s images with annotations", len(split_ids), split)
        write_json(tmp / "classes.json", classes)
        write_json(tmp / "image_labels.json", image_labels)
