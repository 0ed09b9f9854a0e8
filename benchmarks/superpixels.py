"""Speed and quality of the superpixels stage: each SLIC backend against the single-process skimage loop.

Speed, on VOC-sized photos (crops of scikit-image's bundled sample photos resized to 375x500,
a quarter of them portrait 500x375, written as JPEG to a temporary folder; nothing downloads):
    loop      `region_map(read_image(path), ..., backend="skimage")` over the images in this process,
              the way the stage computed maps before it had backends (the reference of every ratio);
    stage     `ssr.superpixels.build_superpixels` end to end (decode, maps, HDF5 checkpoint and
              final file, worker start-up): skimage with `--workers` processes (the stage before
              it had backends), opencv with 1 and with `--workers`.
All paths run in this process on the same images, alternating, `--repeats` times; a path's figure
is its median time. Each stage also runs on its first 16 images alone, which splits its time
into a fixed part (worker start-up) and a steady rate per image, the one that counts over a
dataset of thousands of images ("_steady_" figures).

Quality of each backend's region maps (params.yaml's superpixels settings):
    demo      undersegmentation error (UE, Neubert & Protzel: each region counts its pixels
              outside a class, or inside it if fewer) and achievable segmentation accuracy (ASA:
              the share of pixels labelled right when each region takes its majority class) against
              the true masks of the demo dataset (`ssr.data.demo.render_sample`, params.yaml's demo
              settings, train and val streams): mean UE and ASA, ASA's 1st percentile and minimum
              over the images, and on how many images the backends' ASA differs by more than 0.01;
    photos    adjusted Rand index (ARI) of each backend's maps against the skimage backend's, next to
              the ARI of skimage's maps with k-means seed + 1 against seed: how far apart two maps of
              equal quality already are; and the explained variation of the Lab colour (1 - within-
              region / total sum of squares), which needs no ground truth.

    PYTHONPATH=. python benchmarks/superpixels.py [--images 200] [--workers 2] [--repeats 3]
                                                  [--demo-images 300] [--out benchmarks/results/superpixels_cpu.json]

Prints one JSON line (also written to --out). Take figures on an otherwise idle machine: the
JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from emit import emit  # noqa: E402

# ssr.config and ssr.data.demo import torch: they are imported where used, because the stage's
# worker processes start by importing this script's top level (forkserver), as they import the
# light `ssr` entry point in a real run, and torch would add ~2 s to every measured pool start.
from ssr.data.layout import read_image, write_image  # noqa: E402
from ssr.superpixels import BACKENDS, backend_version, build_superpixels, region_map, stretched_lab  # noqa: E402

VOC_SIZE = (375, 500)
STARTUP_IMAGES = 16


def sample_photos(count: int, seed: int = 0) -> list[np.ndarray]:
    """VOC-sized RGB photos: random crops (70-100% of the largest window of the aspect) of skimage's colour samples.

    Returns `count` (375, 500, 3) uint8 arrays, every fourth one portrait (500, 375, 3).
    """
    from skimage import data

    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field(),
               data.immunohistochemistry(), data.retina(), data.stereo_motorcycle()[0]]
    rng = np.random.default_rng(seed)
    photos = []
    for k in range(count):
        source = sources[k % len(sources)]
        height, width = VOC_SIZE[::-1] if k % 4 == 3 else VOC_SIZE
        h, w = source.shape[:2]
        scale = rng.uniform(0.7, 1.0) * min(h / height, w / width)
        ch, cw = round(height * scale), round(width * scale)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(source[top:top + ch, left:left + cw])
        photos.append(np.asarray(crop.resize((width, height), Image.BILINEAR)))
    return photos


def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(A, B) pixel counts of two label maps of equal shape (ids renumbered)."""
    _, a = np.unique(a.ravel(), return_inverse=True)
    _, b = np.unique(b.ravel(), return_inverse=True)
    return np.bincount(a * (b.max() + 1) + b, minlength=(a.max() + 1) * (b.max() + 1)).reshape(a.max() + 1, -1)


def ue_asa(regions: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Undersegmentation error and achievable segmentation accuracy of a region map against true labels."""
    table = contingency(regions, truth)  # regions x classes
    sizes = table.sum(1, keepdims=True)
    return float(np.minimum(table, sizes - table).sum() / table.sum()), float(table.max(1).sum() / table.sum())


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    table = contingency(a, b).astype(np.float64)
    pairs = lambda x: (x * (x - 1) / 2).sum()  # noqa: E731
    total, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(table.sum())
    return float((total - expected) / ((rows + cols) / 2 - expected))


def explained_variation(regions: np.ndarray, lab: np.ndarray) -> float:
    """1 - (sum of squared Lab distances to the region means) / (the same to the image mean)."""
    lab = lab.reshape(-1, 3).astype(np.float64)
    ids = regions.ravel().astype(np.int64)
    counts = np.bincount(ids)
    means = np.stack([np.bincount(ids, weights=lab[:, c]) for c in range(3)], 1) / np.maximum(counts, 1)[:, None]
    return float(1 - ((lab - means[ids]) ** 2).sum() / ((lab - lab.mean(0)) ** 2).sum())


def cpu_info() -> dict:
    model = platform.processor()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"device": "cpu", "cpu": model, "cpu_count": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version()}


def measure_speed(paths: list[tuple[str, Path]], params, workers: int, repeats: int, scratch: Path) -> dict:
    """Median seconds of the loop and of the stages (skimage with `workers`, opencv with 1 and `workers`).

    Each stage also runs on the first STARTUP_IMAGES images alone ("{name}_start"): with the
    full run it separates the fixed cost (worker start-up, file set-up) from the rate per image.
    """
    def loop():
        for _, path in paths:
            region_map(read_image(path), params.n_segments, params.compactness, params.n_clusters, params.seed, "skimage")

    def stage(backend, n, count):
        def run():
            out = scratch / f"{backend}_{n}.h5"
            build_superpixels(paths[:count], out, params.model_copy(update={"backend": backend, "workers": n}), progress=False)
            out.unlink()
        return run

    # the skimage stage as it ran before (all workers), the opencv one in one process and in all
    runs = {"skimage_loop": loop}
    for backend, n in [("skimage", workers)] + [("opencv", n) for n in sorted({1, workers})]:
        runs[f"{backend}_stage_{n}w"] = stage(backend, n, len(paths))
        runs[f"{backend}_stage_{n}w_start"] = stage(backend, n, STARTUP_IMAGES)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure_quality(photos: list[np.ndarray], params, demo_params, demo_images: int) -> dict:
    from ssr.data.demo import render_sample

    p = params
    demo = [render_sample(demo_params, stream, i) for i in range(demo_images // 2) for stream in ("train", "val")]
    out = {"demo_images": len(demo), "photos": len(photos)}
    reference = [region_map(x, p.n_segments, p.compactness, p.n_clusters, p.seed, "skimage") for x in photos]
    reseeded = [region_map(x, p.n_segments, p.compactness, p.n_clusters, p.seed + 1, "skimage") for x in photos]
    ari = [adjusted_rand_index(a, b) for a, b in zip(reseeded, reference, strict=True)]
    out["photo_ari_skimage_seed_plus_1_vs_skimage"] = float(np.mean(ari))
    labs = [stretched_lab(x) for x in photos]
    asa = {}
    for backend in BACKENDS:
        scores = np.array([ue_asa(region_map(s.image, p.n_segments, p.compactness, p.n_clusters, p.seed, backend), s.label)
                           for s in demo])
        maps = reference if backend == "skimage" else [
            region_map(x, p.n_segments, p.compactness, p.n_clusters, p.seed, backend) for x in photos]
        out[f"{backend}_demo_ue"], out[f"{backend}_demo_asa"] = (float(v) for v in scores.mean(0))
        out[f"{backend}_demo_asa_p1"] = float(np.percentile(scores[:, 1], 1))
        out[f"{backend}_demo_asa_min"] = float(scores[:, 1].min())
        asa[backend] = scores[:, 1]
        ari = [adjusted_rand_index(a, b) for a, b in zip(maps, reference, strict=True)]
        out[f"{backend}_photo_ari_vs_skimage"] = float(np.mean(ari))
        explained = [explained_variation(m, lab) for m, lab in zip(maps, labs, strict=True)]
        out[f"{backend}_photo_explained_variation"] = float(np.mean(explained))
    # per image: how often one backend's ASA beats the other's by more than a point
    out["demo_images_opencv_asa_above_skimage_by_0.01"] = int((asa["opencv"] - asa["skimage"] > 0.01).sum())
    out["demo_images_opencv_asa_below_skimage_by_0.01"] = int((asa["opencv"] - asa["skimage"] < -0.01).sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # enough that the workers' start-up (~0.5 s) weighs little, as over a real dataset
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo-images", type=int, default=300)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "superpixels_cpu.json"))
    args = parser.parse_args()

    from ssr.config import load_params

    all_params = load_params(REPO / "params.yaml")
    params = all_params.superpixels
    result = {"benchmark": "superpixels", **cpu_info(), "load_average_before": os.getloadavg()[0],
              "images": args.images, "image_size": list(VOC_SIZE), "workers": args.workers, "repeats": args.repeats,
              "n_segments": params.n_segments, "compactness": params.compactness, "n_clusters": params.n_clusters,
              **{f"{b}_version": backend_version(b) for b in BACKENDS}}
    photos = sample_photos(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = []
        for k, photo in enumerate(photos):
            path = tmp / "images" / f"{k:04d}.jpg"
            write_image(path, photo, quality=90)
            paths.append((f"{k:04d}", path))
        seconds = measure_speed(paths, params, args.workers, args.repeats, tmp)
    loop = seconds.pop("skimage_loop")
    result["skimage_loop_images_per_second"] = args.images / loop
    for name in [n for n in seconds if not n.endswith("_start")]:
        full, start = seconds[name], seconds[f"{name}_start"]
        result[f"{name}_images_per_second"] = args.images / full
        result[f"{name}_ratio_vs_loop"] = loop / full
        # over a dataset of thousands of images only the rate per image counts
        steady = (full - start) / (args.images - STARTUP_IMAGES)
        result[f"{name}_steady_images_per_second"] = 1 / steady
        result[f"{name}_steady_ratio_vs_loop"] = loop / args.images / steady
        result[f"{name}_fixed_seconds"] = full - args.images * steady
    result["load_average_after_speed"] = os.getloadavg()[0]
    result.update(measure_quality(photos[:24], params, all_params.demo, args.demo_images))
    emit(result, args.out)


if __name__ == "__main__":
    main()
