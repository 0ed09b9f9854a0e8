"""The offline demo dataset: procedurally drawn shapes on textured backgrounds.

Class is shape; colour and texture are distractors that a CAM must learn to
ignore. Each sample is a pure function of (seed, stream, index), so the
dataset, the demo CLIP's training stream and its held-out evaluation images
never overlap and are reproducible bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ssr.config import DemoParams
from ssr.data.download import atomic_dir
from ssr.data.layout import DatasetLayout, image_labels_from_mask, write_image, write_json, write_label_png
from ssr.progress import progress_bar

OBJECT_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (235, 215, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 200, 210),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
}
TEXTURES = ("stripes", "checks", "dots", "noise", "plain")

# Streams keep the dataset splits, the CLIP and DINO pretraining data and their
# held-out evaluation images disjoint for one seed.
STREAMS = {"train": 0, "val": 1, "clip_train": 2, "clip_eval": 3, "dino_train": 4, "dino_eval": 5}
PLACEMENT_TRIES = 20


@dataclass
class DemoSample:
    image: np.ndarray      # (H, W, 3) uint8
    label: np.ndarray      # (H, W) uint8, 0 background, 1..C shapes
    caption: str
    texture: str
    instances: np.ndarray  # (H, W) uint8, 0 background, k where the k-th drawn object is visible


def _shape_polygon(shape: str, cx: float, cy: float, size: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        scale = size / 2 / math.sqrt(2) * 1.25
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        scale = size / 2
    elif shape == "cross":
        t = 1 / 3
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
        scale = size / 2
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + scale * (x * c - y * s), cy + scale * (x * s + y * c)) for x, y in pts]


def _shape_mask(shape: str, height: int, width: int, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        r = size / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, size, angle), fill=1)
    return np.array(canvas, dtype=bool)


def _texture(rng: np.random.Generator, kind: str, size: int, contrast: float) -> np.ndarray:
    """(size, size, 3) float background in [0, 255] of two random muted colours at most `contrast` apart per channel."""
    a = rng.uniform(30, 200, size=3)
    b = np.clip(a + rng.uniform(-contrast, contrast, size=3), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "stripes":
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(5, 12)
        t = (np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period) > 0).astype(np.float32)
    elif kind == "checks":
        period = int(rng.integers(4, 10))
        t = (((xx // period) + (yy // period)) % 2).astype(np.float32)
    elif kind == "dots":
        t = np.zeros((size, size), np.float32)
        spacing = rng.uniform(6, 10)
        r = spacing * rng.uniform(0.2, 0.35)
        ox, oy = rng.uniform(0, spacing, 2)
        dx = (xx - ox) % spacing - spacing / 2
        dy = (yy - oy) % spacing - spacing / 2
        t[dx**2 + dy**2 < r**2] = 1
    elif kind == "noise":
        coarse = rng.random((size // 4 + 1, size // 4 + 1)).astype(np.float32)
        t = np.array(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
    elif kind == "plain":
        t = np.zeros((size, size), np.float32)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    out = a * (1 - t[..., None]) + b * t[..., None]
    return out + rng.normal(0, 4, out.shape)


def render_sample(params: DemoParams, stream: str, index: int, max_objects: int | None = None) -> DemoSample:
    """Draw sample `index` of `stream` (a key of STREAMS).

    `max_objects` caps the object count below `params.max_objects` (CLIP pretraining
    mixes in single-object images).
    """
    rng = np.random.default_rng([params.seed, STREAMS[stream], index])
    size = params.image_size
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    image = _texture(rng, texture, size, params.texture_contrast)
    label = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.uint8)
    top = params.max_objects if max_objects is None else max(params.min_objects, min(max_objects, params.max_objects))
    n_objects = int(rng.integers(params.min_objects, top + 1))
    phrases = []
    # Distinct colours within an image, so two touching objects never merge into one blob.
    colour_names = [list(OBJECT_COLOURS)[i] for i in rng.permutation(len(OBJECT_COLOURS))]
    for k in range(n_objects):
        class_index = int(rng.integers(len(params.classes)))
        shape = params.classes[class_index]
        colour_name = colour_names[k % len(colour_names)]
        # at least 3 px, so a tiny configuration never draws an empty object
        side = max(3.0, rng.uniform(params.min_object_size, params.max_object_size) * size)
        angle = math.radians(params.max_rotation * (2 * rng.random() - 1))
        # Overlaps are allowed but bounded: resample the position while the new object
        # would cover more than `max_overlap` of its area with earlier ones.
        for _ in range(PLACEMENT_TRIES):
            cx, cy = rng.uniform(side / 2, size - side / 2, 2)
            mask = _shape_mask(shape, size, size, cx, cy, side, angle)
            if (label[mask] > 0).sum() <= params.max_overlap * mask.sum():
                break
        colour = np.array(OBJECT_COLOURS[colour_name], np.float32) + rng.normal(0, 6, 3)
        image[mask] = colour + rng.normal(0, 5, (int(mask.sum()), 3))
        label[mask] = class_index + 1
        instances[mask] = k + 1
        phrases.append(shape)
    # Objects hidden under later ones are not in the picture, so not in the caption.
    visible = set(image_labels_from_mask(label, len(params.classes) + 1))
    kept = [p for p in phrases if params.classes.index(p) + 1 in visible]
    # Captions name shapes, never colours: colour is the distractor the CAM must ignore. The
    # texture (the demo's background prompts) is named half the time.
    where = f" on {texture}" if rng.random() < 0.5 else ""
    caption = "a photo of a " + " and a ".join(dict.fromkeys(kept)) + where + "."
    return DemoSample(np.clip(image, 0, 255).astype(np.uint8), label, caption, texture, instances)


def prepare_demo(root: str | Path, params: DemoParams, progress: bool = True) -> None:
    """Write the demo dataset in the canonical layout under `root`.

    Like the other datasets it is built beside `root` and renamed onto it at the end (replacing
    an earlier one), so an interrupted run leaves nothing under `root`.
    """
    with atomic_dir(root) as staged:
        _write_demo(staged, params, progress)


def _write_demo(root: Path, params: DemoParams, progress: bool) -> None:
    layout = DatasetLayout(root)
    classes = ["background", *params.classes]
    image_labels, captions = {}, {}
    for split, count in (("train", params.num_train), ("val", params.num_val)):
        ids = [f"{split}_{i:05d}" for i in range(count)]
        for i, image_id in enumerate(progress_bar(ids, desc=f"demo {split}", progress=progress)):
            sample = render_sample(params, split, i)
            write_image(layout.images_dir / f"{image_id}.png", sample.image)
            write_label_png(layout.label_path(image_id), sample.label)
            image_labels[image_id] = image_labels_from_mask(sample.label, len(classes))
            captions[image_id] = sample.caption
        layout.write_split(split, ids)
    write_json(layout.root / "classes.json", classes)
    write_json(layout.root / "captions.json", captions)
    # Written last: its presence marks a complete dataset for the DAG.
    write_json(layout.root / "image_labels.json", image_labels)
