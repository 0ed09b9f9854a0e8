"""The two configurations the benchmarks run, built from real components with random weights.

- "real": open_clip ViT-B-16 + timm vit_small_patch16_224 (DINO ViT-S/16 architecture), the
  `voc` dataset's prompts (CLIP-ES synonyms, 25 background prompts) and params.yaml's settings.
- "tiny": the tests' tiny open_clip CLIP (patch 8) and a 2-block timm ViT, for CPU smoke runs.

Weights are random (nothing downloads); speed and memory do not depend on their values.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import numpy as np
import open_clip
import timm
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emit import emit  # noqa: E402,F401  (benchmarks/emit.py; the benchmarks import it from here)

from ssr.backbones import load_dino  # noqa: E402
from ssr.config import load_params  # noqa: E402
from ssr.data.voc import VOC_CLASSES  # noqa: E402
from ssr.model import SSR, ModelDims, build_backbones  # noqa: E402

# Same as tests/conftest.py:tiny_clip_config(32, 8).
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 24, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def build(kind: str, device: torch.device, params=None):
    """-> (params, FrozenBackbones, SSR in train mode) for "real", "tiny" or "demo" (the committed,
    trained demo CLIP with the demo's prompts and classes)."""
    params = params or load_params(REPO / "params.yaml")
    ds = params.dataset("voc")
    torch.manual_seed(0)
    if kind == "demo":
        demo = params.dataset("demo")
        backbones = build_backbones(demo, params.demo.classes, demo_clip_dir=REPO / "ssr" / "assets" / "demo_clip", device=device)
        return params, backbones, SSR(ModelDims.of(backbones), params.cmpa).to(device).train()
    if kind == "real":
        clip = open_clip.create_model(ds.clip_model, pretrained=None, device=device)
        tokenizer = open_clip.get_tokenizer(ds.clip_model)
        dino = load_dino("vit_small_patch16_224", pretrained=False, device=device)
    elif kind == "tiny":
        clip = open_clip.CLIP(**TINY_CLIP).to(device)
        tokenizer = open_clip.SimpleTokenizer(context_length=TINY_CLIP["text_cfg"]["context_length"])
        dino = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, embed_dim=48, num_heads=3, patch_size=8,
                                 img_size=32, dynamic_img_size=True, num_classes=0).to(device)
        dino.eval().requires_grad_(False)
    else:
        raise ValueError(f"unknown configuration {kind!r}")
    clip.eval().requires_grad_(False)
    backbones = build_backbones(ds, VOC_CLASSES[1:], demo_clip_dir=REPO, device=device, clip=clip, tokenizer=tokenizer, dino=dino)
    model = SSR(ModelDims.of(backbones), params.cmpa).to(device).train()
    return params, backbones, model


def blocky_regions(batch: int, size: int, num_regions: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, size, size) long region maps of square blocks (32 px, at least 2 per side), each a random region.

    Blocks span whole patches (16 px, or 8 for the tiny model), so a patch can lie in a target
    region (sgc.patch_area) and the refined CAM is not zero, as with real superpixel regions."""
    blocks = torch.randint(0, num_regions, (batch, 1, max(2, size // 32), max(2, size // 32)), generator=generator).float()
    return torch.nn.functional.interpolate(blocks, size=(size, size), mode="nearest")[:, 0].long()


def synthetic_batch(batch: int, size: int, num_regions: int, classes_per_image: int, generator: torch.Generator) -> dict:
    """A collated training micro-batch: smooth random images, blocky region maps, 1..k classes per image."""
    coarse = torch.rand(batch, 3, max(2, size // 16), max(2, size // 16), generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    images = (images + 0.1 * torch.rand(batch, 3, size, size, generator=generator)).clamp(0, 1)
    regions = blocky_regions(batch, size, num_regions, generator)
    labels = []
    for _ in range(batch):
        count = int(torch.randint(1, classes_per_image + 1, (1,), generator=generator))
        labels.append(sorted((torch.randperm(len(VOC_CLASSES) - 1, generator=generator)[:count] + 1).tolist()))
    return {"image": images, "regions": regions, "labels": labels, "id": [f"synthetic_{i}" for i in range(batch)]}


def fill_prototypes(model: SSR, generator: torch.Generator) -> None:
    """Built prototypes, as after the training's warm-up."""
    prototypes = model.prototypes
    feats = torch.randn(*prototypes.image.shape, generator=generator).to(prototypes.image.device)
    prototypes.refresh(torch.nn.functional.normalize(feats, dim=-1), feats)


def demo_batch(params, batch: int, generator: torch.Generator) -> dict:
    """A collated micro-batch of real demo images (64 px shapes), with random blocky region maps."""
    from ssr.data.demo import render_sample
    from ssr.data.layout import image_labels_from_mask
    from ssr.data.transforms import to_unit

    samples = [render_sample(params.demo, "val", i) for i in range(batch)]
    images = to_unit(np.stack([s.image for s in samples]))
    size = images.shape[-1]
    blocks = torch.randint(0, params.superpixels.n_clusters, (batch, 1, size // 16, size // 16), generator=generator).float()
    regions = torch.nn.functional.interpolate(blocks, size=(size, size), mode="nearest")[:, 0].long()
    labels = [image_labels_from_mask(s.label, len(params.demo.classes) + 1) for s in samples]
    return {"image": images, "regions": regions, "labels": labels, "id": [f"val_{i:05d}" for i in range(batch)]}
