"""Every image a user may have -> (H, W, 3) uint8 RGB (ssr.images), each checked against the pixels it must give."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ssr.crf import dense_crf
from ssr.images import ImageError, find_images, read_rgb, to_rgb


@pytest.fixture
def rgb():
    """A 12 x 20 RGB image with every channel varying, so that a swap, a flip or a transpose shows."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)


def test_rgb_files_and_arrays_come_back_as_they_are(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    for image in (tmp_path / "a.png", str(tmp_path / "a.png"), Image.open(tmp_path / "a.png"), rgb):
        out = to_rgb(image)
        assert out.dtype == np.uint8 and out.shape == rgb.shape
        np.testing.assert_array_equal(out, rgb)
        assert out.flags.writeable and out.flags.c_contiguous


def test_read_only_arrays_are_copied_not_refused(rgb):
    frozen = np.asarray(Image.fromarray(rgb))       # np.asarray of a PIL image is read-only
    assert not frozen.flags.writeable
    out = to_rgb(frozen)
    assert out.flags.writeable and not np.shares_memory(out, frozen)
    np.testing.assert_array_equal(out, rgb)


def test_densecrf_takes_a_read_only_image(rgb):
    """pydensecrf wants a writable buffer; np.asarray(PIL image) is not one, and DenseCRF must not care."""
    frozen = np.asarray(Image.fromarray(rgb))
    probs = np.random.default_rng(1).dirichlet(np.ones(3), size=rgb.shape[:2]).transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(dense_crf(frozen, probs), dense_crf(rgb.copy(), probs))


def test_greyscale_palette_and_one_bit_images_become_rgb(tmp_path, rgb):
    grey = rgb[..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "grey.png"), np.repeat(grey[..., None], 3, axis=2))
    np.testing.assert_array_equal(to_rgb(grey), np.repeat(grey[..., None], 3, axis=2))
    np.testing.assert_array_equal(to_rgb(grey[..., None]), np.repeat(grey[..., None], 3, axis=2))

    palette = Image.fromarray(rgb).quantize(16)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "palette.png"), np.array(palette.convert("RGB")))

    bits = grey > 127
    Image.fromarray(bits).save(tmp_path / "bits.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "bits.png"), np.repeat(bits[..., None] * np.uint8(255), 3, axis=2))
    np.testing.assert_array_equal(to_rgb(bits), np.repeat(bits[..., None] * np.uint8(255), 3, axis=2))


@pytest.mark.parametrize("background, colour", [("white", 255), ("black", 0)])
def test_transparency_is_composited_on_the_background(tmp_path, rgb, background, colour):
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, :5] = 255                             # opaque
    alpha[:, 5:10] = 128                           # half
    rgba = np.dstack([rgb, alpha])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    expected = np.rint(rgb * (alpha[..., None] / 255) + colour * (1 - alpha[..., None] / 255)).astype(np.uint8)
    for image in (tmp_path / "rgba.png", rgba):
        out = to_rgb(image, background)
        np.testing.assert_array_equal(out[:, :5], rgb[:, :5])
        assert np.all(out[:, 10:] == colour)
        # the half-transparent band: the float compositing, off by at most 1 from rounding rgb * 128 / 255
        assert np.abs(out.astype(int) - expected).max() <= 1

    # greyscale with alpha, and a palette with a transparent entry
    Image.fromarray(np.dstack([rgb[..., 0], alpha]), mode="LA").save(tmp_path / "la.png")
    assert np.all(read_rgb(tmp_path / "la.png", background)[:, 10:] == colour)
    palette = Image.fromarray(rgb).quantize(8)
    index = np.array(palette)
    palette.info["transparency"] = int(index[0, 12])
    palette.save(tmp_path / "pal_t.png", transparency=int(index[0, 12]))
    out = read_rgb(tmp_path / "pal_t.png", background)
    assert np.all(out[index == index[0, 12]] == colour)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path, rgb):
    grey16 = rgb[..., 0].astype(np.uint16) * 257      # 8-bit values spread over 16 bits: k -> 257 k
    grey16[0, 0] = 65535
    Image.fromarray(grey16).save(tmp_path / "sixteen.png")
    with Image.open(tmp_path / "sixteen.png") as image:
        assert image.mode.startswith("I")             # Pillow reads it as a 16-bit (or 32-bit int) image
    expected = np.repeat(np.rint(grey16 / 257).astype(np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(read_rgb(tmp_path / "sixteen.png"), expected)
    np.testing.assert_array_equal(to_rgb(grey16), expected)


def test_exif_orientation_turns_the_image_upright(tmp_path, rgb):
    """EXIF orientation 6: the pixels are stored turned 90 degrees anticlockwise; a viewer turns them clockwise."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "sideways.png", exif=exif)
    out = read_rgb(tmp_path / "sideways.png")
    assert out.shape == (20, 12, 3)
    np.testing.assert_array_equal(out, np.rot90(rgb, k=-1))
    with Image.open(tmp_path / "sideways.png") as image:
        np.testing.assert_array_equal(to_rgb(image), np.rot90(rgb, k=-1))


def test_channels_first_and_float_arrays(rgb):
    np.testing.assert_array_equal(to_rgb(np.moveaxis(rgb, -1, 0)), rgb)
    np.testing.assert_array_equal(to_rgb(rgb / 255.0), rgb)
    np.testing.assert_array_equal(to_rgb((rgb / 255.0).astype(np.float32)), rgb)
    np.testing.assert_array_equal(to_rgb(rgb.astype(np.int64)), rgb)
    np.testing.assert_array_equal(to_rgb(rgb.tolist()), rgb)


@pytest.mark.parametrize("image, match", [
    (np.zeros((0, 0, 3), np.uint8), r"empty image \(0x0 pixels\)"),
    (np.zeros((5, 0), np.uint8), r"empty image \(0x5 pixels\)"),
    (np.full((4, 4, 3), 200.0), r"float64 image with values 200\.\.200; float images must lie within \[0, 1\]"),
    (np.full((4, 4, 3), np.nan), "NaN"),
    (np.full((4, 4, 3), 300, np.int32), "within 0..255"),
    (np.zeros((5, 5, 2), np.uint8), r"got shape \(5, 5, 2\)"),
    (np.zeros((2, 4, 4, 3), np.uint8), r"got shape \(2, 4, 4, 3\)"),
    ("no/such/file.png", "no/such/file.png: no such file"),
    (3.5, "expected a path, a PIL image or a numpy array, got float"),
], ids=["0x0", "0-wide", "float-0..255", "nan", "int-300", "two-channels", "batch", "missing-file", "number"])
def test_what_is_not_an_image_is_a_clear_error(image, match):
    with pytest.raises(ImageError, match=match):
        to_rgb(image)


def test_unreadable_files_are_named(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageError, match=r"truncated\.png: cannot read image \(.*truncated"):
        read_rgb(tmp_path / "truncated.png")
    with pytest.raises(ImageError, match=r"text\.jpg: cannot read image \(cannot identify image file\)"):
        read_rgb(tmp_path / "text.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        read_rgb(tmp_path)


def test_find_images_takes_files_folders_and_patterns(tmp_path, rgb):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "sub/c.png"):
        Image.fromarray(rgb).save(tmp_path / "in" / name)
    (tmp_path / "in" / "notes.txt").write_text("x")
    files, problems, passed = find_images([str(tmp_path / "in"), str(tmp_path / "in" / "**" / "*.png"),
                                           str(tmp_path / "in" / "notes.txt"), str(tmp_path / "none.png"),
                                           str(tmp_path / "*.gif")])
    names = [p.relative_to(tmp_path / "in").as_posix() for p in files]
    assert names == ["a.jpg", "b.png", "sub/c.png", "notes.txt"]    # b.png once, though reached twice
    assert passed == [tmp_path / "in" / "notes.txt"]
    assert problems == [f"{tmp_path / 'none.png'}: no such file or folder", f"{tmp_path / '*.gif'}: no file matches this pattern"]
