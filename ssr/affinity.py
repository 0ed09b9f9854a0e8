"""Patch affinities and CAM propagation (paper Eq. 9-11, DESIGN 4.3 steps 4-5)."""

from __future__ import annotations

import torch

from ssr.cam import minmax_normalise


def row_normalise(a: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(..., N, N) -> rows summing to 1."""
    return a / (a.sum(dim=-1, keepdim=True) + eps)


def clip_affinity(attentions: list[torch.Tensor], *, rounds: int = 3, power: int = 2, num_prefix: int = 1) -> torch.Tensor:
    """CLIP attention -> patch affinity (WeCLIP / CLIP-ES transform).

    attentions: list of (B, T, T) head-averaged block attentions with `num_prefix`
    leading non-patch tokens -> (B, N, N) row-stochastic affinity:
    average, drop the CLS row/column, alternate column/row normalisation,
    symmetrise, then take the `power`-th matrix power (a random walk).
    """
    a = torch.stack([w.float() for w in attentions]).mean(dim=0)[:, num_prefix:, num_prefix:]
    for _ in range(rounds):
        a = a / (a.sum(dim=-2, keepdim=True) + 1e-8)
        a = row_normalise(a)
    a = (a + a.transpose(-1, -2)) / 2
    a = torch.linalg.matrix_power(a, power) if power > 1 else a
    return row_normalise(a)


def fuse_affinities(a_clip: torch.Tensor | None, a_dino: torch.Tensor | None, clip_weight: float, dino_weight: float) -> torch.Tensor:
    """A = normalise(w_clip * A_CLIP + w_dino * A_DINO) over row-normalised inputs (Eq. 9).

    Either input may be None (an ablation row), then the other is used alone.
    """
    parts = [(w, row_normalise(a)) for w, a in ((clip_weight, a_clip), (dino_weight, a_dino)) if a is not None]
    if not parts:
        raise ValueError("at least one of the CLIP and DINO affinities is needed")
    if len(parts) == 1:
        return parts[0][1]
    return row_normalise(sum(w * a for w, a in parts))


def propagate(affinity: torch.Tensor, cam: torch.Tensor, column_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CAM_refine_c = (A ⊙ M_c) · vec(CAM_c), min-max normalised (Eq. 10-11).

    affinity (B, N, N), cam (B, S, N), column_mask (B, S, N) in {0, 1} or None.
    A column mask scales column j of A for every row, so (A ⊙ M_c) v = A (M_c ⊙ v):
    masking the CAM vector is exact and avoids a (B, S, N, N) tensor.
    """
    source = cam if column_mask is None else cam * column_mask
    refined = torch.einsum("bij,bsj->bsi", affinity.float(), source.float())
    return minmax_normalise(refined)
