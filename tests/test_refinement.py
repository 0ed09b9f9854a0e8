"""Per-equation tests of the refinement path (SGC and CMPA, paper Eq. 1-11) on hand-made tensors.

Every expected value is computed independently in the test (explicit loops,
the documented formula written out), never copied from the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssr.affinity import average_attention, box_mask, clip_es_transform, fuse_attention, propagate, row_normalise
from ssr.cmpa import (
    ProjectionHead,
    Prototypes,
    ResidualHead,
    SampleMemory,
    Temperature,
    image_prototypes,
    masked_average_pool,
    positive_index,
    prototype_loss_term,
    relabel_clusters,
    sample_loss_sum,
    spherical_kmeans,
)
from ssr.sgc import column_mask, patch_region_share, region_onehot, sgc_mask, target_regions


def _minmax(v: torch.Tensor) -> torch.Tensor:
    return (v - v.min()) / (v.max() - v.min())


# Refined CAMs are min-max normalised with a small epsilon in the denominator; over a
# value range of ~0.04 that shifts results by a few 1e-4, far below any structural error.
TOL = 1e-3


def _random_affinity(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return row_normalise(torch.rand(batch, n, n, generator=g) + 0.05)


# ---------------------------------------------------------------- propagation (Eq. 10-11)

def test_masked_column_contributes_nothing():
    n = 9
    affinity = _random_affinity(n)
    cam = torch.rand(1, 2, n, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 2, n)
    mask[0, 0, 4] = 0                       # class 0: patch 4 may not propagate
    base = propagate(affinity, cam, mask)

    changed = cam.clone()
    changed[0, 0, 4] += 5.0                 # masked column: any value, no effect
    assert torch.equal(propagate(affinity, changed, mask), base)

    changed = cam.clone()
    changed[0, 0, 2] += 5.0                 # unmasked column: the output moves
    assert not torch.allclose(propagate(affinity, changed, mask)[0, 0], base[0, 0], atol=1e-3)

    changed = cam.clone()
    changed[0, 1, 4] += 5.0                 # the mask is per class: class 1 still propagates patch 4
    assert not torch.allclose(propagate(affinity, changed, mask)[0, 1], base[0, 1], atol=1e-3)


def test_identity_affinity_leaves_cam_unchanged():
    cam = torch.tensor([[[0.0, 0.2, 1.0, 0.7, 0.4], [1.0, 0.0, 0.5, 0.25, 0.75]]])
    out = propagate(torch.eye(5)[None], cam)
    assert torch.allclose(out, cam, atol=1e-4)


def test_propagation_matches_explicit_loop():
    b, s, n = 2, 3, 6
    g = torch.Generator().manual_seed(3)
    affinity = _random_affinity(n, seed=4, batch=b)
    cam = torch.rand(b, s, n, generator=g)
    mask = (torch.rand(b, s, n, generator=g) > 0.4).float()
    mask[..., 0] = 1                        # keep every row non-constant
    out = propagate(affinity, cam, mask)
    for bi in range(b):
        for si in range(s):
            # Eq. 10: A*_c = A ⊙ M_c, M_c masking columns; Eq. 11: A*_c · vec(CAM_c).
            masked_a = affinity[bi].clone()
            for j in range(n):
                masked_a[:, j] *= mask[bi, si, j]
            refined = torch.tensor([sum(float(masked_a[i, j]) * float(cam[bi, si, j]) for j in range(n)) for i in range(n)])
            assert torch.allclose(out[bi, si], _minmax(refined), atol=TOL)
    # Without a mask, Eq. 11 with the plain affinity.
    unmasked = propagate(affinity, cam)
    for bi in range(b):
        for si in range(s):
            assert torch.allclose(unmasked[bi, si], _minmax(affinity[bi] @ cam[bi, si]), atol=TOL)


# ---------------------------------------------------------------- CLIP affinity (Eq. 9, W transform)

def _peaky_attentions(blocks: int, batch: int, tokens: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(batch, tokens, tokens, generator=g)).softmax(dim=-1) for _ in range(blocks)]


def _hand_clip_transform(attentions, rounds, power, num_prefix=1):
    """The documented W procedure, written out on one image: (T, T) list -> (N, N)."""
    a = sum(attentions) / len(attentions)
    a = a[num_prefix:, num_prefix:]
    for _ in range(rounds):
        a = a / a.sum(dim=0, keepdim=True)          # columns sum to 1
        a = a / a.sum(dim=1, keepdim=True)          # rows sum to 1
    a = (a + a.T) / 2
    out = a
    for _ in range(power - 1):
        out = out @ a
    return out


def clip_affinity(attentions, rounds: int = 3, power: int = 2):
    """The "+ CLIP attention" row's affinity, as the model composes it."""
    return clip_es_transform(average_attention(attentions), rounds=rounds, power=power)


@pytest.mark.parametrize("rounds,power", [(3, 2), (1, 1), (2, 3)])
def test_clip_affinity_equals_hand_computation(rounds, power):
    attentions = _peaky_attentions(blocks=3, batch=2, tokens=1 + 12, seed=rounds * 10 + power)
    out = clip_affinity(attentions, rounds=rounds, power=power)
    assert out.shape == (2, 12, 12)
    for b in range(2):
        hand = _hand_clip_transform([a[b].double() for a in attentions], rounds, power)
        assert torch.allclose(out[b].double(), hand, atol=1e-6)


def test_transform_ends_with_the_power_as_clip_es_does():
    """CLIP-ES's steps, on a matrix that three rounds leave far from doubly stochastic: the rows of the
    result do not sum to 1, and the transform returns them as they are (no normalisation after the power)."""
    g = torch.Generator().manual_seed(3)
    a = torch.rand(16, 16, generator=g) ** 8 * 50 + torch.eye(16) * 30       # peaky, uneven rows and columns
    t = a / a.sum(dim=0, keepdim=True)                                        # CLIP-ES: one column-row round ...
    t = t / t.sum(dim=1, keepdim=True)
    for _ in range(2):                                                        # ... then two more
        t = t / t.sum(dim=0, keepdim=True)
        t = t / t.sum(dim=1, keepdim=True)
    t = (t + t.T) / 2
    t = t @ t
    assert (t.sum(dim=1) - 1).abs().max() > 1e-3                              # the case this test is about
    out = clip_es_transform(a[None], rounds=3, power=2)[0]
    torch.testing.assert_close(out, t, atol=1e-6, rtol=1e-5)


def test_clip_affinity_drops_prefix_tokens():
    attentions = _peaky_attentions(blocks=2, batch=1, tokens=1 + 8, seed=5)
    perturbed = [a.clone() for a in attentions]
    for a in perturbed:                      # CLS row and column carry no patch affinity
        a[:, 0, :] = 7.0
        a[:, :, 0] = 7.0
    assert torch.allclose(clip_affinity(attentions), clip_affinity(perturbed), atol=1e-6)
    changed = [a.clone() for a in attentions]
    changed[0][:, 3, 4] += 1.0               # a patch-patch entry does matter
    assert not torch.allclose(clip_affinity(attentions), clip_affinity(changed), atol=1e-4)


def test_clip_affinity_symmetric_nonnegative():
    attentions = _peaky_attentions(blocks=4, batch=2, tokens=1 + 16, seed=7)
    for rounds in (3, 50):
        out = clip_affinity(attentions, rounds=rounds, power=2)
        assert (out >= 0).all()
        torch.testing.assert_close(out, out.transpose(-1, -2), atol=1e-6, rtol=1e-6)
    # Once the alternating normalisation has converged (doubly stochastic), rows sum to 1.
    out = clip_affinity(attentions, rounds=50, power=2)
    assert torch.allclose(out.sum(dim=-1), torch.ones(2, 16), atol=1e-5)


# ---------------------------------------------------------------- fusion (Eq. 9)

def test_transform_then_fuse_mixes_transformed_clip_with_row_normalised_dino():
    n = 7
    a = torch.rand(2, n, n, generator=torch.Generator().manual_seed(8)) + 0.1      # not row-normalised
    b = torch.rand(2, n, n, generator=torch.Generator().manual_seed(9)) * 3 + 0.1
    rb = b / b.sum(dim=-1, keepdim=True)
    transformed = clip_es_transform(a, rounds=3, power=2)
    fused = fuse_attention(a, b, 0.4, 0.6, order="transform_then_fuse")
    expected = 0.4 * row_normalise(transformed) + 0.6 * rb      # each source's share of every row
    assert torch.allclose(fused, expected, atol=1e-6)
    assert torch.allclose(fused.sum(-1), torch.ones(2, n), atol=1e-6)
    # The weights are relative: 2:3 is the same mix as 0.4:0.6.
    assert torch.allclose(fuse_attention(a, b, 2.0, 3.0), expected, atol=1e-6)
    # And they matter: swapping them gives a different matrix.
    assert not torch.allclose(fuse_attention(a, b, 0.6, 0.4), expected, atol=1e-3)


def test_fuse_then_transform_applies_the_transform_to_the_mix():
    n = 6
    a = torch.rand(1, n, n, generator=torch.Generator().manual_seed(18)) + 0.1
    b = torch.rand(1, n, n, generator=torch.Generator().manual_seed(19)) + 0.1
    ra, rb = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    out = fuse_attention(a, b, 0.4, 0.6, order="fuse_then_transform", rounds=2, power=3)
    hand = 0.4 * ra[0].double() + 0.6 * rb[0].double()
    for _ in range(2):
        hand = hand / hand.sum(dim=0, keepdim=True)
        hand = hand / hand.sum(dim=1, keepdim=True)
    hand = (hand + hand.T) / 2
    hand = hand @ hand @ hand
    assert torch.allclose(out[0].double(), hand, atol=1e-6)
    # The two readings of Eq. 9 differ as soon as both sources are present ...
    assert not torch.allclose(out, fuse_attention(a, b, 0.4, 0.6, order="transform_then_fuse", rounds=2, power=3), atol=1e-3)
    # ... and agree for CLIP alone (the "+ CLIP attention" row).
    assert torch.allclose(fuse_attention(a, None, 0.4, 0.6, order="fuse_then_transform"),
                          fuse_attention(a, None, 0.4, 0.6, order="transform_then_fuse"), atol=1e-6)


def test_fusion_single_source():
    a = torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(10)) + 0.1
    b = torch.rand(1, 5, 5, generator=torch.Generator().manual_seed(11)) + 0.1
    rb = b / b.sum(dim=-1, keepdim=True)
    # Missing DINO (ablation row / no DINO weights): transformed CLIP alone, whatever the weights.
    assert torch.allclose(fuse_attention(a, None, 0.4, 0.6), clip_es_transform(a), atol=1e-6)
    assert torch.allclose(fuse_attention(None, b, 0.4, 0.6), rb, atol=1e-6)
    with pytest.raises(ValueError):
        fuse_attention(None, None, 0.4, 0.6)
    with pytest.raises(ValueError, match="fusion order"):
        fuse_attention(a, b, 0.4, 0.6, order="fuse_twice")


# ---------------------------------------------------------------- CLIP-ES's box mask

def _boxes_by_hand(grid, boxes):
    """A (h, w) mask with 1 inside each (y0, x0, y1, x1) half-open box."""
    out = torch.zeros(grid)
    for y0, x0, y1, x1 in boxes:
        out[y0:y1, x0:x1] = 1
    return out


def test_box_mask_covers_the_boxes_of_the_confident_blobs_as_clip_es():
    h, w = 6, 8
    cam = torch.full((h, w), 0.1)
    cam[1:3, 1:3] = 1.0                            # blob A
    cam[4, 5:8] = 0.5                              # blob B, reaching the right edge
    cam[0, 5], cam[1, 6] = 0.9, 0.9                # two diagonal neighbours: one 8-connected blob C
    mask = box_mask(cam.reshape(1, 1, -1), (h, w), 0.4).reshape(h, w)
    # CLIP-ES clips a box's end to the last index and slices up to it: B loses the last column
    expected = _boxes_by_hand((h, w), [(1, 1, 3, 3), (4, 5, 5, 7), (0, 5, 2, 7)])
    assert torch.equal(mask, expected)
    # the threshold is a share of the maximum, strict: at 0.7 blob B (0.5) is no box
    mask = box_mask(cam.reshape(1, 1, -1), (h, w), 0.7).reshape(h, w)
    assert torch.equal(mask, _boxes_by_hand((h, w), [(1, 1, 3, 3), (0, 5, 2, 7)]))


def test_box_mask_is_per_slot_and_empty_for_a_zero_map():
    h, w = 4, 5
    cams = torch.zeros(2, 2, h * w)
    ell = torch.zeros(h, w)
    ell[0:3, 1] = 1.0
    ell[2, 1:4] = 1.0                              # an L: its box holds the patches the L leaves out
    cams[0, 1] = ell.flatten()
    cams[1, 0, 0] = 1.0                            # one patch in the corner
    mask = box_mask(cams, (h, w), 0.4)
    assert mask.shape == (2, 2, h * w)
    assert torch.equal(mask[0, 0], torch.zeros(h * w))                       # an all-zero map: no box
    assert torch.equal(mask[0, 1].reshape(h, w), _boxes_by_hand((h, w), [(0, 1, 3, 4)]))
    assert torch.equal(mask[1, 0].reshape(h, w), _boxes_by_hand((h, w), [(0, 0, 1, 1)]))
    # the mask keeps propagation inside the box: a column outside it contributes nothing
    affinity = torch.rand(2, h * w, h * w, generator=torch.Generator().manual_seed(2)) + 0.1
    base = propagate(affinity, cams, mask)
    changed = cams.clone()
    changed[0, 1, 0] = 0.7                         # patch (0, 0) lies outside the L's box
    assert torch.equal(propagate(affinity, changed, mask)[0, 1], base[0, 1])


# ---------------------------------------------------------------- SGC (Eq. 7-8)

def _two_region_case(values_r0, values_r1):
    """A 2x4 region map: left 2x2 block region 0, right 2x2 block region 1; CAM values row-major per block."""
    region_map = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    cam = torch.zeros(2, 4)
    cam[:, :2] = torch.tensor(values_r0, dtype=torch.float32).view(2, 2)
    cam[:, 2:] = torch.tensor(values_r1, dtype=torch.float32).view(2, 2)
    return cam[None, None], region_onehot(region_map[None], 2)


def _ratio(values, t_hi):
    return sum(v for v in values if v > t_hi) / sum(values)


def test_target_region_follows_rho():
    r0 = [0.9, 0.8, 0.3, 0.2]               # confident share 1.7 / 2.2
    r1 = [0.6, 0.3, 0.3, 0.3]               # confident share 0.6 / 1.5
    cam, regions = _two_region_case(r0, r1)
    t_hi = 0.5
    ratio0, ratio1 = _ratio(r0, t_hi), _ratio(r1, t_hi)
    assert ratio1 < ratio0
    eps = 1e-3
    # Just below each region's ratio: the region is a target; just above: it is not.
    assert target_regions(cam, regions, t_hi, ratio0 - eps, keep_best=False).tolist() == [[[True, False]]]
    assert target_regions(cam, regions, t_hi, ratio0 + eps, keep_best=False).tolist() == [[[False, False]]]
    assert target_regions(cam, regions, t_hi, ratio1 - eps, keep_best=False).tolist() == [[[True, True]]]
    assert target_regions(cam, regions, t_hi, ratio1 + eps, keep_best=False).tolist() == [[[True, False]]]


def test_image_denominator_divides_by_the_whole_image_activation():
    r0 = [0.9, 0.8, 0.3, 0.2]               # confident 1.7 of region total 2.2
    r1 = [0.6, 0.3, 0.3, 0.3]               # confident 0.6 of region total 1.5
    cam, regions = _two_region_case(r0, r1)
    image_total = sum(r0) + sum(r1)          # 3.7
    share0, share1 = 1.7 / image_total, 0.6 / image_total
    eps = 1e-3
    assert target_regions(cam, regions, 0.5, share1 - eps, keep_best=False, denominator="image").tolist() == [[[True, True]]]
    assert target_regions(cam, regions, 0.5, share1 + eps, keep_best=False, denominator="image").tolist() == [[[True, False]]]
    assert target_regions(cam, regions, 0.5, share0 + eps, keep_best=False, denominator="image").tolist() == [[[False, False]]]
    # The two readings disagree: at rho 0.4, r1 (region share 0.4) passes by its own total, not by the image's.
    assert target_regions(cam, regions, 0.5, 0.39, keep_best=False, denominator="region").tolist() == [[[True, True]]]
    assert target_regions(cam, regions, 0.5, 0.39, keep_best=False, denominator="image").tolist() == [[[True, False]]]
    with pytest.raises(ValueError, match="denominator"):
        target_regions(cam, regions, 0.5, 0.5, denominator="patch")


def test_image_denominator_ignores_padding():
    """Padding pixels (no region) hold no activation of the image's total."""
    region_map = torch.tensor([[[0, 0, 255, 255], [0, 0, 255, 255]]])
    regions = region_onehot(region_map, 1)
    cam = torch.tensor([[[[0.9, 0.9, 0.9, 0.9], [0.1, 0.1, 0.9, 0.9]]]])
    # region 0: confident 1.8 of its 2.0 = 0.9; the padded half's 3.6 must not count
    assert target_regions(cam, regions, 0.5, 0.85, keep_best=False, denominator="image").tolist() == [[[True]]]


def test_t_hi_moves_a_pixel_in_and_out():
    r0 = [0.9, 0.45, 0.2, 0.2]
    r1 = [0.1, 0.1, 0.1, 0.1]
    cam, regions = _two_region_case(r0, r1)
    low, high = 0.44, 0.46                   # the 0.45 pixel is confident under `low` only
    rho = (_ratio(r0, low) + _ratio(r0, high)) / 2
    assert _ratio(r0, high) < rho < _ratio(r0, low)
    assert target_regions(cam, regions, low, rho, keep_best=False)[0, 0, 0]
    assert not target_regions(cam, regions, high, rho, keep_best=False)[0, 0, 0]


def test_keep_best():
    r0 = [0.9, 0.2, 0.2, 0.2]               # ratio 0.6
    r1 = [0.6, 0.4, 0.4, 0.4]               # ratio 0.333
    cam, regions = _two_region_case(r0, r1)
    rho = 0.9                                # no region qualifies
    assert not target_regions(cam, regions, 0.5, rho, keep_best=False).any()
    assert target_regions(cam, regions, 0.5, rho, keep_best=True).tolist() == [[[True, False]]]
    # Swapping the CAM between regions moves the kept region with it.
    cam_swapped, _ = _two_region_case(r1, r0)
    assert target_regions(cam_swapped, regions, 0.5, rho, keep_best=True).tolist() == [[[False, True]]]
    # When one region qualifies, keep_best adds nothing.
    assert target_regions(cam, regions, 0.5, 0.5, keep_best=True).tolist() == [[[True, False]]]
    # No confident pixel anywhere: nothing to keep.
    cold, _ = _two_region_case([0.3, 0.2, 0.1, 0.1], [0.4, 0.1, 0.1, 0.1])
    assert not target_regions(cold, regions, 0.5, rho, keep_best=True).any()


def test_column_mask_follows_patch_area():
    # 4x4 region map, 2x2 patch grid (2x2 pixels per patch). Region 1 covers 3/4 of patch 0,
    # 1/2 of patch 1, 1/4 of patch 2 and nothing of patch 3.
    region_map = torch.tensor([
        [1, 1, 1, 1],
        [1, 0, 0, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 0],
    ])
    regions = region_onehot(region_map[None], 2)
    share = patch_region_share(regions, (2, 2))
    assert torch.allclose(share[0, 1], torch.tensor([0.75, 0.5, 0.25, 0.0]))
    assert torch.allclose(share.sum(dim=1), torch.ones(1, 4))
    targets = torch.tensor([[[False, True]]])                   # class 0 targets region 1 only
    assert column_mask(targets, share, 0.5).tolist() == [[[1.0, 0.0, 0.0, 0.0]]]   # 0.5 is not > 0.5
    assert column_mask(targets, share, 0.2).tolist() == [[[1.0, 1.0, 1.0, 0.0]]]
    assert column_mask(targets, share, 0.8).tolist() == [[[0.0, 0.0, 0.0, 0.0]]]
    # Both regions targets: every patch is fully covered.
    assert column_mask(torch.tensor([[[True, True]]]), share, 0.99).tolist() == [[[1.0, 1.0, 1.0, 1.0]]]


def test_padding_region_ids_are_ignored():
    region_map = torch.tensor([[[0, 1, 255, 255], [2, 1, 255, 255]]])
    onehot = region_onehot(region_map, 3)
    assert onehot.shape == (1, 3, 2, 4)
    assert torch.equal(onehot.sum(dim=1)[0], (region_map[0] < 3).float())
    assert onehot[0, 2, 1, 0] == 1 and onehot[0, 2, 0, 2:].sum() == 0   # 255 is not folded into the last region
    # An id equal to num_regions is out of range too.
    assert region_onehot(torch.tensor([[[3, 0]]]), 3)[0, :, 0, 0].sum() == 0

    # A confident CAM on padding pixels counts for no region, and padded patches are never masked in.
    cam = torch.tensor([[[[0.2, 0.2, 0.9, 0.9], [0.2, 0.2, 0.9, 0.9]]]])
    regions = region_onehot(torch.tensor([[[0, 0, 255, 255], [0, 0, 255, 255]]]), 1)
    assert not target_regions(cam, regions, 0.5, 0.5, keep_best=False).any()
    cam_changed = cam.clone()
    cam_changed[..., 2:] = 0.0
    assert torch.equal(target_regions(cam, regions, 0.5, 0.1, keep_best=True),
                       target_regions(cam_changed, regions, 0.5, 0.1, keep_best=True))
    share = patch_region_share(regions, (1, 2))
    assert column_mask(torch.tensor([[[True]]]), share, 0.5).tolist() == [[[1.0, 0.0]]]


def test_sgc_mask_non_square_grid():
    # Grid 2x3 patches, region map 4x6 (2x2 pixels per patch). Region 0 = left column of patches,
    # region 1 = the rest. Class 0 is hot on the left column, class 1 on the right column.
    grid = (2, 3)
    region_map = torch.ones(1, 4, 6, dtype=torch.long)
    region_map[:, :, :2] = 0
    cam = torch.zeros(1, 2, 2, 3)
    cam[0, 0, :, 0] = 1.0
    cam[0, 1, :, 2] = 1.0
    mask = sgc_mask(cam.flatten(2), region_map, 2, grid, t_hi=0.5, rho=0.5, patch_area=0.5)
    assert mask.shape == (1, 2, 6)
    # Row-major patch order of a 2x3 grid: the left column is patches 0 and 3.
    assert mask[0, 0].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert mask[0, 1].tolist() == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    # A batch of two, three classes, region map at 4x the grid: shapes hold and values are binary.
    mask2 = sgc_mask(torch.rand(2, 3, 6), torch.randint(0, 4, (2, 8, 12)), 4, grid, t_hi=0.5, rho=0.5, patch_area=0.5)
    assert mask2.shape == (2, 3, 6)
    assert set(mask2.unique().tolist()) <= {0.0, 1.0}


def test_sgc_mask_padding_ignored_end_to_end():
    grid = (2, 2)
    region_map = torch.zeros(1, 4, 4, dtype=torch.long)
    region_map[:, 2:, 2:] = 255                               # bottom-right patch is padding
    cam = torch.ones(1, 1, 4)
    mask = sgc_mask(cam, region_map, 1, grid, t_hi=0.5, rho=0.5, patch_area=0.5)
    assert mask.tolist() == [[[1.0, 1.0, 1.0, 0.0]]]


# ---------------------------------------------------------------- CMPA (Eq. 1-6)

@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_projection_head_is_stacked_linear_bn_relu_reducing_the_width(num_layers):
    torch.manual_seed(0)
    head = ProjectionHead(8, 4, hidden_dim=10, num_layers=num_layers)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * (num_layers - 1) + ["Linear"]
    assert head.mlp[0].in_features == 8 and head.mlp[-1].out_features == 4
    x = torch.randn(2, 3, 8)
    assert head(x).shape == (2, 3, 4)                      # any leading shape, d1 -> d2
    # The same rows give the same output whatever batch they come in (eval mode: no batch coupling).
    head.eval()
    assert torch.allclose(head(x)[0], head(x[:1])[0], atol=1e-6)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_residual_head_identity_at_init(num_layers):
    torch.manual_seed(0)
    head = ResidualHead(6, 10, num_layers=num_layers)
    x = torch.randn(5, 6)
    for mode in (head.train, head.eval):
        mode()
        assert torch.equal(head(x), x)
    x3 = torch.randn(2, 3, 6)
    assert torch.equal(head(x3), x3)


def test_residual_head_moves_after_a_step():
    torch.manual_seed(1)
    head = ResidualHead(6, 10, num_layers=2)
    x = torch.randn(8, 6)
    target = torch.randn(8, 6)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    head.train()
    loss = ((head(x) - target) ** 2).mean()
    loss.backward()
    assert head.mlp[-1].weight.grad.abs().sum() > 0
    opt.step()
    for mode in (head.train, head.eval):
        mode()
        with torch.no_grad():
            assert not torch.allclose(head(x), x, atol=1e-4)


def test_masked_average_pool_hand_computation():
    g = torch.Generator().manual_seed(12)
    dense = torch.randn(2, 5, 3, generator=g)
    cam = torch.rand(2, 2, 5, generator=g)
    cam[1, 0] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])      # a one-hot CAM picks one patch
    out = masked_average_pool(dense, cam)
    assert out.shape == (2, 2, 3)
    for b in range(2):
        for s in range(2):
            num = sum(cam[b, s, n] * dense[b, n] for n in range(5))
            assert torch.allclose(out[b, s], num / cam[b, s].sum(), atol=1e-5)
    assert torch.allclose(out[1, 0], dense[1, 2], atol=1e-5)
    # A zero CAM (padded slot) gives a zero feature, not NaN.
    assert torch.equal(masked_average_pool(dense, torch.zeros(2, 1, 5)), torch.zeros(2, 1, 3))


def _planted_clusters(seed=0, per_cluster=30, dim=16):
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(dim, 3, generator=g))[0].T          # 3 orthonormal directions
    labels = torch.arange(3).repeat_interleave(per_cluster)
    x = centres[labels] * 5 + 0.6 * torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm], labels[perm], centres, g


def test_kmeans_recovers_planted_clusters():
    x, labels, centres, g = _planted_clusters()
    init = torch.stack([x[labels == k].mean(0) for k in range(3)]) + 1.5 * torch.randn(3, x.shape[1], generator=g)
    centroids, assignment = spherical_kmeans(x, init)
    assert torch.equal(assignment, labels)
    assert torch.allclose(centroids.norm(dim=-1), torch.ones(3), atol=1e-5)
    cos = (centroids * centres).sum(-1)
    assert (cos > 0.95).all()


def test_kmeans_empty_cluster_keeps_its_seed():
    x, labels, centres, g = _planted_clusters(seed=1)
    seeds = torch.stack([x[labels == k].mean(0) for k in range(3)])
    far = -centres.sum(0)                                            # opposite every cluster
    centroids, assignment = spherical_kmeans(x, torch.cat([seeds, far[None]]))
    assert torch.equal(assignment, labels)
    assert torch.allclose(centroids[3], F.normalize(far, dim=0), atol=1e-6)


def _classes_across_clusters(seed=0, per=40, dim=16):
    """Features whose natural clusters are not the classes: a strong nuisance direction (3 clusters,
    drawn independently of the class) plus a weak class direction (3 classes)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, 6, generator=g))[0].T
    nuisance, classes = basis[:3], basis[3:]
    labels = torch.arange(3).repeat(per)
    cluster = torch.randint(0, 3, (len(labels),), generator=g)
    x = 4 * nuisance[cluster] + 1.0 * classes[labels] + 0.2 * torch.randn(len(labels), dim, generator=g)
    return x, labels, cluster, g


def test_prototype_rows_are_classes_and_the_positive_is_the_class_when_clusters_are_not():
    """Constraint (1): a visual feature's positive is its own class's text prototype, and P_I row k is class
    k's, even where the features' natural clusters cut across the classes."""
    x, labels, cluster, g = _classes_across_clusters()
    fallback = torch.randn(3, x.shape[1], generator=g)
    # free k-means finds the nuisance clusters, not the classes: the case this test is about
    _, assignment = spherical_kmeans(x, torch.stack([F.normalize(x[labels == k], dim=-1).mean(0) for k in range(3)]))
    assert (assignment == labels).float().mean() < 0.5
    means = image_prototypes(x, labels, fallback, kmeans_iters=0)
    for k in range(3):                             # row k is the normalised mean of class k's normalised features
        expected = F.normalize(F.normalize(x[labels == k], dim=-1).mean(0), dim=0)
        torch.testing.assert_close(means[k], expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(positive_index("class", means, x, labels), labels)
    # the nearest image prototype is another class for many samples: the rule the paper's constraint (1) rules out
    assert (positive_index("nearest_prototype", means, x, labels) != labels).any()
    with pytest.raises(ValueError, match="unknown CMPA positive 'cluster'"):
        positive_index("cluster", means, x, labels)


def test_free_kmeans_clusters_are_relabelled_to_classes():
    """kmeans_iters > 0: the centroid that most of class k's samples fall into becomes row k."""
    x, labels, centres, g = _planted_clusters(seed=5)
    order = torch.tensor([2, 0, 1])                # seeds in another order than the classes
    seeds = torch.stack([x[labels == k].mean(0) for k in range(3)])[order]
    centroids, assignment = spherical_kmeans(x, seeds)
    assert not torch.equal(assignment, labels)     # cluster indices are not classes
    relabelled = relabel_clusters(centroids, assignment, labels)
    for k in range(3):
        assert F.cosine_similarity(relabelled[k], centres[k], dim=0) > 0.95
    protos = image_prototypes(x, labels, torch.zeros(3, x.shape[1]), kmeans_iters=20)
    assert torch.equal((F.normalize(x, dim=-1) @ protos.T).argmax(dim=1), labels)


def test_a_class_without_features_keeps_its_fallback():
    x, labels, centres, g = _planted_clusters(seed=4)
    fallback = torch.randn(3, x.shape[1], generator=g)
    seen = labels != 1
    protos = image_prototypes(x[seen], labels[seen], fallback)
    torch.testing.assert_close(protos[1], F.normalize(fallback[1], dim=0))
    assert F.cosine_similarity(protos[0], centres[0], dim=0) > 0.95


def test_sample_memory_has_one_slot_per_image_and_class_and_keeps_the_latest():
    ids = ["a", "b", "c"]
    labels = {"a": [2], "b": [1, 3], "c": [3]}     # 1-based, as image_labels.json
    memory = SampleMemory(ids, labels, num_classes=3, dim=4)
    assert memory.labels.tolist() == [1, 0, 2, 2]  # a:2 -> 1; b:1 -> 0, b:3 -> 2; c:3 -> 2
    # a batch of (c, b): valid slots row-major -> c's one slot, then b's two
    assert memory.slots(["c", "b"], [1, 2]).tolist() == [3, 1, 2]
    g = torch.Generator().manual_seed(13)
    first, second = torch.randn(3, 4, generator=g), torch.randn(1, 4, generator=g)
    memory.write(memory.slots(["c", "b"], [1, 2]), first)
    assert memory.filled.tolist() == [False, True, True, True] and memory.class_counts().tolist() == [1, 0, 2]
    memory.write(memory.slots(["c"], [1]), second)                # c seen again: its slot is replaced
    torch.testing.assert_close(memory.features[3], F.normalize(second[0], dim=0))
    torch.testing.assert_close(memory.features[1], F.normalize(first[1], dim=0))
    fallback = torch.randn(3, 4, generator=g)
    protos = memory.prototypes(fallback)           # class 1 (slot 0) never written: its fallback
    torch.testing.assert_close(protos[1], F.normalize(fallback[1], dim=0))
    torch.testing.assert_close(protos[2], F.normalize(F.normalize(first[2], dim=0) + F.normalize(second[0], dim=0), dim=0))
    clone = SampleMemory(ids, labels, num_classes=3, dim=4)
    clone.load_state_dict(memory.state_dict())
    assert torch.equal(clone.features, memory.features) and torch.equal(clone.filled, memory.filled)
    with pytest.raises(ValueError, match="does not fit"):
        SampleMemory(ids[:2], labels, num_classes=3, dim=4).load_state_dict(memory.state_dict())


def test_prototypes_are_buffers_saved_with_the_model():
    protos = Prototypes(num_classes=3, dim=4)
    assert not bool(protos.ready)
    image, text = F.normalize(torch.randn(3, 4), dim=-1), torch.randn(3, 4) * 3
    protos.refresh(image, text)
    clone = Prototypes(num_classes=3, dim=4)
    clone.load_state_dict(protos.state_dict())
    assert bool(clone.ready) and torch.equal(clone.image, image)
    torch.testing.assert_close(clone.text, F.normalize(text, dim=-1))


def _hand_ce(features, prototypes, pos, tau):
    f = features / features.norm(dim=-1, keepdim=True)
    p = prototypes / prototypes.norm(dim=-1, keepdim=True)
    total = 0.0
    for i in range(len(f)):
        logits = [float(f[i] @ p[k]) / tau for k in range(len(p))]
        total += -(logits[int(pos[i])] - math.log(sum(math.exp(z) for z in logits)))
    return total / len(f)


def test_cross_modal_loss_hand_computation():
    g = torch.Generator().manual_seed(14)
    image = torch.randn(6, 5, generator=g)
    text = torch.randn(6, 5, generator=g)
    text_protos = torch.randn(3, 5, generator=g)
    image_protos = torch.randn(3, 5, generator=g)
    pos = torch.tensor([0, 2, 1, 1, 0, 2])
    tau = torch.tensor(0.07)
    # Eq. 3-6: -sum_i log( exp(cos(f_i, P_T[pos_i]) / tau) / sum_k exp(cos(f_i, P_T[k]) / tau) ), summed here.
    total = sample_loss_sum("cross_modal", image, text, text_protos, image_protos, pos, tau)
    assert total.item() == pytest.approx(6 * _hand_ce(image, text_protos, pos, 0.07), rel=1e-5)
    # constraint (2): text prototype k against the image prototypes, target k, averaged over K
    term = prototype_loss_term("cross_modal", text_protos, image_protos, tau)
    assert term.item() == pytest.approx(_hand_ce(text_protos, image_protos, torch.arange(3), 0.07), rel=1e-5)


def test_in_modal_and_feature_losses_hand_computation():
    g = torch.Generator().manual_seed(16)
    image, text = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    text_protos, image_protos = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    pos, tau = torch.tensor([0, 1, 1, 0]), torch.tensor(0.5)   # a loss far from 0, where float32 keeps 1e-5
    in_modal = sample_loss_sum("in_modal", image, text, text_protos, image_protos, pos, tau)
    assert in_modal.item() == pytest.approx(4 * _hand_ce(image, image_protos, pos, 0.5), rel=1e-5)
    assert prototype_loss_term("in_modal", text_protos, image_protos, tau).item() == pytest.approx(
        _hand_ce(text_protos, text_protos, torch.arange(2), 0.5), rel=1e-5)
    feature = sample_loss_sum("feature", image, text, text_protos, image_protos, pos, tau)
    cos = [float(image[i] @ text[i] / image[i].norm() / text[i].norm()) for i in range(4)]
    assert feature.item() == pytest.approx(sum(1 - c for c in cos), rel=1e-5)
    assert prototype_loss_term("feature", text_protos, image_protos, tau) is None
    with pytest.raises(ValueError):
        sample_loss_sum("contrastive", image, text, text_protos, image_protos, pos, tau)


def test_prototype_loss_pulls_towards_positive():
    protos = torch.eye(3)
    image = torch.tensor([[1.0, 0.1, 0.0]])
    args = (image, image, protos, protos)
    right = sample_loss_sum("cross_modal", *args, torch.tensor([0]), torch.tensor(0.05))
    wrong = sample_loss_sum("cross_modal", *args, torch.tensor([1]), torch.tensor(0.05))
    assert right < wrong


def test_temperature_init_and_learnable():
    temp = Temperature(0.05)
    assert temp().item() == pytest.approx(0.05, rel=1e-6)
    params = list(temp.parameters())
    assert len(params) == 1 and params[0].requires_grad
    g = torch.Generator().manual_seed(15)
    image, protos = torch.randn(4, 3, generator=g), torch.randn(2, 3, generator=g)
    pos = torch.tensor([0, 1, 1, 0])
    opt = torch.optim.SGD(temp.parameters(), lr=0.5)
    loss = sample_loss_sum("cross_modal", image, image, protos, protos, pos, temp())
    loss.backward()
    assert params[0].grad is not None and params[0].grad.abs() > 0
    opt.step()
    assert temp().item() != pytest.approx(0.05, rel=1e-4)
    assert temp().item() > 0
