"""DenseCRF post-processing of per-pixel class probabilities (Krähenbühl & Koltun 2011).

Fully connected CRF with a Gaussian smoothness kernel and a bilateral
appearance kernel, solved by mean-field inference (pydensecrf2). The defaults
are the DeepLab / WeCLIP evaluation settings: 10 iterations, pos_xy_std 3,
pos_w 3, bi_xy_std 64, bi_rgb_std 5, bi_w 4.

DenseCRF costs seconds per image on one CPU core and grows with the class count, while the
network needs milliseconds on a GPU: `CrfPool` runs it in worker processes beside the
network, and `crf_size` caps the resolution it runs at (`infer.crf_max_side`). This module
imports neither torch nor ssr.config, so a worker starts in a fraction of a second.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pydensecrf.densecrf as dcrf

if TYPE_CHECKING:
    from ssr.config import InferParams

# Probabilities are clipped before the log so that a hard zero does not become
# an infinite unary that no pairwise evidence could ever overturn.
_PROB_FLOOR = 1e-5


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    *,
    iterations: int = 10,
    pos_xy_std: float = 3.0,
    pos_w: float = 3.0,
    bi_xy_std: float = 64.0,
    bi_rgb_std: float = 5.0,
    bi_w: float = 4.0,
) -> np.ndarray:
    """Refine class probabilities with a fully connected CRF.

    Args:
        image: (H, W, 3) uint8 RGB image the probabilities belong to.
        probs: (C, H, W) float per-pixel class probabilities (a softmax output).
        iterations: mean-field iterations.
        pos_xy_std, pos_w: spatial std (pixels) and weight of the Gaussian kernel.
        bi_xy_std, bi_rgb_std, bi_w: spatial std, colour std and weight of the
            bilateral kernel.

    Returns:
        (C, H, W) float32 refined probabilities (each pixel sums to 1).
    """
    image = np.asarray(image)
    probs = np.asarray(probs)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense_crf: image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"dense_crf: image must be uint8, got {image.dtype} (shape {image.shape})")
    if probs.ndim != 3:
        raise ValueError(f"dense_crf: probs must be (C, H, W), got shape {probs.shape}")
    if probs.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"dense_crf: probs spatial size {probs.shape[1:]} does not match image size "
            f"{image.shape[:2]} (probs {probs.shape}, image {image.shape})"
        )
    if probs.shape[0] < 1:
        raise ValueError(f"dense_crf: probs must have at least one class, got shape {probs.shape}")
    if iterations < 1:
        raise ValueError(f"dense_crf: iterations must be >= 1, got {iterations}")
    if not np.all(np.isfinite(probs)):
        raise ValueError(f"dense_crf: probs (shape {probs.shape}) contain NaN or inf")

    num_classes, height, width = probs.shape
    unary = -np.log(np.clip(probs.astype(np.float32), _PROB_FLOOR, 1.0))
    unary = np.ascontiguousarray(unary.reshape(num_classes, -1))

    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(unary)
    # pydensecrf takes the image as a writable buffer (though it only reads it): a read-only
    # array, such as np.asarray of a PIL image, is copied.
    rgb = np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])
    # A zero-weight kernel changes nothing but still costs a full lattice
    # filtering per iteration, so it is left out.
    if pos_w > 0:
        crf.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)
    if bi_w > 0:
        crf.addPairwiseBilateral(
            sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=rgb, compat=bi_w
        )
    q = np.array(crf.inference(iterations), dtype=np.float32)
    return q.reshape(num_classes, height, width)


@dataclass(frozen=True)
class CrfSettings:
    """The `infer.crf_*` params as plain numbers: what a worker process needs, without importing ssr.config."""
    iterations: int
    pos_xy_std: float
    pos_w: float
    bi_xy_std: float
    bi_rgb_std: float
    bi_w: float
    reference_size: int

    @classmethod
    def of(cls, params: InferParams | CrfSettings) -> CrfSettings:
        if isinstance(params, CrfSettings):
            return params
        return cls(params.crf_iterations, params.crf_pos_xy_std, params.crf_pos_w, params.crf_bi_xy_std,
                   params.crf_bi_rgb_std, params.crf_bi_w, params.crf_reference_size)


def dense_crf_from_params(image: np.ndarray, probs: np.ndarray, params: InferParams | CrfSettings) -> np.ndarray:
    """`dense_crf` with the `infer.crf_*` settings of params.yaml, kernels sized to the image.

    The reference spatial standard deviations are for images of about
    `crf_reference_size` px on the long side (VOC's 500); they scale with the image's
    long side, so a 64 px demo image gets kernels of the same relative extent.
    image (H, W, 3) uint8, probs (C, H, W) -> (C, H, W) float32.
    """
    crf = CrfSettings.of(params)
    scale = max(image.shape[:2]) / crf.reference_size if crf.reference_size else 1.0
    return dense_crf(image, probs, iterations=crf.iterations, pos_xy_std=crf.pos_xy_std * scale, pos_w=crf.pos_w,
                     bi_xy_std=crf.bi_xy_std * scale, bi_rgb_std=crf.bi_rgb_std, bi_w=crf.bi_w)


def crf_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The (h, w) DenseCRF runs at: the image's own size, or scaled down so its long side is `max_side` (0: never)."""
    if not max_side or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass
class CrfJob:
    """One image's DenseCRF: image (h, w, 3) uint8 and probs (C, h, w) float32 at the CRF size (`crf_size`);
    the result is brought to `size` (H, W), the image's own, by bilinear interpolation of its probabilities."""
    image: np.ndarray
    probs: np.ndarray
    size: tuple[int, int]
    keep_probs: bool = False


def run_crf_job(job: CrfJob, params: InferParams | CrfSettings) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (labels (H, W) uint8, probabilities (C, H, W) float32 if `job.keep_probs` else None)."""
    q = dense_crf_from_params(job.image, job.probs, params)
    if q.shape[1:] != tuple(job.size):
        import cv2

        height, width = job.size
        # cv2 resizes channels last, any number of them; per-pixel sums stay 1 (a convex combination)
        q = cv2.resize(np.ascontiguousarray(q.transpose(1, 2, 0)), (width, height), interpolation=cv2.INTER_LINEAR)
        q = np.ascontiguousarray(q.reshape(height, width, -1).transpose(2, 0, 1))
    return q.argmax(0).astype(np.uint8), (q if job.keep_probs else None)


def _worker_start(parent: int) -> None:
    # Ctrl-C reaches the whole process group: the parent stops the pool, the workers must not
    # print tracebacks of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A parent that dies (SIGKILL, out of memory) must take its workers along: they hold both ends
    # of their job queue and would wait on it forever. The kernel signals a worker once its parent
    # is gone; a parent that died while the worker was still starting is seen here.
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


class CrfPool:
    """DenseCRF over a stream of images in `workers` processes (0: in this one), results in stream order.

    Use as a context manager; `map` may be called many times (one pool for a stage's models).
    The processes start with the first job, by spawning: safe beside CUDA and torch's threads.
    """

    def __init__(self, workers: int):
        if workers < 0:
            raise ValueError(f"DenseCRF workers: must be >= 0, got {workers}")
        self.workers = workers
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> CrfPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, wait: bool = True) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=True)
            self._executor = None

    def __del__(self):
        # a pool dropped on an error path: stop its workers without waiting for their jobs
        self.close(wait=False)

    def _submit(self, job: CrfJob, params: CrfSettings):
        if self._executor is None:
            from ssr.superpixels import _importing_main_in_worker

            if _importing_main_in_worker():
                raise RuntimeError("DenseCRF workers were asked for while a worker process was importing the main "
                                   "script: worker processes re-run a script's top-level code as they start, so a "
                                   "script using DenseCRF workers must run under `if __name__ == \"__main__\":` "
                                   "(or use 0 workers)")
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
                initargs=(os.getpid(),))
        return self._executor.submit(run_crf_job, job, params)

    def map(self, items: Iterable[tuple[object, CrfJob | None]],
            params: InferParams | CrfSettings) -> Iterator[tuple[object, tuple | None]]:
        """(payload, job or None) -> (payload, `run_crf_job`'s result or None), in the order of `items`.

        `items` is drawn lazily, at most 2 x workers ahead of the oldest unfinished job, so
        that the network computes the next images while the workers refine the earlier
        ones, and no more than that many images' probabilities are held at once.
        """
        params = CrfSettings.of(params)
        if self.workers == 0:
            for payload, job in items:
                yield payload, None if job is None else run_crf_job(job, params)
            return
        pending: collections.deque = collections.deque()

        def result(future):
            if future is None:
                return None
            try:
                return future.result()
            except concurrent.futures.process.BrokenProcessPool as err:
                self._executor = None
                raise RuntimeError(f"a DenseCRF worker process died ({err}): killed, e.g. out of memory (rerun with "
                                   f"fewer workers or a smaller crf_max_side), or, from a script, it re-ran the "
                                   f"script's top-level code (guard it with `if __name__ == \"__main__\":`)") from err

        for payload, job in items:
            pending.append((payload, None if job is None else self._submit(job, params)))
            while pending and (len(pending) > 2 * self.workers or pending[0][1] is None or pending[0][1].done()):
                payload, future = pending.popleft()
                yield payload, result(future)
        while pending:
            payload, future = pending.popleft()
            yield payload, result(future)
