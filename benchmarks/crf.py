"""DenseCRF's cost per image, and what worker processes and `infer.crf_max_side` make of it.

- per image, in this process: a VOC-sized 375 x 500 image at 5, 21 (VOC) and 81 (COCO) classes,
  params.yaml's `infer` kernels (10 mean-field iterations);
- the stream through `ssr.crf.CrfPool` with 1 and 2 worker processes, as images/s and as a ratio to
  the in-process loop over the same images (workers start inside the timing);
- a large photo (default 3000 x 2000, 21 classes) at full size and at `infer.crf_max_side` (CPU time);
- COCO val (40,137 images, 81 classes) extrapolated from the per-image CPU time: hours of DenseCRF
  per model for 1, 8 and 16 worker processes (one core each).

    python benchmarks/crf.py [--images 6] [--big 3000x2000] [--out FILE]

Prints a line per measurement and, last, a JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
from configs import device_name, emit
from torch import device as torch_device

from ssr.config import load_params  # noqa: E402
from ssr.crf import CrfJob, CrfPool, crf_size, run_crf_job  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COCO_VAL = 40137


def scene(rng: np.random.Generator, height: int, width: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random image and softmax probabilities over `classes` (DenseCRF's cost depends on sizes, not values)."""
    coarse = rng.integers(0, 256, (height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8)
    import cv2

    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    logits = cv2.resize(rng.normal(size=(height // 25 + 2, width // 25 + 2, classes)).astype(np.float32) * 3, (width, height),
                        interpolation=cv2.INTER_LINEAR).reshape(height, width, classes)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return image, np.ascontiguousarray(probs.transpose(2, 0, 1))


def per_image(jobs: list[CrfJob], infer) -> tuple[float, float]:
    """Median (wall, CPU) seconds of run_crf_job over `jobs`, in this process.

    DenseCRF runs on one thread, so its CPU time is the wall time it takes on a core of its own:
    the figure to extrapolate from on a machine that other jobs share.
    """
    wall, cpu = [], []
    for job in jobs:
        start, start_cpu = time.perf_counter(), time.process_time()
        run_crf_job(job, infer)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--big", default="3000x2000", help="WxH of the large photo ('' to skip it)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    infer = load_params(REPO / "params.yaml").infer
    rng = np.random.default_rng(0)
    report = {"benchmark": "crf", "device": device_name(torch_device("cpu")), "cpus": os.cpu_count(),
              "load_average_at_start": os.getloadavg()[0], "iterations": infer.crf_iterations, "per_image_s": {},
              "per_image_cpu_s": {}}
    for classes in (5, 21, 81):
        jobs = [CrfJob(*scene(rng, 375, 500, classes), (375, 500)) for _ in range(3)]
        wall, cpu = per_image(jobs, infer)
        report["per_image_s"][classes] = wall
        report["per_image_cpu_s"][classes] = cpu
        print(f"375x500, {classes:2d} classes: {cpu:.2f} s of CPU per image ({wall:.2f} s wall) in this process", flush=True)

    jobs = [CrfJob(*scene(rng, 375, 500, 21), (375, 500)) for _ in range(args.images)]
    start = time.perf_counter()
    for job in jobs:
        run_crf_job(job, infer)
    inline = time.perf_counter() - start
    report["stream_21_classes"] = {"images": len(jobs), "in_process_images_per_s": len(jobs) / inline}
    for workers in (1, 2):
        start = time.perf_counter()
        with CrfPool(workers) as pool:
            for _ in pool.map(((k, job) for k, job in enumerate(jobs)), infer):
                pass
        seconds = time.perf_counter() - start
        report["stream_21_classes"][f"workers_{workers}_images_per_s"] = len(jobs) / seconds
        report["stream_21_classes"][f"workers_{workers}_ratio"] = inline / seconds
        print(f"{len(jobs)} images, 21 classes, {workers} worker(s): {len(jobs) / seconds:.2f} images/s, "
              f"{inline / seconds:.2f}x the in-process loop ({len(jobs) / inline:.2f} images/s)", flush=True)

    if args.big:
        width, height = map(int, args.big.split("x"))
        image, probs = scene(rng, height, width, 21)
        capped = crf_size(height, width, infer.crf_max_side)
        import cv2

        small = CrfJob(cv2.resize(image, capped[::-1], interpolation=cv2.INTER_AREA),
                       np.ascontiguousarray(cv2.resize(probs.transpose(1, 2, 0), capped[::-1]).transpose(2, 0, 1)),
                       (height, width))
        full = per_image([CrfJob(image, probs, (height, width))], infer)[1]
        cap = per_image([small], infer)[1]
        report["big"] = {"size": [height, width], "classes": 21, "full_s": full, "capped_size": list(capped), "capped_s": cap,
                         "ratio": full / cap}
        print(f"{width}x{height}, 21 classes: {full:.1f} s of CPU at full size, {cap:.2f} s at crf_max_side "
              f"{infer.crf_max_side} ({capped[1]}x{capped[0]}, upsampled after): {full / cap:.1f}x", flush=True)

    seconds = report["per_image_cpu_s"][81]
    report["coco_val_hours"] = {workers: COCO_VAL * seconds / workers / 3600 for workers in (1, 8, 16)}
    print("COCO val (40,137 images, 81 classes), DenseCRF per model: "
          + ", ".join(f"{h:.1f} h with {w} worker(s)" for w, h in report["coco_val_hours"].items()), flush=True)
    emit(report, args.out)


if __name__ == "__main__":
    main()
