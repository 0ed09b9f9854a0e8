"""The canonical dataset layout that every stage after `prepare` reads.

    data/{ds}/
        images/{id}.jpg | {id}.png   RGB images
        labels/{id}.png              palette PNG: 0 background, 1..C classes, 255 ignore
        splits/{split}.txt           one image id a line
        classes.json                 ["background", "aeroplane", ...] (index = label value)
        image_labels.json            {id: [foreground class indices, 1..C, sorted]}
        captions.json                demo only: {id: caption}

Writers are atomic: they write a temporary file beside the target and rename it,
so an interrupted stage never leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


class DatasetError(RuntimeError):
    """A dataset file is missing, malformed or inconsistent; the message names it."""


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map as a flat list of 768 ints (index 255 is cream white)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    palette[255 * 3: 256 * 3] = [224, 224, 192]
    return palette


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp creates 0600 files; outputs must be readable like any other file the user writes.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, hint: str = ""):
    """The JSON in `path`; DatasetError if it is missing (`hint` says what writes it) or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found" + (f" ({hint})" if hint else ""))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from err


def write_label_png(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write an (H, W) uint8 label map as a VOC-palette PNG, atomically."""
    if label.ndim != 2:
        raise ValueError(f"{path}: label map must be 2-D, got shape {label.shape}")
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG as an (H, W) uint8 array of class indices (palette indices, not colours)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise DatasetError(f"{path}: label PNG must be palette or greyscale, got mode {image.mode}")
            return np.array(image, dtype=np.uint8)
    except (OSError, SyntaxError) as err:
        raise DatasetError(f"{path}: cannot read label image ({err})") from err


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file into an RGB PIL image; a corrupt or truncated file raises DatasetError."""
    try:
        with Image.open(path) as image:
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read image ({err})") from err


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as an (H, W, 3) uint8 RGB array; a corrupt or truncated file raises DatasetError."""
    return np.array(open_rgb(path))


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image, reading only its header."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, SyntaxError) as err:
        raise DatasetError(f"{path}: cannot read image ({err})") from err


def write_image(path: str | os.PathLike, image: np.ndarray, quality: int = 95) -> None:
    path = Path(path)
    fmt = "PNG" if path.suffix == ".png" else "JPEG"
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))


class DatasetLayout:
    """Paths and readers for one dataset root in the canonical layout."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def labels_dir(self) -> Path:
        return self.root / "labels"

    @property
    def splits_dir(self) -> Path:
        return self.root / "splits"

    @property
    def superpixels_path(self) -> Path:
        return self.root / "superpixels.h5"

    def image_path(self, image_id: str) -> Path:
        for suffix in IMAGE_SUFFIXES:
            path = self.images_dir / f"{image_id}{suffix}"
            if path.exists():
                return path
        raise DatasetError(f"{self.images_dir}: no image for id {image_id!r} (listed in a split; the dataset is "
                           f"incomplete: {self.prepare_hint})")

    def label_path(self, image_id: str) -> Path:
        return self.labels_dir / f"{image_id}.png"

    def split(self, name: str) -> list[str]:
        path = self.splits_dir / f"{name}.txt"
        if not path.is_file():
            raise DatasetError(f"{path}: split file not found ({self.prepare_hint}, or check datasets.{self.root.name}.*_split "
                               f"in params.yaml)")
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not ids:
            raise DatasetError(f"{path}: split is empty (one image id a line expected; `ssr prepare` writes it)")
        seen: set[str] = set()
        for n, image_id in enumerate(ids, 1):
            if image_id in seen:
                raise DatasetError(f"{path}: image id {image_id!r} is listed twice (again as id no. {n}); list each id once")
            seen.add(image_id)
        return ids

    def write_split(self, name: str, ids: list[str]) -> None:
        with atomic_path(self.splits_dir / f"{name}.txt") as tmp:
            tmp.write_text("".join(f"{i}\n" for i in ids))

    @property
    def prepare_hint(self) -> str:
        """What writes this layout: the prepare stage of the dataset the root is named after (data/{ds})."""
        return f"run `ssr prepare --dataset {self.root.name}` first"

    def classes(self) -> list[str]:
        classes = read_json(self.root / "classes.json", self.prepare_hint)
        if not isinstance(classes, list) or not classes or classes[0] != "background":
            raise DatasetError(f"{self.root / 'classes.json'}: must be a list starting with 'background'")
        return classes

    def image_labels(self) -> dict[str, list[int]]:
        return read_json(self.root / "image_labels.json", self.prepare_hint)


def image_labels_from_mask(label: np.ndarray, num_classes: int) -> list[int]:
    """Foreground classes present in a label map (ignore and background excluded), sorted."""
    present = np.unique(label)
    return [int(c) for c in present if 0 < c < num_classes]
