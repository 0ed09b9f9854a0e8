"""Patch affinities, CAM propagation (paper Eq. 9-11) and CLIP-ES's box mask."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from ssr.cam import minmax_normalise

FUSION_ORDERS = ("transform_then_fuse", "fuse_then_transform")


def row_normalise(a: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(..., N, N) -> rows summing to 1."""
    return a / (a.sum(dim=-1, keepdim=True) + eps)


def average_attention(attentions: list[torch.Tensor], num_prefix: int = 1) -> torch.Tensor:
    """Mean of head-averaged block attentions, patch rows and columns only.

    attentions: list of (B, T, T) with `num_prefix` leading non-patch tokens -> (B, N, N) float.
    """
    return torch.stack([w.float() for w in attentions]).mean(dim=0)[:, num_prefix:, num_prefix:]


def clip_es_transform(a: torch.Tensor, *, rounds: int = 3, power: int = 2) -> torch.Tensor:
    """CLIP-ES / WeCLIP attention -> affinity transform: (B, N, N) -> (B, N, N), symmetric, non-negative.

    Alternate column and row normalisation (`rounds` times), symmetrise, then take the
    `power`-th matrix power (a random walk of that many steps). Nothing follows the power, as
    in the reference code: where the rounds have not made the matrix doubly stochastic, its
    rows sum to slightly more or less than 1, and a final normalisation would move the
    propagated CAM.
    """
    for _ in range(rounds):
        a = a / (a.sum(dim=-2, keepdim=True) + 1e-8)
        a = row_normalise(a)
    a = (a + a.transpose(-1, -2)) / 2
    return torch.linalg.matrix_power(a, power) if power > 1 else a


def fuse_attention(clip_attention: torch.Tensor | None, dino_attention: torch.Tensor | None, clip_weight: float,
                   dino_weight: float, *, order: str = "transform_then_fuse", rounds: int = 3, power: int = 2) -> torch.Tensor:
    """The affinity A of Eq. 9 from CLIP's averaged attention and DINO's last-block attention.

    clip_attention, dino_attention: (B, N, N) raw patch attentions (either may be None, an
    ablation row; then the other is used alone). The paper fuses them 0.4:0.6 and leaves open
    where the CLIP-ES transform T goes; the fusion mixes row-normalised matrices, so that the
    weights are the sources' shares of every row:
    - "transform_then_fuse": w_c row_normalise(T(A_CLIP)) + w_d row_normalise(A_DINO);
    - "fuse_then_transform": T(w_c row_normalise(A_CLIP) + w_d row_normalise(A_DINO)).
    (w_c, w_d are normalised to sum to 1.) A single source is used alone: T(A_CLIP) under either
    order (the "+ CLIP attention" row, CLIP-ES's matrix); DINO alone is row-normalised (first
    order) or transformed (second). -> (B, N, N).
    """
    if order not in FUSION_ORDERS:
        raise ValueError(f"unknown fusion order {order!r}; expected one of {FUSION_ORDERS}")
    if clip_attention is None and dino_attention is None:
        raise ValueError("at least one of the CLIP and DINO attentions is needed")

    def transform(a):
        return clip_es_transform(a, rounds=rounds, power=power)

    if order == "transform_then_fuse":
        parts = [(clip_weight, transform(clip_attention) if clip_attention is not None else None),
                 (dino_weight, row_normalise(dino_attention) if dino_attention is not None else None)]
        present = [(w, a) for w, a in parts if a is not None]
        if len(present) == 1:
            return present[0][1]
        return sum(w / (clip_weight + dino_weight) * row_normalise(a) for w, a in present)
    present = [(w, a) for w, a in ((clip_weight, clip_attention), (dino_weight, dino_attention)) if a is not None]
    if len(present) == 1:
        return transform(present[0][1])
    return transform(sum(w / (clip_weight + dino_weight) * row_normalise(a) for w, a in present))


def propagate(affinity: torch.Tensor, cam: torch.Tensor, column_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CAM_refine_c = (A ⊙ M_c) · vec(CAM_c), min-max normalised (Eq. 10-11).

    affinity (B, N, N), cam (B, S, N), column_mask (B, S, N) in {0, 1} or None.
    A column mask scales column j of A for every row, so (A ⊙ M_c) v = A (M_c ⊙ v):
    masking the CAM vector is exact and avoids a (B, S, N, N) tensor.
    """
    source = cam if column_mask is None else cam * column_mask
    refined = torch.einsum("bij,bsj->bsi", affinity.float(), source.float())
    return minmax_normalise(refined)


def box_mask(cam: torch.Tensor, grid: tuple[int, int], threshold: float) -> torch.Tensor:
    """CLIP-ES's propagation mask: the columns inside the boxes around the CAM's confident regions.

    cam (B, S, N) in [0, 1] on the patch grid (h, w) -> (B, S, N) float in {0, 1}. Per map, as
    CLIP-ES's `scoremap2bbox` with `multi_contour_eval` (threshold 0.4 on VOC, 0.7 on COCO):
    the map in 8 bits is thresholded at `threshold` times its maximum (strictly above), every
    contour OpenCV finds gets its bounding box, and the box's end is clipped to the last
    row / column index and used as an exclusive bound, so a box that reaches the grid's edge
    leaves that last row / column out, as the reference's masks do. A map without any contour
    (all zero) gets an empty mask.
    """
    b, s, n = cam.shape
    h, w = grid
    maps = (cam.detach().float().nan_to_num(0.0).reshape(b * s, h, w).cpu().numpy() * 255).astype(np.uint8)
    out = np.zeros((b * s, h, w), np.float32)
    for k, scoremap in enumerate(maps):
        _, binary = cv2.threshold(scoremap, int(threshold * scoremap.max()), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        for contour in contours:
            x, y, bw, bh = cv2.boundingRect(contour)
            out[k, y:min(y + bh, h - 1), x:min(x + bw, w - 1)] = 1
    return torch.from_numpy(out).reshape(b, s, n).to(cam.device)
