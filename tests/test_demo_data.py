"""The demo dataset (README, "The offline demo") is written in the canonical layout and is a pure function of its params."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssr.config import DemoParams
from ssr.data.demo import TEXTURES, prepare_demo, render_sample
from ssr.data.layout import DatasetLayout, voc_palette

CLASSES = ["circle", "square", "triangle", "cross"]
PARAMS = DemoParams(seed=5, image_size=32, num_train=6, num_val=3, classes=list(CLASSES))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "demo"
    prepare_demo(root, PARAMS, progress=False)
    return root


def _ids(root: Path, split: str) -> list[str]:
    return (root / "splits" / f"{split}.txt").read_text().split()


def _caption_shapes(caption: str) -> list[str]:
    """'a photo of a circle and a cross on dots.' -> ['circle', 'cross'] (parsed, not substring-matched)."""
    assert caption.startswith("a photo of a ") and caption.endswith("."), caption
    body = caption[len("a photo of a "):-1]
    if " on " in body:
        body, texture = body.rsplit(" on ", 1)
        assert texture in TEXTURES, caption
    return body.split(" and a ")


def test_layout_files(demo_root):
    for name in ("images", "labels", "splits"):
        assert (demo_root / name).is_dir()
    for name in ("classes.json", "image_labels.json", "captions.json", "splits/train.txt", "splits/val.txt"):
        assert (demo_root / name).is_file()
    train, val = _ids(demo_root, "train"), _ids(demo_root, "val")
    assert len(train) == PARAMS.num_train and len(val) == PARAMS.num_val
    assert not set(train) & set(val)
    assert json.loads((demo_root / "classes.json").read_text()) == ["background", *CLASSES]
    ids = set(train) | set(val)
    assert {p.stem for p in (demo_root / "images").iterdir()} == ids
    assert {p.stem for p in (demo_root / "labels").iterdir()} == ids
    assert set(json.loads((demo_root / "image_labels.json").read_text())) == ids
    assert set(json.loads((demo_root / "captions.json").read_text())) == ids
    # No temporary files left behind by the atomic writers.
    assert not [p for p in demo_root.rglob("*") if p.name.endswith(".tmp")]


def test_images_and_palette_labels(demo_root):
    palette = voc_palette()
    allowed = set(range(len(CLASSES) + 1)) | {255}
    for image_id in _ids(demo_root, "train") + _ids(demo_root, "val"):
        with Image.open(demo_root / "images" / f"{image_id}.png") as image:
            assert image.mode == "RGB" and image.size == (32, 32)
        with Image.open(demo_root / "labels" / f"{image_id}.png") as label:
            assert label.mode == "P" and label.size == (32, 32)
            assert label.getpalette()[:3 * 6] == palette[:3 * 6]
            values = set(np.unique(np.array(label)).tolist())
        assert values <= allowed
        assert values & set(range(1, len(CLASSES) + 1)), f"{image_id}: no object"


def test_image_labels_match_label_pngs(demo_root):
    image_labels = json.loads((demo_root / "image_labels.json").read_text())
    layout = DatasetLayout(demo_root)
    for image_id, classes in image_labels.items():
        label = np.array(Image.open(layout.label_path(image_id)))
        present = sorted(int(v) for v in np.unique(label) if 0 < v < 255)
        assert classes == present
        assert 1 <= len(classes) <= PARAMS.max_objects
    assert layout.image_labels() == image_labels


def test_captions_name_present_shapes_only(demo_root):
    captions = json.loads((demo_root / "captions.json").read_text())
    image_labels = json.loads((demo_root / "image_labels.json").read_text())
    for image_id, caption in captions.items():
        shapes = _caption_shapes(caption)
        assert 1 <= len(shapes) <= PARAMS.max_objects, caption
        assert len(shapes) == len(set(shapes)), caption
        assert set(shapes) <= set(CLASSES), caption
        present = {CLASSES[c - 1] for c in image_labels[image_id]}
        assert set(shapes) == present, (image_id, caption, present)


def test_deterministic_by_seed(demo_root, tmp_path):
    again = tmp_path / "again"
    prepare_demo(again, PARAMS, progress=False)
    files = sorted(p.relative_to(demo_root) for p in demo_root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (demo_root / rel).read_bytes() == (again / rel).read_bytes(), rel

    other = tmp_path / "other"
    prepare_demo(other, DemoParams(**{**PARAMS.__dict__, "seed": PARAMS.seed + 1}), progress=False)
    differing = [rel for rel in files
                 if rel.parts[0] == "images" and (demo_root / rel).read_bytes() != (other / rel).read_bytes()]
    assert len(differing) == PARAMS.num_train + PARAMS.num_val


def test_captions_drop_fully_hidden_objects():
    # Many overlapping objects of very different sizes: some are fully covered by later ones
    # (or too small to cover a pixel). A caption names exactly the shapes visible in the label.
    params = DemoParams(seed=0, image_size=32, min_objects=2, max_objects=3, min_object_size=0.05, max_object_size=1.0,
                        classes=list(CLASSES))
    for i in range(100):
        sample = render_sample(params, "train", i)
        present = {CLASSES[c - 1] for c in np.unique(sample.label) if 0 < c < 255}
        assert present, i
        assert set(_caption_shapes(sample.caption)) == present, (i, sample.caption)
