"""Training crops (ssr/data/dataset.py): the item contract, determinism, and that image,
region map and ground truth stay aligned through scale, crop, padding and flip.

The dataset is generated: images of coloured blocks whose class and region are functions of
the block colour, so any pixel of a crop whose colour is a block colour says which class and
region it must carry.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ssr.data.dataset import REGION_PAD, TrainCrops
from ssr.data.layout import DatasetError, DatasetLayout, write_image, write_json, write_label_png

# No black (black is the image padding) and no colour on the segment between two others,
# so a blend of two block colours never passes for a third.
PALETTE = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 230], [235, 215, 40], [200, 60, 200]], np.uint8)
CLASS_OF = np.array([1, 2, 3, 2, 1])  # palette index -> class
REGION_OF = np.array([4, 0, 2, 1, 3])  # palette index -> region id
SIZE = (60, 84)
CROP = 48


def _blocks(seed: int) -> np.ndarray:
    """(60, 84) palette indices: a 5 x 7 grid of 12 px blocks."""
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(len(PALETTE), size=(5, 7)), np.ones((12, 12), np.int64))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    layout = DatasetLayout(root)
    ids = [f"b{k}" for k in range(4)]
    labels = {}
    with h5py.File(root / "superpixels.h5", "w") as regions:
        for k, image_id in enumerate(ids):
            index = _blocks(k)
            write_image(layout.images_dir / f"{image_id}.png", PALETTE[index])
            write_label_png(layout.label_path(image_id), CLASS_OF[index].astype(np.uint8))
            regions.create_dataset(image_id, data=REGION_OF[index].astype(np.uint8))
            labels[image_id] = sorted({int(c) for c in CLASS_OF[index].ravel()})
    layout.write_split("train", ids)
    write_json(root / "classes.json", ["background", "one", "two", "three"])
    write_json(root / "image_labels.json", labels)
    return root


def _crops(root, **kw) -> TrainCrops:
    return TrainCrops(root, "train", crop_size=CROP, scale_min=0.5, scale_max=2.0, superpixels=root / "superpixels.h5",
                      seed=7, **kw)


def test_item_contract_and_determinism(root):
    data = _crops(root)
    item = data[(3, 1)]
    assert set(item) == {"image", "regions", "labels", "id"}
    assert item["image"].shape == (3, CROP, CROP) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["regions"].shape == (CROP, CROP) and item["regions"].dtype == torch.int64
    assert item["id"] == "b1" and item["labels"] == data.labels["b1"]
    again = _crops(root)[(3, 1)]
    assert torch.equal(item["image"], again["image"]) and torch.equal(item["regions"], again["regions"])
    assert torch.equal(data[2]["image"], data[(0, 2)]["image"])
    assert not torch.equal(data[(4, 1)]["image"], item["image"])  # a new epoch draws a new augmentation

    with_gt = _crops(root, with_gt=True)[(3, 1)]
    assert set(with_gt) == set(item) | {"gt"}
    assert with_gt["gt"].shape == (CROP, CROP) and with_gt["gt"].dtype == torch.int64
    assert torch.equal(with_gt["image"], item["image"]) and torch.equal(with_gt["regions"], item["regions"])

    no_regions = TrainCrops(root, "train", crop_size=CROP, scale_min=0.5, scale_max=2.0)[(3, 1)]
    assert (no_regions["regions"] == REGION_PAD).all()


def test_gt_and_regions_align_with_the_image_through_scale_crop_pad_and_flip(root):
    data = _crops(root, with_gt=True)
    padded = unpadded = 0
    for epoch in range(6):
        for index in range(len(data)):
            item = data[(epoch, index)]
            rgb = (item["image"].permute(1, 2, 0) * 255).round().numpy().astype(np.int64)
            gt, regions = item["gt"].numpy(), item["regions"].numpy()
            pad = (rgb == 0).all(-1)
            np.testing.assert_array_equal(gt == 255, pad)
            np.testing.assert_array_equal(regions == REGION_PAD, pad)
            padded, unpadded = padded + pad.any(), unpadded + (not pad.any())
            # A pixel within 2 levels of a block colour has at least 1 - 2/170 of its bilinear
            # weight in that block (block colours differ by >= 170 in some channel), so its
            # nearest source pixel lies in the block too: gt and region must be the block's.
            distance = np.abs(rgb[:, :, None, :] - PALETTE[None, None].astype(np.int64)).max(-1)
            pure = distance.min(-1) <= 2
            block = distance.argmin(-1)
            assert pure.sum() > 0.5 * (~pad).sum()
            np.testing.assert_array_equal(gt[pure], CLASS_OF[block[pure]])
            np.testing.assert_array_equal(regions[pure], REGION_OF[block[pure]])
    assert padded and unpadded  # scales 0.5-2.0 of a 60 x 84 image give both with a 48 px crop


def _window(array: np.ndarray, size, top, left, resample, fill, flip) -> np.ndarray:
    """Resize the whole array to `size`, pad with `fill`, crop the CROP window at (top, left), flip."""
    whole = np.full((max(CROP, size[0]), max(CROP, size[1])) + array.shape[2:], fill, np.uint8)
    whole[:size[0], :size[1]] = np.asarray(Image.fromarray(array).resize(size[::-1], resample))
    window = whole[top:top + CROP, left:left + CROP]
    return window[:, ::-1] if flip else window


def _ties(start: int, size: int, full: int) -> np.ndarray:
    """(CROP,) True where a nearest-neighbour sample of output pixels start.. falls within 1e-3 px of a
    source pixel boundary, so a sub-1e-4 px move of the sampling grid may pick the other neighbour."""
    position = (start + np.arange(CROP) + 0.5) * full / size
    return np.abs(position - np.round(position)) < 1e-3


def test_crop_equals_a_crop_of_the_whole_resized_image(root):
    # The reference: resize the whole image and maps, pad, crop, flip, with the draws TrainCrops
    # makes. TrainCrops resamples only the window, through PIL's float32 `box`: sample positions
    # move by under 1e-4 px. Bilinear: that can flip the rounding of each of PIL's two passes, so
    # at most 2 levels. Nearest: a pick can change only where a sample sits on a pixel boundary.
    data = _crops(root, with_gt=True)
    layout = data.layout
    for epoch in range(4):
        for index in range(len(data)):
            rng = np.random.default_rng([7, epoch, index])
            scale = rng.uniform(0.5, 2.0)
            size = (max(1, round(SIZE[0] * scale)), max(1, round(SIZE[1] * scale)))
            top = int(rng.integers(0, max(CROP, size[0]) - CROP + 1))
            left = int(rng.integers(0, max(CROP, size[1]) - CROP + 1))
            flip = rng.random() < 0.5
            image_id = data.ids[index]
            item = data[(epoch, index)]

            image = np.asarray(Image.open(layout.image_path(image_id)).convert("RGB"))
            expected = _window(image, size, top, left, Image.BILINEAR, 0, flip)
            got = (item["image"].permute(1, 2, 0) * 255).round().numpy()
            assert np.abs(got - expected).max() <= 2, (epoch, index)

            ties = _ties(top, size[0], SIZE[0])[:, None] | _ties(left, size[1], SIZE[1])[None, ::-1 if flip else 1]
            with h5py.File(root / "superpixels.h5", "r") as f:
                regions = f[image_id][()]
            gt = np.asarray(Image.open(layout.label_path(image_id)))
            for name, source, fill in (("regions", regions, REGION_PAD), ("gt", gt, 255)):
                expected = _window(source, size, top, left, Image.NEAREST, fill, flip)
                moved = item[name].numpy() != expected
                assert not (moved & ~ties).any(), (name, epoch, index)


def test_bad_ground_truth_names_the_file(root, tmp_path):
    layout = DatasetLayout(root)
    bad = _crops(root, with_gt=True)
    path = layout.label_path("b2")
    original = path.read_bytes()
    try:
        write_label_png(path, np.zeros((10, 10), np.uint8))
        with pytest.raises(DatasetError, match=r"b2\.png: label is 10x10, its image is 84x60"):
            bad[2]
        path.unlink()
        with pytest.raises(DatasetError, match=r"b2\.png"):
            bad[2]
    finally:
        path.write_bytes(original)
