import numpy as np
import pytest

from ssr.config import InferParams
from ssr.crf import dense_crf, dense_crf_from_params


def _two_colour_scene(seed=0, size=48, flip_rate=0.3):
    """A red left half and a blue right half, with a probability map that is
    right on most pixels but flipped on a random `flip_rate` share of them."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((size, size), dtype=np.int64)
    truth[:, size // 2:] = 1
    image = np.where(truth[..., None] == 0, np.array([200, 30, 30]), np.array([30, 30, 200]))
    image = np.clip(image + rng.integers(-3, 4, image.shape), 0, 255).astype(np.uint8)
    noisy = np.where(rng.random(truth.shape) < flip_rate, 1 - truth, truth)
    confidence = rng.uniform(0.55, 0.8, truth.shape)
    probs = np.stack([np.where(noisy == 0, confidence, 1 - confidence), np.where(noisy == 1, confidence, 1 - confidence)])
    return image, probs.astype(np.float32), truth


def test_output_is_a_distribution_with_the_input_shape():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    logits = rng.normal(size=(4, 20, 30))
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    out = dense_crf(image, probs)
    assert out.shape == (4, 20, 30)
    assert out.dtype == np.float32
    assert np.all(out >= 0)
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-4)


def test_crf_aligns_labels_with_the_colour_boundary():
    image, probs, truth = _two_colour_scene()
    before = (probs.argmax(0) == truth).mean()
    after = (dense_crf(image, probs).argmax(0) == truth).mean()
    assert before < 0.75
    assert after > 0.95
    assert after > before


def test_without_pairwise_terms_the_argmax_is_unchanged():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    logits = rng.normal(size=(3, 16, 24)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    out = dense_crf(image, probs, pos_w=0.0, bi_w=0.0)
    np.testing.assert_array_equal(out.argmax(0), probs.argmax(0))


def test_from_params_uses_the_crf_fields():
    image, probs, truth = _two_colour_scene(seed=3)
    off = InferParams(crf_pos_w=0.0, crf_bi_w=0.0, crf_iterations=2)
    np.testing.assert_array_equal(dense_crf_from_params(image, probs, off).argmax(0), probs.argmax(0))
    unscaled = dense_crf_from_params(image, probs, InferParams(crf_reference_size=0))
    np.testing.assert_allclose(unscaled, dense_crf(image, probs), atol=1e-6)
    assert (unscaled.argmax(0) == truth).mean() > (probs.argmax(0) == truth).mean()


def test_kernels_scale_with_the_image_size():
    """The reference stds are for ~500 px images; a 48 px image gets them times 48 / 500."""
    image, probs, _ = _two_colour_scene(seed=5)
    scaled = dense_crf_from_params(image, probs, InferParams(crf_reference_size=500))
    factor = 48 / 500
    np.testing.assert_allclose(scaled, dense_crf(image, probs, pos_xy_std=3.0 * factor, bi_xy_std=64.0 * factor), atol=1e-6)
    assert not np.allclose(scaled, dense_crf(image, probs), atol=1e-3)
    # at the reference size nothing changes
    big = np.ascontiguousarray(np.repeat(np.repeat(image, 11, axis=0), 11, axis=1)[:500, :500])
    big_probs = np.ascontiguousarray(np.repeat(np.repeat(probs, 11, axis=1), 11, axis=2)[:, :500, :500])
    np.testing.assert_allclose(dense_crf_from_params(big, big_probs, InferParams(crf_reference_size=500, crf_iterations=2)),
                               dense_crf(big, big_probs, iterations=2), atol=1e-6)


def test_non_contiguous_image_is_accepted():
    image, probs, _ = _two_colour_scene(seed=4)
    flipped = image[:, ::-1]
    assert not flipped.flags["C_CONTIGUOUS"]
    out = dense_crf(flipped, probs[:, :, ::-1])
    np.testing.assert_allclose(out, dense_crf(np.ascontiguousarray(flipped), np.ascontiguousarray(probs[:, :, ::-1])), atol=1e-6)


@pytest.mark.parametrize(
    "image_shape, probs_shape, match",
    [
        ((10, 12, 3), (2, 10, 11), r"\(10, 11\).*\(10, 12\)"),
        ((10, 12), (2, 10, 12), r"\(H, W, 3\).*\(10, 12\)"),
        ((10, 12, 3), (10, 12), r"\(C, H, W\).*\(10, 12\)"),
    ],
)
def test_shape_mismatch_is_a_clear_error(image_shape, probs_shape, match):
    image = np.zeros(image_shape, dtype=np.uint8)
    probs = np.full(probs_shape, 0.5, dtype=np.float32)
    with pytest.raises(ValueError, match=match):
        dense_crf(image, probs)


def test_float_image_is_rejected():
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(np.zeros((4, 4, 3), dtype=np.float32), np.full((2, 4, 4), 0.5))
