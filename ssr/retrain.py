"""Multi-stage protocol: a standard fully supervised segmenter trained on exported pseudo-labels.

The SSR model's exported pseudo-labels (`results/{ds}/method/seed{S}/pseudo_labels/{id}.png`)
stand in for ground truth; a torchvision segmenter is trained on them with the
usual DeepLab recipe (SGD, momentum 0.9, weight decay 1e-4, poly learning
rate, random scale + crop + flip, cross-entropy ignoring 255).

Builders are called with `weights=None, weights_backbone=None` so nothing is
downloaded. For real runs an ImageNet backbone matters a great deal; set
`retrain.weights_backbone` (e.g. "IMAGENET1K_V1" or "DEFAULT") only where the weights
are already in torchvision's cache (`$TORCH_HOME/hub/checkpoints`), otherwise
torchvision tries to download them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.models import segmentation

from ssr.config import SEGMENTERS, RetrainParams
from ssr.data.layout import IGNORE_INDEX, DatasetError, DatasetLayout, atomic_path, read_image, read_label_png
from ssr.data.transforms import normalise, random_scale_crop, to_unit
from ssr.progress import progress_bar
from ssr.schedules import poly

# The torchvision backbones were pretrained with ImageNet's statistics (timm's constants);
# padding past an image's edge is its mean colour.
MEAN_RGB = tuple(round(255 * m) for m in IMAGENET_DEFAULT_MEAN)


def build_segmenter(name: str, num_classes: int, *, weights_backbone=None) -> nn.Module:
    """A torchvision segmentation model with a `num_classes`-way head, randomly initialised.

    The model maps (B, 3, H, W) normalised images to {"out": (B, num_classes, H, W) logits}.
    `weights_backbone` is passed to torchvision unchanged (None: no pretrained backbone,
    no download).
    """
    if name not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {name!r} (known: {', '.join(SEGMENTERS)})")
    if not 1 <= num_classes <= 255:
        raise ValueError(f"num_classes must be in [1, 255] (255 is the ignore label), got {num_classes}")
    builder = getattr(segmentation, name)
    return builder(weights=None, weights_backbone=weights_backbone, num_classes=num_classes)


def segmenter_input(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, ImageNet-normalised."""
    return normalise(to_unit(image), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


class PseudoLabelDataset(Dataset):
    """Images from a canonical dataset root, labels from a pseudo-label directory.

    Item: (image (3, crop, crop) float32 normalised, label (crop, crop) int64 with
    255 = ignore). Augmentation: `ssr.data.transforms.random_scale_crop` with a scale in
    `scale_range` (padding: the image with its mean colour, the label with 255), seeded
    from torch's generator so that DataLoader workers are seeded by the loader.
    """

    def __init__(
        self,
        root: str | Path,
        label_dir: str | Path,
        ids: list[str],
        *,
        num_classes: int,
        crop_size: int,
        scale_range: tuple[float, float] = (0.5, 2.0),
    ):
        if not ids:
            raise DatasetError(f"{label_dir}: no image ids to train on")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {scale_range}")
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        layout = DatasetLayout(root)
        self.label_dir = Path(label_dir)
        self.ids = list(ids)
        # Resolve every file now: a missing one should stop the stage before
        # training starts, not hours into it.
        missing = [self.label_path(i) for i in self.ids if not self.label_path(i).is_file()]
        if missing:
            raise DatasetError(
                f"{missing[0]}: pseudo-label file not found ({len(missing)} of {len(self.ids)} ids "
                f"missing in {self.label_dir}; run `ssr pseudo-labels --dataset {layout.root.name}` first)"
            )
        self.image_paths = [layout.image_path(i) for i in self.ids]
        self.num_classes = num_classes
        self.crop_size = crop_size
        self.scale_range = scale_range

    def label_path(self, image_id: str) -> Path:
        return self.label_dir / f"{image_id}.png"

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw pair: (H, W, 3) uint8 image, (H, W) uint8 label, checked against each other."""
        image_path, label_path = self.image_paths[index], self.label_path(self.ids[index])
        image = read_image(image_path)
        label = read_label_png(label_path)
        if label.shape != image.shape[:2]:
            raise DatasetError(f"{label_path}: label size {label.shape} does not match image {image_path} size {image.shape[:2]}")
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            raise DatasetError(
                f"{label_path}: label value {int(label[bad].max())} out of range for {self.num_classes} classes"
            )
        return image, label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        crops = random_scale_crop(rng, Image.fromarray(image), {"label": (Image.fromarray(label), IGNORE_INDEX)},
                                  crop=self.crop_size, scale_min=self.scale_range[0], scale_max=self.scale_range[1],
                                  image_fill=MEAN_RGB)
        return segmenter_input(crops["image"]), torch.from_numpy(crops["label"].astype(np.int64))


def _segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # A crop that is all padding / ignore would give a 0/0 NaN mean.
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def retrain(root: Path, label_dir: Path, ids: list[str], out_path: Path, params: RetrainParams, *, num_classes: int,
            device: str = "cpu", seed: int = 0, progress: bool = True, num_workers: int = 0) -> dict:
    """Train `params.model` on (image, pseudo-label) pairs and save it to `out_path`.

    root: canonical dataset root (images); label_dir: `{id}.png` pseudo-labels; params: the
    `retrain` section of params.yaml (validated there: batch_size >= 2, which BatchNorm in
    the segmentation heads needs, lr > 0, ...). Checkpoint (written atomically): {"model":
    state_dict, "model_name", "num_classes", "iterations"}. Returns {"first_loss",
    "final_loss", "iterations", "seconds", "images_per_s"}.
    """
    model_name, iterations, batch_size, lr = params.model, params.iterations, params.batch_size, params.lr
    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_segmenter(model_name, num_classes, weights_backbone=params.weights_backbone or None).to(device)
    dataset = PseudoLabelDataset(root, label_dir, ids, num_classes=num_classes, crop_size=params.crop_size,
                                 scale_range=(params.scale_min, params.scale_max))

    generator = torch.Generator().manual_seed(seed)
    # Exactly `iterations` full batches, drawn as successive shuffles of the ids,
    # so a split smaller than one batch still works.
    sampler = RandomSampler(dataset, replacement=False, num_samples=iterations * batch_size, generator=generator)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        generator=generator,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=params.momentum, weight_decay=params.weight_decay)
    use_bf16 = device.type == "cuda"

    model.train()
    first_loss = final_loss = float("nan")
    start = time.perf_counter()
    bar = progress_bar(total=iterations, desc=f"retrain {model_name}", progress=progress)
    for step, (images, labels) in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = poly(step, iterations, lr)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(images)["out"]
        loss = _segmentation_loss(logits, labels)
        if not torch.isfinite(loss):
            raise RuntimeError(f"retrain: loss is {loss.item()} at iteration {step}; lower the learning rate ({lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        final_loss = loss.item()
        if step == 0:
            first_loss = final_loss
        bar.set_postfix(loss=f"{final_loss:.4f}", refresh=False)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    checkpoint = {"model": state, "model_name": model_name, "num_classes": num_classes, "iterations": iterations}
    with atomic_path(out_path) as tmp:
        torch.save(checkpoint, tmp)
    return {
        "first_loss": first_loss,
        "final_loss": final_loss,
        "iterations": iterations,
        "seconds": seconds,
        "images_per_s": iterations * batch_size / max(seconds, 1e-9),
    }


def load_segmenter(path: str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild a model written by `retrain` (in eval mode, on `device`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: retrained checkpoint not found (run `ssr retrain --dataset {path.parent.parent.name}` "
                                f"first, with retrain.enabled: true)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot read checkpoint ({err})") from err
    if not isinstance(checkpoint, dict) or not {"model", "model_name", "num_classes"} <= set(checkpoint):
        raise ValueError(f"{path}: not a retrain checkpoint (needs model, model_name, num_classes)")
    model = build_segmenter(checkpoint["model_name"], checkpoint["num_classes"])
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


@torch.no_grad()
def predict_probs(model: nn.Module, image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (C, H, W) float32 softmax probabilities on the full image."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"predict: image must be (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        x = segmenter_input(image)[None].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)["out"]
        return logits.float().softmax(1)[0].cpu().numpy()
    finally:
        model.train(was_training)


def predict(model: nn.Module, image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 class map from a retrained segmenter."""
    return predict_probs(model, image).argmax(0).astype(np.uint8)
