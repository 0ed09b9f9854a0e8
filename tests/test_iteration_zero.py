"""Training starts from CLIP-ES: at iteration 0 the online pseudo-labels of every dataset's
configuration (CMPA heads, DINO, SGC, PAR) are those of the same pipeline on plain CLIP features.

The real-size models with random weights (open_clip ViT-B-16, timm DINO ViT-S/16; nothing
downloads) on small images: the CAM, the refined CAM and the labels are compared, at the
online-label step `prepare_micro_batch` that training runs.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import timm
import torch

from ssr.backbones import demo_asset_dir
from ssr.cam import class_slots
from ssr.config import load_params
from ssr.data.voc import VOC_CLASSES
from ssr.model import SSR, ModelDims, build_backbones, refined_cams
from ssr.train import prepare_micro_batch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_size_models():
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None).eval().requires_grad_(False)
    dino = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    return clip, open_clip.get_tokenizer("ViT-B-16"), dino.eval().requires_grad_(False)


def _batch(num_foreground: int, num_regions: int, seed: int = 1) -> dict:
    """Two 96 x 128 images (a non-native 6 x 8 grid) with blocky region maps larger than a patch."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(2, 3, 6, 8, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(96, 128), mode="bilinear", align_corners=False)
    images = (images + 0.05 * torch.rand(2, 3, 96, 128, generator=g)).clamp(0, 1)
    blocks = torch.randint(0, num_regions, (2, 1, 3, 4), generator=g).float()
    regions = torch.nn.functional.interpolate(blocks, size=(96, 128), mode="nearest")[:, 0].long()
    labels = [[1, min(15, num_foreground)], [min(12, num_foreground)]]
    return {"image": images, "regions": regions, "labels": labels, "id": ["a", "b"]}


@pytest.mark.parametrize("dataset", ["voc", "coco"])
def test_iteration_zero_labels_are_clip_es_labels_on_the_real_size_configuration(dataset, real_size_models):
    params = load_params(REPO / "params.yaml", site=False).for_dataset(dataset)
    clip, tokenizer, dino = real_size_models
    names = VOC_CLASSES[1:] if dataset == "voc" else [f"class {i}" for i in range(80)]
    ds = params.dataset(dataset)
    backbones = build_backbones(ds, names, demo_clip_dir=demo_asset_dir("demo_clip"), clip=clip, tokenizer=tokenizer, dino=dino)
    assert backbones.width == 768 and backbones.dino is not None
    batch = _batch(len(names), params.superpixels.n_clusters)
    args = dict(num_regions=params.superpixels.n_clusters, par=ds.par)

    torch.manual_seed(0)
    method = SSR(ModelDims.of(backbones), params.cmpa)           # the configured heads, freshly initialised
    plain_params = params.model_copy(update={"cmpa": params.cmpa.model_copy(update={"enabled": False})})
    plain = SSR(ModelDims.of(backbones), plain_params.cmpa)       # CLIP's own embeddings: the CLIP-ES pipeline
    ours = prepare_micro_batch(backbones, method, batch, params, **args)
    reference = prepare_micro_batch(backbones, plain, batch, plain_params, **args)

    classes, valid = class_slots(batch["labels"])
    assert ours.cam[valid].amax() > 0, "no activation at all: the comparison would not bite"
    torch.testing.assert_close(ours.cam, reference.cam, atol=1e-5, rtol=0)
    refine = dict(num_regions=params.superpixels.n_clusters, rows=())
    refined = [refined_cams(backbones, model, batch["image"], classes, valid, batch["regions"], p.affinity, p.sgc,
                            **refine).method for model, p in ((method, params), (plain, plain_params))]
    torch.testing.assert_close(refined[0], refined[1], atol=1e-5, rtol=0)
    agree = (ours.labels == reference.labels).float().mean().item()
    assert agree >= 0.99, f"{dataset}: {agree:.1%} of the online labels agree with CLIP-ES's at iteration 0"
