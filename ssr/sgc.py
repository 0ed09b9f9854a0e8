"""Superpixel-Guided Correction: target regions and column masks (paper Eq. 7-8).

The region map C (SLIC superpixels grouped by colour k-means, computed offline
by `ssr.superpixels`) splits the image into a few colour-coherent regions. A
region is a *target* of class c when most of its activation is confident; the
column mask then stops patches outside every target region from propagating
activation through the affinity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def region_onehot(region_map: torch.Tensor, num_regions: int) -> torch.Tensor:
    """(B, H, W) long region ids -> (B, R, H, W) float one-hot (ids >= R are dropped)."""
    valid = region_map < num_regions
    onehot = F.one_hot(region_map.clamp(max=num_regions - 1), num_regions).permute(0, 3, 1, 2).float()
    return onehot * valid[:, None]


DENOMINATORS = ("region", "image")


def target_regions(cam: torch.Tensor, regions: torch.Tensor, t_hi: float, rho: float, keep_best: bool = True,
                   denominator: str = "region") -> torch.Tensor:
    """Which regions are targets for each class slot (Eq. 8).

    cam (B, S, H, W) in [0, 1] at region-map resolution, regions (B, R, H, W) one-hot
    -> (B, S, R) bool: sum_{p in r, cam > t_hi} cam / total > rho, where "the total
    activation" (the paper leaves it open) is the region's own, sum_{p in r} cam
    (denominator "region"), or the whole image's, sum_p cam ("image").
    With `keep_best`, a class with no region over rho keeps its highest-ratio region,
    so a present class is never masked out entirely.
    """
    if denominator not in DENOMINATORS:
        raise ValueError(f"unknown SGC denominator {denominator!r}; expected one of {DENOMINATORS}")
    confident = torch.einsum("bshw,brhw->bsr", cam * (cam > t_hi), regions)
    if denominator == "region":
        total = torch.einsum("bshw,brhw->bsr", cam, regions)
    else:
        total = (cam * regions.sum(dim=1, keepdim=True)).sum(dim=(-2, -1))[..., None]
    ratio = confident / total.clamp_min(1e-8)
    targets = ratio > rho
    if keep_best:
        best = torch.zeros_like(targets).scatter_(-1, ratio.argmax(dim=-1, keepdim=True), True) & (confident > 0)
        targets |= best & ~targets.any(dim=-1, keepdim=True)
    return targets


def patch_region_share(regions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Share of each patch's area lying in each region: (B, R, H, W) -> (B, R, h * w)."""
    share = F.adaptive_avg_pool2d(regions, grid)
    return share.flatten(2)


def column_mask(targets: torch.Tensor, share: torch.Tensor, patch_area: float) -> torch.Tensor:
    """M_c over patches (Eq. 7): 1 where more than `patch_area` of a patch lies in target regions of c.

    targets (B, S, R) bool, share (B, R, N) -> (B, S, N) float in {0, 1}.
    """
    covered = torch.einsum("bsr,brn->bsn", targets.float(), share)
    return (covered > patch_area).float()


def sgc_mask(cam: torch.Tensor, region_map: torch.Tensor, num_regions: int, grid: tuple[int, int], *, t_hi: float, rho: float,
             patch_area: float, keep_best: bool = True, denominator: str = "region") -> torch.Tensor:
    """CAM (B, S, N) on the patch grid + region map (B, H, W) -> column masks (B, S, N).

    The image total of the "image" denominator counts only pixels with a region (padding excluded).
    """
    regions = region_onehot(region_map, num_regions)
    cam_full = F.interpolate(cam.reshape(cam.shape[0], cam.shape[1], *grid), size=region_map.shape[-2:], mode="bilinear",
                             align_corners=False)
    targets = target_regions(cam_full.clamp(0, 1), regions, t_hi, rho, keep_best, denominator)
    return column_mask(targets, patch_region_share(regions, grid), patch_area)
