"""Tiny datasets in the official archive layouts, for offline tests.

VOC 2012 trainval tar:  VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}
SBD benchmark.tgz:      benchmark_RELEASE/dataset/{img,cls,inst}/ + {train,val}.txt
COCO 2014 zips:         train2014/*.jpg, val2014/*.jpg, annotations/instances_{train,val}2014.json

Labels are deterministic functions of the image id, so tests can recompute
what the converted layout must hold.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse
from PIL import Image

from ssr.config import DownloadParams
from ssr.data.layout import voc_palette

VOC_TARBALL = "VOCtrainval_11-May-2012.tar"
SBD_TARBALL = "benchmark.tgz"

VOC_TRAIN = ["2008_000002", "2008_000003", "2008_000007"]
VOC_VAL = ["2008_000008", "2008_000009", "2008_000015"]
# Overlaps VOC val (2008_000008, 2008_000009) and VOC train (2008_000002) on purpose.
SBD_TRAIN = ["2007_000032", "2007_000039", "2008_000008"]
SBD_VAL = ["2008_000002", "2008_000009"]
EXTRA_JPEGS = ["2007_000042"]  # in JPEGImages but in no split
TRAIN_AUG = sorted((set(SBD_TRAIN) | set(SBD_VAL) | set(VOC_TRAIN)) - set(VOC_VAL))
ALL_VOC_IDS = sorted(set(VOC_TRAIN) | set(VOC_VAL) | set(SBD_TRAIN) | set(SBD_VAL) | set(EXTRA_JPEGS))


def md5_of(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def file_url(path: Path) -> str:
    return Path(path).resolve().as_uri()


def _seed(image_id: str, salt: int) -> int:
    return int(hashlib.md5(f"{image_id}/{salt}".encode()).hexdigest()[:8], 16)


def image_shape(image_id: str) -> tuple[int, int]:
    rng = np.random.default_rng(_seed(image_id, 0))
    return int(rng.integers(20, 33)), int(rng.integers(24, 41))


def _rgb(image_id: str) -> np.ndarray:
    h, w = image_shape(image_id)
    return np.random.default_rng(_seed(image_id, 1)).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _box_label(image_id: str, salt: int, border: bool) -> np.ndarray:
    h, w = image_shape(image_id)
    rng = np.random.default_rng(_seed(image_id, salt))
    label = np.zeros((h, w), np.uint8)
    for _ in range(2):
        cls = int(rng.integers(1, 21))
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        y1, x1 = y0 + int(rng.integers(4, h // 2)), x0 + int(rng.integers(4, w // 2))
        if border:  # VOC draws a 255 band around each object
            label[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = 255
        label[y0:y1, x0:x1] = cls
    return label


def voc_label(image_id: str) -> np.ndarray:
    """The SegmentationClass label of a VOC image: two boxes with 255 borders."""
    return _box_label(image_id, 2, border=True)


def sbd_label(image_id: str) -> np.ndarray:
    """The SBD GTcls.Segmentation of an image: two boxes, no ignore band, not equal to voc_label."""
    return _box_label(image_id, 3, border=False)


def _write_voc_png(path: Path, label: np.ndarray) -> None:
    image = Image.fromarray(label, mode="P")
    image.putpalette(voc_palette())
    image.save(path)


def build_voc_tree(root: Path) -> Path:
    """Write `root/VOCdevkit/VOC2012/...`; returns the VOC2012 directory."""
    voc = root / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    for d in (voc / "JPEGImages", voc / "SegmentationClass", voc / "Annotations", sets):
        d.mkdir(parents=True, exist_ok=True)
    for image_id in ALL_VOC_IDS:
        Image.fromarray(_rgb(image_id)).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=90)
    for image_id in VOC_TRAIN + VOC_VAL:
        _write_voc_png(voc / "SegmentationClass" / f"{image_id}.png", voc_label(image_id))
    (sets / "train.txt").write_text("".join(f"{i}\n" for i in VOC_TRAIN))
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in VOC_VAL))
    (sets / "trainval.txt").write_text("".join(f"{i}\n" for i in sorted(VOC_TRAIN + VOC_VAL)))
    return voc


def build_sbd_tree(root: Path) -> Path:
    """Write `root/benchmark_RELEASE/dataset/...`; returns the dataset directory."""
    dataset = root / "benchmark_RELEASE" / "dataset"
    for d in ("img", "cls", "inst"):
        (dataset / d).mkdir(parents=True, exist_ok=True)
    for image_id in SBD_TRAIN + SBD_VAL:
        Image.fromarray(_rgb(image_id)).save(dataset / "img" / f"{image_id}.jpg", quality=90)
        seg = sbd_label(image_id)
        present = np.unique(seg[seg > 0]).astype(np.uint8)
        boundaries = np.empty((len(present), 1), dtype=object)  # SBD: a cell of sparse edge maps
        for i, c in enumerate(present):
            inside = seg == c
            edge = inside & ~np.pad(inside, 1)[2:, 1:-1] | inside & ~np.pad(inside, 1)[1:-1, 2:]
            boundaries[i, 0] = scipy.sparse.csc_matrix(edge)
        scipy.io.savemat(dataset / "cls" / f"{image_id}.mat", {"GTcls": {
            "Segmentation": seg, "Boundaries": boundaries,
            "CategoriesPresent": present}})
        scipy.io.savemat(dataset / "inst" / f"{image_id}.mat", {"GTinst": {
            "Segmentation": (seg > 0).astype(np.uint8), "Categories": present}})
    (dataset / "train.txt").write_text("".join(f"{i}\n" for i in SBD_TRAIN))
    (dataset / "val.txt").write_text("".join(f"{i}\n" for i in SBD_VAL))
    return dataset


def build_aug_tree(root: Path) -> Path:
    """Write `root/SegmentationClassAug/{id}.png` (greyscale class indices) for SBD and VOC val ids."""
    aug = root / "SegmentationClassAug"
    aug.mkdir(parents=True, exist_ok=True)
    for image_id in SBD_TRAIN + SBD_VAL:
        Image.fromarray(sbd_label(image_id), mode="L").save(aug / f"{image_id}.png")
    for image_id in VOC_VAL:
        Image.fromarray(voc_label(image_id), mode="L").save(aug / f"{image_id}.png")
    return aug


def _tar(path: Path, src: Path, top: str) -> Path:
    mode = "w:gz" if path.name.endswith((".tgz", ".tar.gz")) else "w"
    with tarfile.open(path, mode) as tar:
        tar.add(src / top, arcname=top)
    return path


def _zip(path: Path, src: Path, top: str) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted((src / top).rglob("*")):
            zf.write(f, f.relative_to(src).as_posix())
    return path


def build_voc_archives(out_dir: Path, work: Path) -> tuple[Path, Path]:
    """Write the VOC tar and the SBD tgz into `out_dir` under their official names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    build_voc_tree(work / "voc")
    build_sbd_tree(work / "sbd")
    return (_tar(out_dir / VOC_TARBALL, work / "voc", "VOCdevkit"),
            _tar(out_dir / SBD_TARBALL, work / "sbd", "benchmark_RELEASE"))


# ---------------------------------------------------------------- COCO

COCO_CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
]


def box_polygon(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (as used for crowd annotations): run lengths in column-major order."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def coco_images(split: str) -> list[dict]:
    """The tiny COCO image records: (coco id, height, width) per split."""
    sizes = {"train2014": [(9, 40, 48), (25, 30, 36), (30, 32, 32), (34, 24, 30), (36, 28, 28)],
             "val2014": [(42, 36, 40), (73, 30, 44), (74, 26, 26)]}[split]
    return [{"id": i, "height": h, "width": w, "file_name": f"COCO_{split}_{i:012d}.jpg"} for i, h, w in sizes]


def coco_annotations(split: str) -> list[dict]:
    """Annotations exercising the rules.

    train 9: a small dog (listed first) inside a big person, and a crowd of cars
             over rows 30.. (drawn last, 255 even over the person).
    train 34: no annotations; train 36: only a crowd -> both excluded from splits.
    val 74: no annotations -> excluded.
    """
    crowd = np.zeros((40, 48), np.uint8)
    crowd[30:, :] = 1
    anns = {
        "train2014": [
            (9, 18, box_polygon(10, 10, 20, 20), 100.0, 0),
            (9, 1, box_polygon(4, 4, 40, 36), 1152.0, 0),
            (9, 3, uncompressed_rle(crowd), float(crowd.sum()), 1),
            (25, 3, box_polygon(2, 2, 30, 20), 504.0, 0),
            (30, 1, box_polygon(0, 0, 10, 10), 100.0, 0),
            (30, 18, box_polygon(16, 16, 30, 30), 196.0, 0),
            (36, 1, uncompressed_rle(np.pad(np.ones((8, 8), np.uint8), ((0, 20), (0, 20)))), 64.0, 1),
        ],
        "val2014": [
            (42, 18, box_polygon(5, 5, 35, 30), 750.0, 0),
            (73, 1, box_polygon(2, 2, 40, 28), 988.0, 0),
            (73, 3, box_polygon(20, 10, 30, 20), 100.0, 0),
        ],
    }[split]
    out = []
    for n, (image_id, cat, seg, area, crowd_flag) in enumerate(anns):
        ann_id = 1000 * (split == "val2014") + n + 1
        out.append({"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": seg,
                    "area": area, "bbox": [0, 0, 1, 1], "iscrowd": crowd_flag})
    return out


def coco_instances(split: str) -> dict:
    return {"info": {"description": "tiny test COCO"}, "licenses": [], "images": coco_images(split),
            "annotations": coco_annotations(split), "categories": COCO_CATEGORIES}


def build_coco_tree(root: Path) -> Path:
    """Write `root/{train2014,val2014}/*.jpg` and `root/annotations/instances_*2014.json`."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train2014", "val2014"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for info in coco_images(split):
            rgb = np.random.default_rng(info["id"]).integers(0, 256, (info["height"], info["width"], 3), np.uint8)
            Image.fromarray(rgb).save(root / split / info["file_name"], quality=90)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco_instances(split)))
    (root / "annotations" / "captions_train2014.json").write_text("{}")
    return root


def build_coco_archives(out_dir: Path, work: Path) -> dict[str, Path]:
    """Write train2014.zip, val2014.zip, annotations_trainval2014.zip into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    build_coco_tree(work)
    return {"train": _zip(out_dir / "train2014.zip", work, "train2014"),
            "val": _zip(out_dir / "val2014.zip", work, "val2014"),
            "annotations": _zip(out_dir / "annotations_trainval2014.zip", work, "annotations")}


def source(path: Path, *, missing_dir: Path | None = None) -> tuple[str, str]:
    """(file:// URL, MD5) of a tiny archive; with `missing_dir` the URL names a file there that does
    not exist (same file name), so any download attempt fails and proves that none happens."""
    url = file_url(missing_dir / Path(path).name) if missing_dir is not None else file_url(path)
    return url, md5_of(path)


def download_params(**sources: tuple[str, str]) -> DownloadParams:
    """DownloadParams from `voc=`, `sbd=`, `coco_train=`, `coco_val=`, `coco_annotations=` (url, md5)
    pairs; a dataset left out gets a URL to a file that does not exist."""
    fields = {}
    for key in ("voc", "sbd", "coco_train", "coco_val", "coco_annotations"):
        fields[f"{key}_url"], fields[f"{key}_md5"] = sources.pop(key, ("file:///nonexistent/missing.tar", "0" * 32))
    if sources:
        raise TypeError(f"unknown sources {sorted(sources)}")
    return DownloadParams(**fields)
