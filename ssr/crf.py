"""DenseCRF post-processing of per-pixel class probabilities (Krähenbühl & Koltun 2011).

Fully connected CRF with a Gaussian smoothness kernel and a bilateral
appearance kernel, solved by mean-field inference (pydensecrf2). The defaults
are the DeepLab / WeCLIP evaluation settings: 10 iterations, pos_xy_std 3,
pos_w 3, bi_xy_std 64, bi_rgb_std 5, bi_w 4.
"""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf

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
    # A zero-weight kernel changes nothing but still costs a full lattice
    # filtering per iteration, so it is left out.
    if pos_w > 0:
        crf.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)
    if bi_w > 0:
        crf.addPairwiseBilateral(
            sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=np.ascontiguousarray(image), compat=bi_w
        )
    q = np.array(crf.inference(iterations), dtype=np.float32)
    return q.reshape(num_classes, height, width)
