"""Images as users have them -> the (H, W, 3) uint8 RGB arrays the model reads; the files `ssr predict` takes.

`to_rgb` accepts a path, a PIL image or a numpy array (read-only ones too) and returns a new,
writable, contiguous (H, W, 3) uint8 array:

- files and PIL images are turned upright by their EXIF orientation, so a phone photo stored
  sideways is segmented as a viewer shows it (the label map has the shown size);
- palette, greyscale, 1-bit, CMYK and YCbCr images become RGB;
- transparency (RGBA, LA, a palette's transparent index) is composited on `background`,
  white unless told otherwise: what lies under a transparent pixel is undefined, and white is
  what a viewer shows behind it;
- 16-bit images (PNG, TIFF) are scaled to 8 bits (x / 257, rounded), not clipped at 255;
- arrays: (H, W), (H, W, 1 | 3 | 4) or channels first (1 | 3 | 4, H, W); uint8, uint16 (16-bit),
  bool, other integers within 0..255, floats within [0, 1].

Anything else (an empty image, a float image in 0..255, an unreadable or truncated file) is an
`ImageError` naming the image and the problem.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
# Pillow's modes that hold more than 8 bits a sample; "I" is what older Pillows made of a 16-bit PNG.
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """An input that is not an image ssr can segment; the message names it and says why."""


def image_suffixes() -> set[str]:
    """The file suffixes Pillow opens (".jpg", ".png", ".tif", ...), lower case."""
    return {suffix.lower() for suffix in Image.registered_extensions()}


def _background(background: str | tuple[int, int, int]) -> np.ndarray:
    if isinstance(background, str):
        if background not in BACKGROUNDS:
            raise ValueError(f"background {background!r}: use one of {', '.join(BACKGROUNDS)} or an (r, g, b) tuple")
        return np.array(BACKGROUNDS[background], np.float32)
    colour = np.asarray(background, np.float32)
    if colour.shape != (3,) or colour.min() < 0 or colour.max() > 255:
        raise ValueError(f"background {background!r}: expected three values in 0..255")
    return colour


def _composite(rgb: np.ndarray, alpha: np.ndarray, background) -> np.ndarray:
    """rgb (H, W, 3) over `background` with opacity alpha (H, W) in [0, 1] -> uint8."""
    a = alpha[..., None].astype(np.float32)
    out = rgb.astype(np.float32) * a + _background(background) * (1 - a)
    return np.rint(out).astype(np.uint8)


def _check_size(height: int, width: int, name: str) -> None:
    if height < 1 or width < 1:
        raise ImageError(f"{name}: empty image ({width}x{height} pixels); nothing to segment")


def _pil_to_rgb(image: Image.Image, background, name: str) -> np.ndarray:
    _check_size(image.height, image.width, name)
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in _SIXTEEN_BIT:
        grey = np.asarray(image).astype(np.float64)
        if grey.min() < 0 or grey.max() > 65535:
            raise ImageError(f"{name}: {mode} image with values {grey.min():.0f}..{grey.max():.0f}, outside 16 bits")
        return np.repeat(np.rint(grey / 257).astype(np.uint8)[..., None], 3, axis=2)
    if mode == "F":
        return _array_to_rgb(np.asarray(image), background, name)
    if mode == "RGB":
        return np.array(image, np.uint8)
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode in ("P", "L", "RGB") and "transparency" in image.info)
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"))
        return _composite(rgba[..., :3], rgba[..., 3] / 255, background)
    return np.array(image.convert("RGB"), np.uint8)


def _array_to_rgb(array: np.ndarray, background, name: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ImageError(f"{name}: expected an (H, W), (H, W, 1|3|4) or (1|3|4, H, W) image array, got shape {array.shape}")
    _check_size(array.shape[0], array.shape[1], name)
    dtype = array.dtype
    if dtype == np.uint8:
        pixels = array.astype(np.float32) / 255
    elif dtype == np.uint16:
        pixels = array.astype(np.float32) / 65535
    elif dtype == np.bool_:
        pixels = array.astype(np.float32)
    elif np.issubdtype(dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ImageError(f"{name}: {dtype} image with values {low}..{high}; integer images must lie within 0..255 "
                             f"(uint16 arrays are read as 16-bit)")
        pixels = array.astype(np.float32) / 255
    elif np.issubdtype(dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ImageError(f"{name}: {dtype} image holds NaN or inf")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:
            raise ImageError(f"{name}: {dtype} image with values {low:g}..{high:g}; float images must lie within [0, 1] "
                             f"(for 0..255 values pass uint8)")
        pixels = array.astype(np.float32)
    else:
        raise ImageError(f"{name}: unsupported image dtype {dtype}")
    channels = pixels.shape[-1]
    colour = np.repeat(pixels[..., :1], 3, axis=2) if channels == 1 else pixels[..., :3]
    if channels == 4:
        return _composite(colour * 255, pixels[..., 3], background)
    if dtype == np.uint8:  # exact: no round trip through float
        return np.ascontiguousarray(np.repeat(array, 3, axis=2) if channels == 1 else array[..., :3]).copy()
    return np.rint(colour * 255).astype(np.uint8)


def read_rgb(path: str | os.PathLike, background: str | tuple[int, int, int] = "white") -> np.ndarray:
    """Decode an image file (any format Pillow reads) into (H, W, 3) uint8 RGB, upright by its EXIF orientation."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: {'is a folder, not an image file' if path.is_dir() else 'no such file'}")
    try:
        with Image.open(path) as image:
            image.load()
            return _pil_to_rgb(image, background, str(path))
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # Pillow names a file it cannot identify by its path already; say it once.
        reason = str(err).replace(f" {str(path)!r}", "").replace(str(path), "the file")
        raise ImageError(f"{path}: cannot read image ({reason})") from err


def to_rgb(image, background: str | tuple[int, int, int] = "white", name: str | None = None) -> np.ndarray:
    """A path, PIL image or numpy array -> a new, writable (H, W, 3) uint8 RGB array (see the module docstring).

    `name` is how errors refer to the image (default: its path, or "image").
    """
    if isinstance(image, (str, os.PathLike)):
        return read_rgb(image, background)
    name = name or "image"
    if isinstance(image, Image.Image):
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(f"{name}: cannot read image ({err})") from err
        return _pil_to_rgb(image, background, name)
    if hasattr(image, "__array__") or isinstance(image, (list, tuple)):
        return _array_to_rgb(np.asarray(image), background, name)
    raise ImageError(f"{name}: expected a path, a PIL image or a numpy array, got {type(image).__name__}")


def find_images(inputs: list[str]) -> tuple[list[Path], list[str], list[Path]]:
    """Files, folders and glob patterns -> (image files in order, problems, files passed over).

    A folder contributes the files directly inside it whose suffix Pillow reads, sorted; a
    pattern (one the shell did not expand, e.g. quoted) its matches, sorted. Files named
    outright are taken whatever their suffix (a non-image is then found when it is read).
    Each problem is "INPUT: what is wrong" (no such file, no match, no image in a folder);
    passed over are the files in folders without an image suffix. A file reached twice
    is listed once.
    """
    suffixes = image_suffixes()
    files: list[Path] = []
    problems: list[str] = []
    passed_over: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            entries = sorted(p for p in path.iterdir() if p.is_file())
            images = [p for p in entries if p.suffix.lower() in suffixes]
            passed_over += [p for p in entries if p.suffix.lower() not in suffixes]
            if not images:
                problems.append(f"{path}: no image files in this folder")
            files += images
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                problems.append(f"{item}: no file matches this pattern")
            files += matches
        else:
            problems.append(f"{path}: no such file or folder")
    return list(dict.fromkeys(files)), problems, passed_over
