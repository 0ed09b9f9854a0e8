"""Image tensors and the one training augmentation.

- `to_unit`: uint8 RGB, channels last -> float32 channels first in [0, 1].
- `channels_first` / `unit_images`: the same split in two, uint8 on the host (a quarter of the
  bytes to move) and the float conversion where the images are used, on the device.
- `normalise`: (x - mean) / std per channel, with a backbone's own statistics (open_clip's
  and timm's constants, or what a model's preprocess config records).
- `random_scale_crop`: random rescale, crop and horizontal flip of an image and its label
  maps together; the SSR training crops (`ssr.data.dataset.TrainCrops`) and the retrained
  segmenter's (`ssr.retrain.PseudoLabelDataset`) both draw theirs here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB (H, W, 3) or (B, H, W, 3) -> float32 (3, H, W) or (B, 3, H, W) in [0, 1].

    A numpy array is converted with numpy into a contiguous channels-first array (on images
    this small torch's intra-op threads cost more than they save, and a contiguous batch
    collates as a plain copy); a tensor stays on its device.
    """
    if isinstance(images, np.ndarray):
        pixels = np.moveaxis(images, -1, -3).astype(np.float32, order="C")
        pixels /= 255
        return torch.from_numpy(pixels)
    return images.movedim(-1, -3).float() / 255


def channels_first(image: np.ndarray) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> uint8 (3, H, W), contiguous."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, -3)))


def unit_images(images: torch.Tensor, device=None) -> torch.Tensor:
    """(B, 3, H, W) uint8 or float in [0, 1] -> float32 in [0, 1] on `device`, bit for bit what `to_unit` gives.

    uint8 crosses to the device as it is and is divided there. The divisor is a tensor on the
    device: CUDA divides by a Python scalar as a multiplication by its reciprocal, which
    differs from numpy's division in the last bit for half of the 256 values.
    """
    images = images.to(device, non_blocking=True) if device is not None else images
    if images.dtype != torch.uint8:
        return images
    return images.float() / torch.full((), 255.0, device=images.device)


def normalise(images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) in [0, 1] -> (images - mean) / std per channel.

    mean and std: three numbers, or tensors that broadcast against `images` (e.g. (1, 3, 1, 1)).
    """
    if not isinstance(mean, torch.Tensor):
        mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
    if not isinstance(std, torch.Tensor):
        std = torch.tensor(std, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return (images - mean) / std


def scaled_window(image: Image.Image, size: tuple[int, int], top: int, left: int, crop: int, resample: int,
                  fill: int | tuple[int, ...]) -> np.ndarray:
    """The (crop, crop) window at (top, left) of `image` resized to `size` (h, w), `fill` past its edges.

    Only the window is resampled, at a fraction of the cost of resizing the whole image
    when it is scaled up: PIL maps the output pixels through `box` onto the source with
    the filter centres and weights of the whole resize, up to its float32 box coordinates
    (sample positions move by under 1e-4 px: bilinear values by at most 2 levels, nearest
    picks only where a sample sits on a pixel boundary). Returns (crop, crop[, 3]) uint8.
    """
    h, w = size
    rows, cols = min(crop, h - top), min(crop, w - left)
    sy, sx = image.height / h, image.width / w
    box = (left * sx, top * sy, (left + cols) * sx, (top + rows) * sy)
    window = np.asarray(image.resize((cols, rows), resample, box=box))
    out = np.full((crop, crop) + window.shape[2:], fill, np.uint8)
    out[:rows, :cols] = window
    return out


def random_scale_crop(rng: np.random.Generator, image: Image.Image, maps: dict[str, tuple[Image.Image, int]], *, crop: int,
                      scale_min: float, scale_max: float, image_fill: int | tuple[int, ...] = 0) -> dict[str, np.ndarray]:
    """Rescale by a random factor, take a random (crop, crop) window, flip it horizontally half the time.

    image: RGB; maps: {name: (label-like image of the same size, its padding value)},
    resampled with nearest neighbours exactly like the image is with bilinear filtering.
    Draws from `rng`, in this order: the scale in [scale_min, scale_max], the window's top
    and left (0 where the scaled side is under `crop`: the window then overhangs and is
    padded), the flip. -> {"image": (crop, crop, 3) uint8, name: (crop, crop) uint8 for each map}.
    """
    shape = (image.height, image.width)
    scale = rng.uniform(scale_min, scale_max)
    size = (max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale)))
    top = int(rng.integers(0, max(crop, size[0]) - crop + 1))
    left = int(rng.integers(0, max(crop, size[1]) - crop + 1))
    flip = rng.random() < 0.5
    crops = {"image": scaled_window(image, size, top, left, crop, Image.BILINEAR, image_fill)}
    crops.update({name: scaled_window(m, size, top, left, crop, Image.NEAREST, fill) for name, (m, fill) in maps.items()})
    if flip:
        crops = {name: c[:, ::-1] for name, c in crops.items()}
    return crops
