"""PAR (pixel-adaptive refinement of label scores) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from ssr.par import par_affinity, par_refine, shifted


def test_neighbours_are_the_dilated_8_neighbourhood_with_replicated_edges():
    x = torch.arange(30.0).reshape(1, 1, 5, 6)
    out = torch.stack(list(shifted(x, [1, 2])), dim=2)
    assert out.shape == (1, 1, 16, 5, 6)
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    for k, (d, (dy, dx)) in enumerate([(d, o) for d in (1, 2) for o in offsets]):
        for i in range(5):
            for j in range(6):
                ii, jj = min(max(i + dy * d, 0), 4), min(max(j + dx * d, 0), 5)   # edge replicated
                assert out[0, 0, k, i, j] == x[0, 0, ii, jj], (d, dy, dx, i, j)


def test_affinity_rows_sum_to_one_and_follow_colour():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 9, 11)
    aff = par_affinity(image, [1, 2])
    assert aff.shape == (2, 16, 9, 11)
    torch.testing.assert_close(aff.sum(dim=1), torch.ones(2, 9, 11), atol=1e-5, rtol=0)
    # a pixel whose right neighbour has its colour and whose other neighbours do not weighs the right one most
    flat = torch.ones(1, 3, 5, 5)
    flat[..., 2, 2] = 0.2
    flat[..., 2, 3] = 0.2
    weights = par_affinity(flat, [1])[0, :, 2, 2]
    assert int(weights.argmax()) == 4        # offset (0, 1): the right neighbour


def test_hand_computed_affinity_of_one_pixel():
    torch.manual_seed(1)
    image = torch.rand(1, 3, 5, 5)
    w_colour, w_position = 0.3, 0.01
    aff = par_affinity(image, [1], w_colour, w_position)[0, :, 2, 2]
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    neigh = torch.stack([image[0, :, 2 + dy, 2 + dx] for dy, dx in offsets], dim=1)        # (3, 8)
    std = neigh.std(dim=1, keepdim=True)
    colour = (-(((neigh - image[0, :, 2, 2][:, None]).abs() / (std + 1e-8)) / w_colour) ** 2).mean(0).softmax(0)
    dist = torch.tensor([math.sqrt(2) if dy and dx else 1.0 for dy, dx in offsets])
    position = (-((dist / dist.std()) / w_colour) ** 2).softmax(0)
    torch.testing.assert_close(aff, (colour + w_position * position) / (1 + w_position), atol=1e-6, rtol=1e-5)


def _two_halves(h: int = 48, w: int = 48, noise: float = 0.0, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(h, w, dtype=torch.long)
    truth[:, w // 2:] = 1
    red, blue = torch.tensor([0.9, 0.1, 0.1])[:, None, None], torch.tensor([0.1, 0.1, 0.9])[:, None, None]
    image = torch.where(truth[None] == 0, red, blue) + noise * torch.rand(3, h, w, generator=g)
    return image[None], truth, g


def test_scores_spread_within_a_colour_region_and_not_across_its_edge():
    """A score seeded at one pixel of the red half fills the red half; what crosses into the blue
    half comes only from the small distance term (w_position), never from the colour term."""
    image, truth, _ = _two_halves()
    scores = torch.zeros(1, 1, 48, 48)
    scores[0, 0, 20, 10] = 1.0
    refined = par_refine(image, scores, dilations=[1, 2, 4, 8], iterations=20)[0, 0]
    assert refined[truth == 0].sum() > 0.97 * refined.sum()
    assert (refined[truth == 0] > 0).float().mean() > 0.5                     # it spread


def test_refinement_cleans_noisy_scores_inside_regions():
    image, truth, g = _two_halves(noise=0.02)
    noisy = torch.where(torch.rand(48, 48, generator=g) < 0.25, 1 - truth, truth)
    scores = torch.stack([(noisy == 0).float(), (noisy == 1).float()])[None] * 0.6 + 0.2
    refined = par_refine(image, scores, dilations=[1, 2, 4, 8], iterations=20)
    inner = (slice(4, -4), slice(4, -4))                                     # replicated edges feed a pixel itself
    before = (scores.argmax(1)[0] == truth)[inner].float().mean()
    after = (refined.argmax(1)[0] == truth)[inner].float().mean()
    assert before < 0.8 and after > before + 0.15
    # scores stay on their scale (each pixel's weights sum to 1)
    torch.testing.assert_close(refined.sum(1), scores.sum(1), atol=1e-4, rtol=0)


def test_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in size"):
        par_refine(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 4, 4), dilations=[1], iterations=1)
