"""Pixel-adaptive refinement (PAR) of label scores, as WeCLIP refines its online pseudo-labels.

PAR (Ru et al., CVPR 2022, "Learning Affinity from Attention") propagates per-pixel scores
among dilated 8-neighbourhoods, weighting each neighbour by its colour similarity, measured
against the spread of colours in that neighbourhood, plus a small term for its distance.

The neighbours are visited one shift at a time and accumulated, so memory stays at a few
copies of the input instead of one per neighbour (48 with WeCLIP's dilations). This is the
reference; `ssr.par_triton` computes the same with two Triton kernels, which `par_refine` uses
on CUDA tensors when Triton is importable (backend "auto").
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

# par_refine's implementations: "torch" (this module), "triton" (ssr.par_triton), "auto" (Triton when it is importable
# and the tensors are on CUDA, or TRITON_INTERPRET=1 asks for Triton's CPU interpreter; torch otherwise).
BACKENDS = ("auto", "torch", "triton")

# The 8 neighbours of a pixel at unit dilation, (dy, dx).
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def shifted(x: torch.Tensor, dilations: list[int]) -> Iterator[torch.Tensor]:
    """(B, C, H, W) -> each neighbour's view, (B, C, H, W), edges replicated: dilation-major, OFFSETS order."""
    h, w = x.shape[-2:]
    for d in dilations:
        padded = F.pad(x, [d, d, d, d], mode="replicate")
        for dy, dx in OFFSETS:
            yield padded[..., d + dy * d: d + dy * d + h, d + dx * d: d + dx * d + w]


def position_softmax(dilations: list[int], w_colour: float, device=None) -> torch.Tensor:
    """(K,) softmax over the neighbours of -(distance / std of the distances / w_colour)^2: PAR's position term."""
    distance = torch.tensor([d * (math.sqrt(2) if dy and dx else 1.0) for d in dilations for dy, dx in OFFSETS],
                            device=device)
    return (-((distance / distance.std()) / w_colour) ** 2).softmax(dim=0)


def par_affinity(image: torch.Tensor, dilations: list[int], w_colour: float = 0.3, w_position: float = 0.01) -> torch.Tensor:
    """Neighbour weights of every pixel: (B, 3, H, W) image -> (B, K, H, W), K = 8 * len(dilations).

    colour term: softmax over neighbours of -(|I_j - I_i| / std_j(I) / w_colour)^2, averaged
    over channels (std over the K neighbours, unbiased); position term: the same of the
    neighbours' distances, weighted w_position. Each pixel's weights sum to 1.
    """
    image = image.float()
    k = 8 * len(dilations)
    mean = sum(shifted(image, dilations)) / k
    spread = (sum((view - mean) ** 2 for view in shifted(image, dilations)) / (k - 1)).sqrt() + 1e-8
    colour = torch.stack([-(((view - image).abs() / spread / w_colour) ** 2).mean(dim=1) for view in shifted(image, dilations)],
                         dim=1)
    position = position_softmax(dilations, w_colour, image.device)
    # Normalised to sum to 1: WeCLIP's weights sum to 1 + w_position, which scales every score
    # alike (same argmax) but would drift the scores off their [0, 1] scale.
    return (colour.softmax(dim=1) + w_position * position[None, :, None, None]) / (1 + w_position)


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "triton" on a CUDA device (or any, under TRITON_INTERPRET=1) with Triton importable, else "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown PAR backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        wanted = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        return "triton" if wanted and importlib.util.find_spec("triton") is not None else "torch"
    return backend


def par_refine(image: torch.Tensor, scores: torch.Tensor, *, dilations: list[int], iterations: int,
               w_colour: float = 0.3, w_position: float = 0.01, backend: str = "auto",
               active: torch.Tensor | None = None) -> torch.Tensor:
    """Propagate label scores along image affinities.

    image (B, 3, H, W) in [0, 1]; scores (B, C, H, W) at the image's size -> refined (B, C, H, W).
    Every iteration replaces a pixel's scores by the affinity-weighted sum of its neighbours'.
    backend: see BACKENDS. active (B, C) bool or None: with the Triton kernels, channels not
    active are skipped and come out 0, exactly what refining an all-zero channel gives (the
    torch path refines every channel; callers pass zeros there).
    """
    if image.shape[-2:] != scores.shape[-2:]:
        raise ValueError(f"PAR: scores {tuple(scores.shape[-2:])} and image {tuple(image.shape[-2:])} differ in size")
    if resolve_backend(backend, scores.device) == "triton":
        from ssr.par_triton import par_refine_triton

        return par_refine_triton(image, scores, dilations=dilations, iterations=iterations, w_colour=w_colour,
                                 w_position=w_position, active=active)
    affinity = par_affinity(image, dilations, w_colour, w_position)
    scores = scores.float()
    for _ in range(iterations):
        refined = torch.zeros_like(scores)
        for k, view in enumerate(shifted(scores, dilations)):
            refined.addcmul_(view, affinity[:, k: k + 1])
        scores = refined
    return scores
