"""Offline region maps for SGC (paper Eq. 8: SLIC superpixels grouped by colour k-means; params.yaml `superpixels`).

An image's region map groups its SLIC superpixels by colour: k-means on the
mean Lab colour of each superpixel, so one region is a set of (possibly
disconnected) superpixels of similar colour. The maps of a whole dataset are
computed once, in parallel over images, and stored in one HDF5 file keyed by
image id, with the parameters as file attributes:

    superpixels.h5
        attrs: n_segments, compactness, n_clusters, seed, method, backend
        {image_id}: (H, W) uint8 region ids in [0, n_clusters), gzip, one chunk per map

The file's bytes are a function of the maps and these params alone, so equal maps give
an equal file (and DVC's hash) on every machine: no timestamps, and no library version.
The version of the SLIC library goes to the stage's log and to the resume checkpoint, which
is never continued under another version. Measured (README, "What varies across machines"):
the demo's maps are identical under OpenCV 5.0 and 5.1, on every OpenCV dispatch level from
AVX-512 down to SSE3, and HDF5 1.14.4, 1.14.6 and 2.0 write the same bytes.

Two SLIC implementations (`backend`):
    skimage  scikit-image's `slic` (10 iterations), the reference;
    opencv   OpenCV contrib's `ximgproc` SLIC on the same CIELAB input, 3 iterations and
             OpenCV's default minimum segment size; several times faster, and its
             maps measure as good on ground truth (benchmarks/superpixels.py).

Training reads the file through `ssr.data.regions.RegionMaps`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import multiprocessing
import os
import re
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from ssr.data.layout import DatasetError, atomic_path, read_image
from ssr.data.regions import RegionMaps, image_id_of, region_key
from ssr.progress import progress_bar

if TYPE_CHECKING:  # a runtime import would pull torch into every worker process (2 s each to start)
    from ssr.config import SuperpixelParams

logger = logging.getLogger(__name__)

METHOD = "slic+kmeans-lab"
BACKENDS = ("skimage", "opencv")
MAX_CLUSTERS = 256  # region ids are stored as uint8

# OpenCV SLIC runs a fixed number of iterations, each about a fifth of a map's cost; on the
# demo masks 3 score as well as 10 and better than scikit-image's 10 (benchmarks/superpixels.py).
OPENCV_ITERATIONS = 3
# Segments under this percentage of the grid cell are merged into a neighbour (OpenCV's default;
# scikit-image merges under 50%, which swallows thin object parts).
OPENCV_MIN_SIZE_PERCENT = 25

# Ids finished per worker task: small enough that an interruption loses little
# work, large enough that process hand-over costs little next to SLIC.
_CHUNK = 8
# In-process runs commit the checkpoint every this many images.
_COMMIT_EVERY = 32
_DONE_ATTR = "complete"
# Maps are small and read whole: one chunk each, and the fastest gzip level (level 4
# compresses them only 15% smaller at twice the write time).
# No modification times (h5py's default, made explicit): a rerun must write the same bytes.
_DATASET_OPTIONS = {"compression": "gzip", "compression_opts": 1, "track_times": False}


def slic_labels(image: np.ndarray, n_segments: int, compactness: float, backend: str = "skimage") -> np.ndarray:
    """SLIC superpixels of an RGB image (converted to CIELAB by either backend).

    image: (H, W, 3) uint8 RGB. Returns (H, W) int labels in [0, S), S superpixels.
    """
    _check_image(image)
    _check_backend(backend)
    if backend == "skimage":
        from skimage.segmentation import slic

        return slic(image, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1)
    return _opencv_slic(stretched_lab(image), n_segments, compactness)


def stretched_lab(image: np.ndarray) -> np.ndarray:
    """CIELAB of the image after stretching its values to [0, 1], as scikit-image's `slic` does.

    The stretch keeps `compactness` weighing colour against distance the same way in
    both backends. image: (H, W, 3) uint8 RGB. Returns (H, W, 3) float32, L in [0, 100].
    """
    import cv2

    rgb = image.astype(np.float32)
    lo, hi = float(rgb.min()), float(rgb.max())
    rgb -= lo
    if hi > lo:
        rgb *= 1.0 / (hi - lo)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)


def _opencv_slic(lab: np.ndarray, n_segments: int, compactness: float) -> np.ndarray:
    """OpenCV SLIC of a (H, W, 3) float32 Lab image: (H, W) int32 labels in [0, S)."""
    import cv2

    height, width = lab.shape[:2]
    # the grid step that gives n_segments cells, as scikit-image derives it; at most the short
    # side, since OpenCV places no seed (and crashes) along a side shorter than half a step
    step = max(1, min(round(math.sqrt(height * width / n_segments)), height, width))
    slic = cv2.ximgproc.createSuperpixelSLIC(lab, algorithm=cv2.ximgproc.SLIC, region_size=step, ruler=float(compactness))
    slic.iterate(OPENCV_ITERATIONS)
    slic.enforceLabelConnectivity(OPENCV_MIN_SIZE_PERCENT)
    return slic.getLabels()


def euclidean_kmeans(x: np.ndarray, k: int, seed: int, max_iter: int = 100, tol: float = 1e-6) -> np.ndarray:
    """Deterministic Euclidean k-means (k-means++ init, Lloyd iterations); ssr.cmpa.spherical_kmeans is the cosine one.

    x: (N, D) float. Returns (N,) int64 cluster ids in [0, k') with k' <= k,
    numbered by first appearance in x, so equal inputs give equal ids.
    k' < k when x has fewer than k distinct points: k-means++ stops adding
    centres once every point lies within `tol` of one (so float rounding in
    the means of a uniform area does not split it).
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    tol2 = tol * tol
    d2 = ((x - centres[0]) ** 2).sum(1)
    d2[d2 <= tol2] = 0
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:
            break
        # inverse-CDF draw: points already on a centre (d2 = 0) can never be picked
        i = min(int(np.searchsorted(np.cumsum(d2), rng.random() * total, side="right")), n - 1)
        centres.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
        d2[d2 <= tol2] = 0
    centres = np.stack(centres)

    assign = None
    for _ in range(max_iter):
        dist = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
        new = dist.argmin(1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for c in range(len(centres)):
            members = assign == c
            if members.any():  # an emptied cluster keeps its old centre
                centres[c] = x[members].mean(0)

    _, first = np.unique(assign, return_index=True)
    order = np.argsort(first)  # cluster ids sorted by first appearance
    relabel = np.empty(len(centres), dtype=np.int64)
    relabel[assign[first[order]]] = np.arange(len(order))
    return relabel[assign]


def region_map(image: np.ndarray, n_segments: int, compactness: float, n_clusters: int, seed: int,
               backend: str = "skimage") -> np.ndarray:
    """Region map C of Eq. 8: SLIC superpixels grouped by k-means on their mean Lab colour.

    image: (H, W, 3) uint8 RGB. Returns (H, W) uint8 region ids in [0, n_clusters);
    ids are contiguous from 0 (at most min(n_clusters, number of superpixels) regions).
    k-means weighs every superpixel equally, whatever its size. The opencv backend takes
    the colours from the Lab image its SLIC ran on; scikit-image converts internally, so
    the skimage backend converts a second time.
    """
    if not 1 <= n_clusters <= MAX_CLUSTERS:
        raise ValueError(f"n_clusters must be in [1, {MAX_CLUSTERS}], got {n_clusters}")
    _check_image(image)
    _check_backend(backend)
    if backend == "skimage":
        from skimage.color import rgb2lab

        labels = slic_labels(image, n_segments, compactness, backend)
        lab = rgb2lab(image)
    else:
        lab = stretched_lab(image)
        labels = _opencv_slic(lab, n_segments, compactness)
    sp, n_sp = _contiguous(labels.ravel())
    lab = lab.reshape(-1, 3)
    counts = np.bincount(sp, minlength=n_sp).astype(np.float64)
    means = np.stack([np.bincount(sp, weights=lab[:, ch], minlength=n_sp) for ch in range(3)], 1) / counts[:, None]
    clusters = euclidean_kmeans(means, min(n_clusters, n_sp), seed).astype(np.uint8)
    return clusters[sp].reshape(labels.shape)


def _contiguous(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Renumber non-negative ids to 0..n-1 in their order (SLIC ids normally already are).

    labels: (N,) int. Returns ((N,) int ids, n).
    """
    present = np.bincount(labels) > 0
    if present.all():
        return labels, len(present)
    return (np.cumsum(present) - 1)[labels], int(present.sum())


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"superpixels backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def backend_version(backend: str) -> str:
    """Version of the library that computes the backend's SLIC (a file attribute)."""
    _check_backend(backend)
    if backend == "skimage":
        import skimage

        return skimage.__version__
    import cv2

    return cv2.__version__


# --- the HDF5 file -----------------------------------------------------------

def _attrs(params: SuperpixelParams) -> dict:
    """The product's attributes: the params that change the maps (not `workers`)."""
    return {
        "n_segments": int(params.n_segments),
        "compactness": float(params.compactness),
        "n_clusters": int(params.n_clusters),
        "seed": int(params.seed),
        "method": METHOD,
        "backend": params.backend,
    }


def _checkpoint_attrs(params: SuperpixelParams) -> dict:
    """The resume checkpoint's attributes: the product's and the library version, so that one file
    never mixes maps of two versions (an upgrade between an interruption and its resume starts over)."""
    return {**_attrs(params), "backend_version": backend_version(params.backend)}


def _attrs_match(file: h5py.File, expected: dict) -> bool:
    for name, value in expected.items():
        if name not in file.attrs:
            return False
        stored = file.attrs[name]
        if isinstance(stored, bytes):
            stored = stored.decode()
        if isinstance(value, float):
            stored = float(stored)
        if stored != value:
            return False
    return True


def partial_path(out_path: str | os.PathLike) -> Path:
    """The resume checkpoint of `build_superpixels` for `out_path`."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".partial.h5")


@contextlib.contextmanager
def _writing(path: Path, hint: str):
    """Turn a failed HDF5 write (a full disk) into one DatasetError naming `path`, with `hint`.

    HDF5 writes a dataset's chunks when the dataset closes, which h5py does in a destructor
    that can only report its error: Cython prints the traceback (through sys.excepthook),
    then hands the error to sys.unraisablehook. Both hooks collect it here instead.
    """
    failed = []
    hooks = sys.unraisablehook, sys.excepthook
    sys.unraisablehook = lambda unraisable: failed.append(unraisable.exc_value)
    sys.excepthook = lambda kind, value, tb: failed.append(value)
    try:
        yield
    except DatasetError:
        raise
    except (OSError, RuntimeError) as err:  # h5py raises both for a failed write
        failed.append(err)
    finally:
        sys.unraisablehook, sys.excepthook = hooks
    if failed:
        errno = re.search(r"errno = (\d+)", str(failed[0]))
        reason = os.strerror(int(errno[1])) if errno else str(failed[0]).splitlines()[0]
        raise DatasetError(f"{path}: cannot write ({reason}); {hint}")


class _Checkpoint:
    """The partial HDF5 file: finished maps, each marked complete only after it is flushed.

    The mark is written after the data has reached the file, so a kill between
    the two leaves an unmarked dataset, which a resume drops and recomputes; a
    kill that leaves the file unreadable makes the resume start over.
    """

    def __init__(self, path: Path, attrs: dict):
        self.path = path
        self.file = None
        self.broken = False  # a write failed: the file cannot be trusted
        if path.exists():
            try:
                file = h5py.File(path, "a")
            except OSError:
                file = None  # unreadable checkpoint: start over
            if file is not None and _attrs_match(file, attrs):
                self.file = file
                for key in list(file.keys()):
                    if not file[key].attrs.get(_DONE_ATTR, False):
                        del file[key]
            elif file is not None:
                file.close()
        if self.file is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            with self._writing():
                self.file = h5py.File(path, "w")
                self.file.attrs.update(attrs)
                self.file.flush()
        self.done = {image_id_of(k) for k in self.file.keys()}
        self._pending: list[str] = []

    @contextlib.contextmanager
    def _writing(self):
        try:
            with _writing(self.path, "free disk space and rerun `ssr superpixels` (it starts over: a partly written "
                                     "HDF5 file cannot be trusted, so it is deleted)"):
                yield
        except DatasetError:
            self.broken = True
            raise

    def add(self, image_id: str, regions: np.ndarray) -> None:
        key = region_key(image_id)
        with self._writing():
            if key in self.file:  # an id listed twice, or left from a stale run
                del self.file[key]
            self.file.create_dataset(key, data=regions, dtype=np.uint8, chunks=regions.shape, **_DATASET_OPTIONS)
        self._pending.append(key)

    def commit(self) -> None:
        if not self._pending or self.broken:
            return
        with self._writing():
            self.file.flush()
            for key in self._pending:
                self.file[key].attrs[_DONE_ATTR] = True
                self.done.add(image_id_of(key))
            self.file.flush()
        self._pending = []

    def close(self) -> None:
        if self.file is not None:
            file, self.file = self.file, None
            if self.broken:  # HDF5 retries the failed writes as it closes, and fails again: expected
                with contextlib.suppress(DatasetError), _writing(self.path, ""):
                    file.close()
                    del file
            else:
                file.close()


MAIN_GUARD_MESSAGE = (
    "build_superpixels ran while a worker process was importing the main script: worker processes "
    "re-run a script's top-level code as they start, so a script that calls build_superpixels with "
    "workers > 1 must make that call under `if __name__ == \"__main__\":` (or use workers=1)"
)


def _importing_main_in_worker() -> bool:
    """True while a forkserver/spawn child runs the parent's main script (as `__mp_main__`) to start."""
    return any(frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__mp_main__"
               for frame, _ in traceback.walk_stack(None))


def _compute_one(image_id: str, path: Path, n_segments: int, compactness: float, n_clusters: int, seed: int,
                 backend: str) -> np.ndarray:
    return region_map(read_image(path), n_segments, compactness, n_clusters, seed, backend)


def _compute_chunk(items: list[tuple[str, Path]], *args) -> list[tuple[str, np.ndarray]]:
    return [(i, _compute_one(i, p, *args)) for i, p in items]


def build_superpixels(images: list[tuple[str, Path]], out_path: Path, params: SuperpixelParams, *, progress: bool = True) -> None:
    """Compute the region map of every image and write them to one HDF5 file at `out_path`.

    images: (image id, image file) pairs; the file holds exactly these ids.
    Work runs over `params.workers` processes (1 = in this process).

    Resume: finished maps go to the checkpoint `{out_path}.partial.h5` as they
    arrive. A later call with the same parameters (all file attributes equal)
    keeps the maps it holds and computes only the other ids; with other
    parameters, or an unreadable checkpoint, it starts over. At the end the
    checkpoint is copied, in `images` order, into a temporary file that is
    renamed onto `out_path`, and the checkpoint is deleted. (A copy rather
    than a rename: HDF5 never gives back the space of deleted datasets, and
    the product must hold exactly the requested ids.)

    Call it from a script under `if __name__ == "__main__":` when workers > 1: each worker
    process re-runs the script's top-level code as it starts (Python's forkserver and spawn
    start methods), and a worker that reaches this call raises MAIN_GUARD_MESSAGE.

    Errors: an unreadable image raises DatasetError naming its file. No file is
    ever left under `out_path` or its temporary name; the checkpoint is kept
    when it holds finished maps (so the rerun after fixing the image resumes)
    and deleted when it holds none.
    """
    if _importing_main_in_worker():
        raise RuntimeError(MAIN_GUARD_MESSAGE)
    out_path = Path(out_path)
    _check_backend(params.backend)
    if not 1 <= params.n_clusters <= MAX_CLUSTERS:
        raise ValueError(f"superpixels.n_clusters must be in [1, {MAX_CLUSTERS}] (uint8 maps), got {params.n_clusters}")
    images = [(str(i), Path(p)) for i, p in images]
    keys = [region_key(i) for i, _ in images]
    if len(set(keys)) != len(keys):
        dup = next(i for i, _ in images if keys.count(region_key(i)) > 1)
        raise ValueError(f"image id {dup!r} is listed more than once")

    attrs = _checkpoint_attrs(params)
    logger.info("%s SLIC %s, %d images", params.backend, attrs["backend_version"], len(images))
    ckpt_path = partial_path(out_path)
    ckpt = _Checkpoint(ckpt_path, attrs)
    todo = [(i, p) for i, p in images if i not in ckpt.done]
    bar = progress_bar(total=len(images), initial=len(images) - len(todo), desc="superpixels", unit="img", progress=progress)
    args = (params.n_segments, params.compactness, params.n_clusters, params.seed, params.backend)
    try:
        if params.workers <= 1 or len(todo) <= 1:
            for n, (image_id, path) in enumerate(todo, 1):
                ckpt.add(image_id, _compute_one(image_id, path, *args))
                bar.update(1)
                if n % _COMMIT_EVERY == 0:
                    ckpt.commit()
        else:
            _run_pool(todo, args, params.workers, params.backend, ckpt, bar)
        ckpt.commit()
    except BaseException:
        # keep what was finished before the error or interrupt, for the resume
        try:
            ckpt.commit()
        finally:
            empty = not ckpt.done or ckpt.broken
            ckpt.close()
            bar.close()
            if empty:
                ckpt_path.unlink(missing_ok=True)
        raise
    bar.close()

    try:
        with atomic_path(out_path) as tmp:
            with _writing(out_path, f"free disk space and rerun `ssr superpixels` (it resumes from {ckpt_path.name}, "
                                    f"which holds every map)"), h5py.File(tmp, "w") as dst:
                dst.attrs.update(_attrs(params))
                for key in keys:
                    ckpt.file.copy(ckpt.file[key], dst, name=key)
                    del dst[key].attrs[_DONE_ATTR]
    finally:
        ckpt.close()
    ckpt_path.unlink()


def _init_worker(backend: str) -> None:
    if backend == "opencv":
        import cv2

        # one process per core already; OpenCV's own threads would only contend
        cv2.setNumThreads(1)


def _run_pool(todo, args, workers: int, backend: str, ckpt: _Checkpoint, bar) -> None:
    size = max(1, min(_CHUNK, -(-len(todo) // workers)))  # small runs still use every worker
    chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
    # forkserver: workers start clean instead of inheriting the parent's open
    # HDF5 checkpoint and any torch threads
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                                initializer=_init_worker, initargs=(backend,)) as pool:
        futures = [pool.submit(_compute_chunk, chunk, *args) for chunk in chunks]
        try:
            for future in concurrent.futures.as_completed(futures):
                results = future.result()
                for image_id, regions in results:
                    ckpt.add(image_id, regions)
                ckpt.commit()
                bar.update(len(results))
        except concurrent.futures.process.BrokenProcessPool as err:
            raise RuntimeError(
                "superpixels: a worker process exited before returning its maps (its own error, if any, "
                "is printed above). If the call comes from a script: worker processes re-run the script's "
                "top-level code as they start, so call build_superpixels under `if __name__ == \"__main__\":` "
                "(or use workers=1). Otherwise the worker was killed, e.g. out of memory.") from err
        finally:
            for future in futures:
                future.cancel()


# --- reading -----------------------------------------------------------------

def check_region_maps(path: str | os.PathLike, params: SuperpixelParams, ids: list[str]) -> None:
    """Refuse a superpixels file that cannot serve `ids` under `params`.

    DatasetError naming the file when it is missing or unreadable, was built with other
    `superpixels.*` params than `params` (its attributes record them; `workers` and the
    library version are not compared) or lacks a map of one of `ids`.
    """
    rerun = "rerun `ssr superpixels`"
    with RegionMaps(path) as maps:
        recorded = maps.params
        expected = {f"superpixels.{k}": v for k, v in _attrs(params).items() if k != "method"}
        expected["method"] = METHOD
        differing = [f"{key} (file {recorded.get(key.removeprefix('superpixels.'), 'absent')!r}, params {value!r})"
                     for key, value in expected.items() if recorded.get(key.removeprefix("superpixels.")) != value]
        if differing:
            raise DatasetError(f"{maps.path}: built with other params than the current ones: {'; '.join(differing)}; {rerun} "
                               f"(Snakemake and DVC do when these params change)")
        stored = set(maps._open().keys())
        missing = [i for i in ids if region_key(i) not in stored]
        if missing:
            more = f" and {len(missing) - 1} more images of the split" if len(missing) > 1 else ""
            raise DatasetError(f"{maps.path}: no region map for {missing[0]!r}{more}; it was built for other images: {rerun}")
