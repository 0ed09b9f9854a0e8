"""Patch affinities and CAM propagation (paper Eq. 9-11)."""

from __future__ import annotations

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
    """CLIP-ES / WeCLIP attention -> affinity transform: (B, N, N) -> (B, N, N) row-stochastic.

    Alternate column and row normalisation (`rounds` times), symmetrise, then take the
    `power`-th matrix power (a random walk of that many steps).
    """
    for _ in range(rounds):
        a = a / (a.sum(dim=-2, keepdim=True) + 1e-8)
        a = row_normalise(a)
    a = (a + a.transpose(-1, -2)) / 2
    a = torch.linalg.matrix_power(a, power) if power > 1 else a
    return row_normalise(a)


def fuse_attention(clip_attention: torch.Tensor | None, dino_attention: torch.Tensor | None, clip_weight: float,
                   dino_weight: float, *, order: str = "transform_then_fuse", rounds: int = 3, power: int = 2) -> torch.Tensor:
    """The affinity A of Eq. 9 from CLIP's averaged attention and DINO's last-block attention.

    clip_attention, dino_attention: (B, N, N) raw patch attentions (either may be None, an
    ablation row; then the other is used alone). The paper fuses them 0.4:0.6 and leaves open
    where the CLIP-ES transform goes:
    - "transform_then_fuse": row_normalise(w_c T(A_CLIP) + w_d row_normalise(A_DINO));
    - "fuse_then_transform": T(w_c row_normalise(A_CLIP) + w_d row_normalise(A_DINO)).
    A single source is used alone: T(A_CLIP) under either order (the "+ CLIP attention" row);
    DINO alone is row-normalised (first order) or transformed (second). -> (B, N, N) row-stochastic.
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
        return present[0][1] if len(present) == 1 else row_normalise(sum(w * a for w, a in present))
    present = [(w, a) for w, a in ((clip_weight, clip_attention), (dino_weight, dino_attention)) if a is not None]
    return transform(present[0][1] if len(present) == 1 else sum(w * row_normalise(a) for w, a in present))


def propagate(affinity: torch.Tensor, cam: torch.Tensor, column_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CAM_refine_c = (A ⊙ M_c) · vec(CAM_c), min-max normalised (Eq. 10-11).

    affinity (B, N, N), cam (B, S, N), column_mask (B, S, N) in {0, 1} or None.
    A column mask scales column j of A for every row, so (A ⊙ M_c) v = A (M_c ⊙ v):
    masking the CAM vector is exact and avoids a (B, S, N, N) tensor.
    """
    source = cam if column_mask is None else cam * column_mask
    refined = torch.einsum("bij,bsj->bsi", affinity.float(), source.float())
    return minmax_normalise(refined)
