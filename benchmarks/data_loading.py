"""Training data throughput: `ssr.data.dataset.TrainCrops` through a DataLoader, per worker count and item format.

Builds a temporary dataset in the canonical layout (`ssr/data/layout.py`) from VOC-sized photos
(crops of scikit-image's bundled samples, 375x500 and 500x375 JPEGs; nothing downloads): label
PNGs, a split, classes.json, image_labels.json, and superpixels.h5 built by the superpixels
stage (params.yaml's settings). Then loads it the way `ssr.train` does: the VOC preset's crop
and scale range, its micro-batch, `ResumableSampler` keys, `collate`; one torch thread in
this process, as in a training process whose GPU does the work.

Three item formats, each timed the same way:
- "float": float32 images and int64 region maps (`train.fast_path: false`, the reference);
- "compact": uint8 images and region maps (`compact=True`, what the fast path loads: the
  device divides by 255 to the same floats);
- "compact_cache": the same, decoded images and region maps read back from `DecodedCache`
  (`train.decode_cache: true`; the cache is filled by one pass first, as the first epoch does).
For each worker count (default 0, 1, 2) it times `--batches` batches after the first (which
pays the workers' start-up) and reports images/s; 0 workers (the main process) is the cost of
one image on one core. From the best rate per worker it reports how many workers, one free core
each, keep up with a GPU step rate of `--target-images-per-second`.

    PYTHONPATH=. python benchmarks/data_loading.py [--images 64] [--batches 30] [--workers 0 1 2]
                                                   [--target-images-per-second 1000] [--with-gt]
                                                   [--out benchmarks/results/data_loading_cpu.json]

Prints one JSON line (also written to --out). Take figures on an otherwise idle machine: the
JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from emit import emit  # noqa: E402
from superpixels import cpu_info, sample_photos  # noqa: E402  (benchmarks/superpixels.py)

from ssr.config import load_params  # noqa: E402
from ssr.data.dataset import TrainCrops, collate  # noqa: E402
from ssr.data.layout import IGNORE_INDEX, DatasetLayout, write_image, write_json, write_label_png  # noqa: E402
from ssr.data.regions import RegionMaps  # noqa: E402
from ssr.superpixels import build_superpixels  # noqa: E402
from ssr.train import ResumableSampler  # noqa: E402

VOC_CLASSES = 21


def build_dataset(root: Path, count: int, superpixel_params) -> None:
    """`count` photos in the canonical layout, split "train", with superpixels.h5 from the stage.

    Labels: the region map as classes 0..7 inside a 5 px ignore border, a VOC-like label PNG.
    """
    layout = DatasetLayout(root)
    ids = [f"{k:05d}" for k in range(count)]
    for image_id, photo in zip(ids, sample_photos(count), strict=True):
        write_image(layout.images_dir / f"{image_id}.jpg", photo, quality=90)
    build_superpixels([(i, layout.images_dir / f"{i}.jpg") for i in ids], layout.superpixels_path, superpixel_params,
                      progress=False)
    image_labels = {}
    with RegionMaps(layout.superpixels_path) as maps:
        for image_id in ids:
            label = np.full(maps[image_id].shape, IGNORE_INDEX, np.uint8)
            label[5:-5, 5:-5] = maps[image_id][5:-5, 5:-5]
            write_label_png(layout.label_path(image_id), label)
            image_labels[image_id] = sorted({int(c) for c in np.unique(label) if 0 < c < VOC_CLASSES})
    layout.write_split("train", ids)
    write_json(root / "classes.json", ["background"] + [f"class{c}" for c in range(1, VOC_CLASSES)])
    write_json(root / "image_labels.json", image_labels)


def images_per_second(data: TrainCrops, workers: int, micro: int, batches: int) -> float:
    """Steady-state rate: `batches` batches timed after the first one."""
    loader = DataLoader(data, batch_size=micro, sampler=ResumableSampler(len(data), micro, seed=0),
                        num_workers=workers, collate_fn=collate, generator=torch.Generator().manual_seed(0))
    stream = iter(loader)
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
    seconds = time.perf_counter() - start
    assert batch["image"].shape == (micro, 3, data.crop_size, data.crop_size)
    del stream  # shuts the workers down
    return batches * micro / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target-images-per-second", type=float, default=1000.0)
    parser.add_argument("--with-gt", action="store_true", help="also crop the ground truth (TrainCrops with_gt)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_loading_cpu.json"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    params = load_params(REPO / "params.yaml")
    preset = params.train_presets["voc"]
    micro = preset.batch_size // preset.accumulation
    result = {"benchmark": "data_loading", **cpu_info(), "load_average_before": os.getloadavg()[0],
              "images": args.images, "crop_size": preset.crop_size, "scale_min": preset.scale_min,
              "scale_max": preset.scale_max, "batch_size": micro, "batches": args.batches, "with_gt": args.with_gt,
              "superpixels_backend": params.superpixels.backend, "torch": torch.__version__}
    result["target_images_per_second"] = args.target_images_per_second
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        build_dataset(root, args.images, params.superpixels)
        kwargs = {"crop_size": preset.crop_size, "scale_min": preset.scale_min, "scale_max": preset.scale_max,
                  "superpixels": root / "superpixels.h5", "with_gt": args.with_gt}
        formats = {"float": TrainCrops(root, "train", **kwargs),
                   "compact": TrainCrops(root, "train", compact=True, **kwargs),
                   "compact_cache": TrainCrops(root, "train", compact=True, cache_dir=Path(tmp) / "decoded", **kwargs)}
        for index in range(len(formats["compact_cache"])):      # the first epoch fills the cache
            formats["compact_cache"][index]
        for name, data in formats.items():
            entry = {f"workers_{n}_images_per_second": images_per_second(data, n, micro, args.batches) for n in args.workers}
            if 0 in args.workers:
                entry["ms_per_image_main_process"] = 1000 / entry["workers_0_images_per_second"]
            # the best rate per worker measured: one worker alone also waits on each hand-over
            per_worker = max((entry[f"workers_{n}_images_per_second"] / n for n in args.workers if n > 0), default=None)
            if per_worker:
                entry["ms_per_image_per_worker"] = 1000 / per_worker
                entry["workers_needed_for_target"] = math.ceil(args.target_images_per_second / per_worker)
            result[name] = entry
            print(f"{name:14s}: " + ", ".join(f"{k} {v:.1f}" for k, v in entry.items()), flush=True)
    result["load_average_after"] = os.getloadavg()[0]
    emit(result, args.out)


if __name__ == "__main__":
    main()
