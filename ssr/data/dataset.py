"""Torch datasets over the canonical layout: training crops and whole images for inference.

Image-level labels always come from image_labels.json, never from what
survives a crop: a class cropped out of view is still "in the image" for
the weak label, and its CAM slot simply finds little to activate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ssr.data.layout import IGNORE_INDEX, DatasetError, DatasetLayout, atomic_path, open_rgb, read_image, read_label_png
from ssr.data.regions import RegionMaps, region_key
from ssr.data.transforms import channels_first, random_scale_crop, to_unit

# Region id used for padding; `sgc.region_onehot` drops ids >= the region count.
REGION_PAD = 255


def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize an (H, W[, 3]) uint8 array to size (h, w)."""
    image = Image.fromarray(array)
    return np.array(image.resize((size[1], size[0]), Image.NEAREST if nearest else Image.BILINEAR))


def snap_size(height: int, width: int, long_side: int, multiple: int) -> tuple[int, int]:
    """Scale so the long side is `long_side`, then round both sides to a multiple of the patch size."""
    scale = long_side / max(height, width)
    return (max(multiple, round(height * scale / multiple) * multiple), max(multiple, round(width * scale / multiple) * multiple))


def read_ground_truth(path: Path, shape: tuple[int, int], num_classes: int) -> np.ndarray:
    """(H, W) uint8 label map of an image of `shape`; DatasetError naming the file if it does not fit."""
    gt = read_label_png(path)
    if gt.shape != tuple(shape):
        raise DatasetError(f"{path}: label is {gt.shape[1]}x{gt.shape[0]}, its image is {shape[1]}x{shape[0]}")
    bad = (gt >= num_classes) & (gt != IGNORE_INDEX)
    if bad.any():
        raise DatasetError(f"{path}: label value {int(gt[bad][0])} is not a class (0..{num_classes - 1}) or 255")
    return gt


class DecodedCache:
    """Decoded images and region maps kept as raw .npy arrays in a folder, made on first use.

    Decoding a VOC JPEG and reading its region map from the compressed HDF5 file are about
    half a training crop's CPU time; reading the raw array back is a copy. One file per
    image and kind, named by the image id and its source file's size and modification time,
    so a changed source is decoded again (files of old versions are left behind: delete the
    folder to reclaim them). Written atomically: workers, ranks and runs may share a folder.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def get(self, kind: str, image_id: str, source: Path, decode) -> np.ndarray:
        """The array `decode()` returns for `image_id` from `source`, from the folder when it is there."""
        stat = source.stat()
        path = self.folder / f"{region_key(image_id)}.{kind}.{stat.st_size:x}-{stat.st_mtime_ns:x}.npy"
        try:
            return np.load(path)
        except (OSError, ValueError, EOFError):   # absent, or damaged: made below
            pass
        array = np.ascontiguousarray(decode())
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, array)
        return array


class WeakLabelDataset(Dataset):
    """Shared reading of ids, weak labels and region maps."""

    def __init__(self, root: str | Path, split: str, *, superpixels: str | Path | None = None):
        self.layout = DatasetLayout(root)
        self.ids = self.layout.split(split)
        self.classes = self.layout.classes()
        labels = self.layout.image_labels()
        missing = [i for i in self.ids if i not in labels]
        if missing:
            raise DatasetError(f"{self.layout.root / 'image_labels.json'}: no labels for {len(missing)} ids of split {split!r}, "
                               f"e.g. {missing[0]!r} ({self.layout.prepare_hint} again)")
        self.labels = {i: labels[i] for i in self.ids}
        for image_id, image_classes in self.labels.items():
            wrong = [c for c in image_classes if type(c) is not int or not 0 < c < len(self.classes)]
            if wrong:
                path = self.layout.root / "image_labels.json"
                raise DatasetError(f"{path}: image {image_id!r} lists class {wrong[0]!r}, not a foreground class index "
                                   f"of classes.json (1..{len(self.classes) - 1})")
        self.superpixels = Path(superpixels) if superpixels else None
        self._regions: RegionMaps | None = None
        self.cache: DecodedCache | None = None  # decoded region maps (and, in TrainCrops, images) kept as arrays

    def __len__(self) -> int:
        return len(self.ids)

    def ground_truth(self, image_id: str, shape: tuple[int, int]) -> np.ndarray:
        """(H, W) uint8 label map of an image of `shape`; DatasetError naming the file if it does not fit."""
        return read_ground_truth(self.layout.label_path(image_id), shape, len(self.classes))

    def region_map(self, image_id: str, shape: tuple[int, int]) -> np.ndarray:
        if self.superpixels is None:
            return np.full(shape, REGION_PAD, np.uint8)
        if self._regions is None:
            self._regions = RegionMaps(self.superpixels)

        def read() -> np.ndarray:
            return self._regions[image_id]

        regions = read() if self.cache is None else self.cache.get("regions", image_id, self.superpixels, read)
        if regions.shape != shape:
            raise DatasetError(f"{self.superpixels}: region map of {image_id!r} is {regions.shape}, image is {shape}")
        return regions


class TrainCrops(WeakLabelDataset):
    """Random scale, crop and flip of image and region map together.

    Item: image (3, crop, crop) float in [0, 1] (zero padding), region map (crop, crop) long
    (padding REGION_PAD), weak labels (list of 1-based classes), id; with `with_gt`, also
    "gt": the ground-truth label crop (crop, crop) long (padding 255), resized with nearest
    neighbours exactly like the region map. With `compact`, the image, region map and ground
    truth stay uint8 (a fifth of the bytes of float32 and int64 through the worker queues and
    to the device); `ssr.data.transforms.unit_images` makes the same float image there.
    With `cache_dir`, decoded images and region maps are kept there as raw arrays (`DecodedCache`).
    """

    def __init__(self, root, split, *, crop_size: int, scale_min: float, scale_max: float, superpixels=None, seed: int = 0,
                 with_gt: bool = False, compact: bool = False, cache_dir: str | Path | None = None):
        super().__init__(root, split, superpixels=superpixels)
        self.crop_size, self.scale_min, self.scale_max, self.seed = crop_size, scale_min, scale_max, seed
        self.with_gt, self.compact = with_gt, compact
        self.cache = DecodedCache(cache_dir) if cache_dir else None

    def __getitem__(self, key: int | tuple[int, int]):
        """key: an index, or (epoch, index) so that each epoch draws fresh augmentations."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image_id = self.ids[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        path = self.layout.image_path(image_id)
        if self.cache is None:
            image = open_rgb(path)
        else:
            image = Image.fromarray(self.cache.get("rgb", image_id, path, lambda: np.asarray(open_rgb(path))))
        shape = (image.height, image.width)
        regions = self.region_map(image_id, shape)
        maps = {"regions": (Image.fromarray(regions), REGION_PAD)}
        if self.with_gt:
            maps["gt"] = (Image.fromarray(self.ground_truth(image_id, shape)), IGNORE_INDEX)
        crops = random_scale_crop(rng, image, maps, crop=self.crop_size, scale_min=self.scale_min, scale_max=self.scale_max)
        # numpy rather than torch for the conversions: torch's intra-op threads cost more than
        # they save on arrays this small.
        if self.compact:
            item = {"image": channels_first(crops.pop("image"))}
            item.update({name: torch.from_numpy(np.ascontiguousarray(crop)) for name, crop in crops.items()})
        else:
            item = {"image": to_unit(crops.pop("image"))}
            item.update({name: torch.from_numpy(crop.astype(np.int64)) for name, crop in crops.items()})
        item.update(labels=list(self.labels[image_id]), id=image_id)
        return item


class WholeImages(WeakLabelDataset):
    """Whole images resized so the long side is `long_side` (sides snapped to the patch size).

    Item: image (3, h, w) float in [0, 1], region map (h, w) long, original RGB (H, W, 3) uint8,
    ground truth (H, W) uint8 or None, weak labels, id.
    """

    def __init__(self, root, split, *, long_side: int, patch_size: int, superpixels=None):
        super().__init__(root, split, superpixels=superpixels)
        self.long_side, self.patch_size = long_side, patch_size

    def original(self, image_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The image as stored, (H, W, 3) uint8, and its ground truth (H, W) uint8 or None."""
        original = read_image(self.layout.image_path(image_id))
        gt = None
        if self.layout.label_path(image_id).exists():
            gt = self.ground_truth(image_id, original.shape[:2])
        return original, gt

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        original, gt = self.original(image_id)
        regions = self.region_map(image_id, original.shape[:2])
        size = snap_size(*original.shape[:2], self.long_side, self.patch_size)
        return {
            "image": to_unit(_resize(original, size, False)),
            "regions": torch.from_numpy(_resize(regions, size, True)).long(),
            "original": original,
            "gt": gt,
            "labels": list(self.labels[image_id]),
            "id": image_id,
        }


def collate(items: list[dict]) -> dict:
    """Stack tensors of equal shape; keep everything else as lists."""
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            # in a DataLoader worker, torch's own collate stacks straight into shared memory,
            # sparing a copy of the whole batch on its way to the main process
            out[key] = default_collate(values)
        else:
            out[key] = values
    return out
