"""Overlay strips for a person to look at: image | ground truth | CAM rows | pseudo-label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ssr.data.layout import atomic_path, voc_palette


def colourise(label: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 in the VOC palette."""
    palette = np.array(voc_palette(), np.uint8).reshape(256, 3)
    return palette[label]


def heatmap(cam: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8, blue (cold) to red (hot)."""
    x = np.clip(cam, 0, 1)[..., None]
    cold, mid, hot = np.array([0, 0, 160.0]), np.array([255, 255, 0.0]), np.array([220, 0, 0.0])
    rgb = np.where(x < 0.5, cold + (mid - cold) * (x * 2), mid + (hot - mid) * (x * 2 - 1))
    return rgb.astype(np.uint8)


def save_overlay(path: Path, image: np.ndarray, gt: np.ndarray | None, cams: dict[str, np.ndarray], label: np.ndarray, scale: int = 0) -> None:
    """Write one strip: image, ground truth (if any), each CAM blended on the image, pseudo-label."""
    panels = [("image", image)]
    if gt is not None:
        panels.append(("ground truth", colourise(gt)))
    for name, cam in cams.items():
        panels.append((name, (0.5 * image + 0.5 * heatmap(cam)).astype(np.uint8)))
    panels.append(("pseudo-label", colourise(label)))
    scale = scale or max(1, 160 // max(image.shape[:2]))
    h, w = image.shape[0] * scale, image.shape[1] * scale
    strip = Image.new("RGB", (w * len(panels), h + 14), "white")
    draw = ImageDraw.Draw(strip)
    for i, (title, panel) in enumerate(panels):
        strip.paste(Image.fromarray(panel).resize((w, h), Image.NEAREST), (i * w, 14))
        draw.text((i * w + 2, 1), title, fill="black")
    with atomic_path(path) as tmp:
        strip.save(tmp, format="PNG")
