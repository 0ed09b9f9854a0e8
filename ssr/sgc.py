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
    onehot = F.one_hot(region_map.long().clamp(max=num_regions - 1), num_regions).permute(0, 3, 1, 2).float()
    return onehot * valid[:, None]


def region_onehot_compact(region_map: torch.Tensor, num_regions: int) -> torch.Tensor:
    """`region_onehot` by one comparison, from region ids of any integer type (uint8 as loaded):
    no int64 one-hot, no permuted copy. Same values."""
    ids = torch.arange(num_regions, device=region_map.device, dtype=region_map.dtype)
    return (region_map[:, None] == ids[:, None, None]).float()


# Pixels per partial product in `region_sums`: the K of each small GEMM.
SPLIT_K = 4096


def region_sums(values: torch.Tensor, regions: torch.Tensor, chunk: int = SPLIT_K) -> torch.Tensor:
    """sum over pixels of values times region membership: (B, M, H, W), (B, R, H, W) -> (B, M, R).

    As a batched product it has a tiny M and N (class slots, regions) and a huge K (pixels),
    a shape GPU matrix libraries run on few cores; split K into chunks of `chunk` pixels, one
    small product each, and sum the partial results. Same sums as the einsum up to rounding.
    """
    b, m = values.shape[:2]
    r = regions.shape[1]
    pixels = values.shape[-2] * values.shape[-1]
    pad = -pixels % chunk
    v = F.pad(values.reshape(b, m, pixels), (0, pad)).view(b, m, -1, chunk).transpose(1, 2)     # (B, P, M, chunk)
    o = F.pad(regions.reshape(b, r, pixels), (0, pad)).view(b, r, -1, chunk).transpose(1, 2)    # (B, P, R, chunk)
    return (v @ o.transpose(-1, -2)).sum(dim=1)


DENOMINATORS = ("region", "image")


def target_regions(cam: torch.Tensor, regions: torch.Tensor, t_hi: float, rho: float, keep_best: bool = True,
                   denominator: str = "region", *, fast: bool = False) -> torch.Tensor:
    """Which regions are targets for each class slot (Eq. 8).

    cam (B, S, H, W) in [0, 1] at region-map resolution, regions (B, R, H, W) one-hot
    -> (B, S, R) bool: sum_{p in r, cam > t_hi} cam / total > rho, where "the total
    activation" (the paper leaves it open) is the region's own, sum_{p in r} cam
    (denominator "region"), or the whole image's, sum_p cam ("image").
    With `keep_best`, a class with no region over rho keeps its highest-ratio region,
    so a present class is never masked out entirely. `fast`: the region sums by `region_sums`.
    """
    if denominator not in DENOMINATORS:
        raise ValueError(f"unknown SGC denominator {denominator!r}; expected one of {DENOMINATORS}")
    confident_cam = cam * (cam > t_hi)
    by_region = denominator == "region"
    if fast:
        sums = region_sums(torch.cat([confident_cam, cam], dim=1) if by_region else confident_cam, regions)
        confident, total = sums.chunk(2, dim=1) if by_region else (sums, None)
    else:
        confident = torch.einsum("bshw,brhw->bsr", confident_cam, regions)
        total = torch.einsum("bshw,brhw->bsr", cam, regions) if by_region else None
    if total is None:
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
             patch_area: float, keep_best: bool = True, denominator: str = "region", fast: bool = False) -> torch.Tensor:
    """CAM (B, S, N) on the patch grid + region map (B, H, W) -> column masks (B, S, N).

    The image total of the "image" denominator counts only pixels with a region (padding excluded).
    `fast`: the compact one-hot and split-K region sums; the same masks up to rounding of the sums.
    """
    regions = region_onehot_compact(region_map, num_regions) if fast else region_onehot(region_map, num_regions)
    targets = region_targets(cam, regions, grid, t_hi=t_hi, rho=rho, keep_best=keep_best, denominator=denominator, fast=fast)
    return column_mask(targets, patch_region_share(regions, grid), patch_area)


def region_targets(cam: torch.Tensor, regions: torch.Tensor, grid: tuple[int, int], *, t_hi: float, rho: float,
                   keep_best: bool = True, denominator: str = "region", fast: bool = False) -> torch.Tensor:
    """CAM (B, S, N) on the patch grid + one-hot regions (B, R, H, W) -> (B, S, R) bool targets (Eq. 8):
    the CAM upsampled bilinearly to the regions' size and clamped to [0, 1], then `target_regions`."""
    cam_full = F.interpolate(cam.reshape(cam.shape[0], cam.shape[1], *grid), size=regions.shape[-2:], mode="bilinear",
                             align_corners=False)
    return target_regions(cam_full.clamp(0, 1), regions, t_hi, rho, keep_best, denominator, fast=fast)
