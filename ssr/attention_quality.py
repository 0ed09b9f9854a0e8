"""How well a backbone's attention finds the demo's objects, measured on held-out images before
the attention is used (README, "The offline demo").

Two measures, for the demo CLIP and the demo DINO alike:

- the CLS-attention IoU (the DINO paper's protocol): the last block's CLS-to-patch attention,
  head-averaged, thresholded to keep the patches holding `mass` of it, against the foreground;
- the own-object share, which is what SGC's affinity (Eq. 9) propagates along: for each patch
  lying mostly inside one object, the share of its patch-to-patch attention (rows renormalised
  over the patches) that lands on patches of that same object, against that object's share of
  the patches. A ratio of 1 is attention blind to objects; propagation along it spreads a CAM
  off the object.

Beside them, the ground-truth oracle affinity (`object_oracle`): what an A_DINO that grouped every
object perfectly would be, for bounding what any DINO can add to Eq. 9
(`experiments/affinity_bounds.py`).

The patch attention is the one the method uses: for CLIP the mean of the last `clip_blocks`
blocks' head-averaged attention (`ssr.affinity.average_attention`, as `ssr.model` builds
A_CLIP), for DINO the last block's (`ssr.backbones.dino_last_attention`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssr.affinity import average_attention, row_normalise
from ssr.backbones import clip_normalisation, clip_visual_forward, dino_last_attention, dino_normalisation
from ssr.config import DemoParams
from ssr.data.demo import render_sample
from ssr.data.transforms import normalise, to_unit

CHUNK = 100  # images per forward pass


def mass_mask(attention: torch.Tensor, mass: float) -> torch.Tensor:
    """(B, N) non-negative -> (B, N) bool: the smallest set of largest entries holding at
    least `mass` of each row's total (DINO's protocol for masks from attention maps)."""
    values, order = attention.sort(dim=-1, descending=True)
    share = values / values.sum(dim=-1, keepdim=True)
    before = share.cumsum(dim=-1) - share  # mass of the larger entries
    return torch.zeros_like(attention, dtype=torch.bool).scatter(-1, order, before < mass)


def attention_iou(attention: torch.Tensor, foreground: torch.Tensor, mass: float) -> torch.Tensor:
    """Per-image IoU of the mass-thresholded attention against the foreground.

    attention: (B, h, w) over the patch grid; foreground: (B, H, W) bool. The patch mask
    is upsampled by nearest neighbour (each patch covers its H/h x W/w pixels).
    """
    b, h, w = attention.shape
    keep = mass_mask(attention.reshape(b, h * w), mass).reshape(b, 1, h, w).float()
    keep = F.interpolate(keep, size=foreground.shape[-2:], mode="nearest")[:, 0] > 0.5
    inter = (keep & foreground).sum(dim=(1, 2)).float()
    union = (keep | foreground).sum(dim=(1, 2)).float()
    return inter / union.clamp(min=1)


def patch_objects(instances: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) instance ids (0 = background) -> (B, h * w) long: the object covering more than
    half of each patch's pixels, 0 where none does (background, or a patch split between objects)."""
    b, height, width = instances.shape
    h, w = grid
    if height % h or width % w:
        raise ValueError(f"image size {(height, width)} is not a multiple of the patch grid {grid}")
    ids = int(instances.max()) + 1
    cells = F.one_hot(instances.long(), ids).float()  # (B, H, W, ids)
    cells = cells.reshape(b, h, height // h, w, width // w, ids).mean(dim=(2, 4)).reshape(b, h * w, ids)
    share, best = cells[..., 1:].max(dim=-1) if ids > 1 else (torch.zeros(b, h * w), torch.zeros(b, h * w, dtype=torch.long))
    return torch.where(share > 0.5, best + 1, torch.zeros_like(best))


def own_object_share(attention: torch.Tensor, objects: torch.Tensor) -> dict[str, float]:
    """The own-object share of patch-to-patch attention.

    attention: (B, N, N) non-negative, patch rows and columns only (rows are renormalised here);
    objects: (B, N) from `patch_objects`. Over every patch lying in an object (pooled over the
    images): `share`, the mean attention mass its row puts on its object's patches;
    `patch_share`, the mean share of the image's patches its object holds; `ratio`, share over
    patch_share; `patches`, how many rows were measured.
    """
    rows = row_normalise(attention.float())
    same = (objects[:, :, None] == objects[:, None, :]) & (objects[:, :, None] > 0)  # (B, N, N)
    inside = objects > 0
    share = (rows * same).sum(dim=-1)[inside]
    patch_share = same.float().mean(dim=-1)[inside]
    if share.numel() == 0:
        raise ValueError("no patch lies mostly inside one object: nothing to measure")
    return {"share": float(share.mean()), "patch_share": float(patch_share.mean()),
            "ratio": float(share.mean() / patch_share.mean()), "patches": int(share.numel())}


def patch_label_shares(labels: torch.Tensor, grid: tuple[int, int], num_labels: int) -> torch.Tensor:
    """(B, H, W) label map (values 0 .. num_labels - 1) -> (B, h * w, num_labels): each patch's share of pixels per label."""
    b, height, width = labels.shape
    h, w = grid
    if height % h or width % w:
        raise ValueError(f"image size {(height, width)} is not a multiple of the patch grid {grid}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_labels:
        raise ValueError(f"labels span {int(labels.min())}..{int(labels.max())}, expected 0..{num_labels - 1}")
    cells = F.one_hot(labels.long(), num_labels).float()
    return cells.reshape(b, h, height // h, w, width // w, num_labels).mean(dim=(2, 4)).reshape(b, h * w, num_labels)


def object_oracle(shares: torch.Tensor, touch: float) -> torch.Tensor:
    """The affinity of a perfect object grouping: (B, N, L) patch shares (label 0 = background) -> (B, N, N).

    A patch whose object pixels exceed `touch` of it attends to the patches holding its objects'
    labels (classes, or instances), each in proportion to its share of them; any other patch
    attends to the background, in proportion to each patch's background share. Rows sum to 1.
    Rows are drawn from the ground truth, never from a backbone: propagating a CAM along them
    shows what an A_DINO can add to Eq. 9 at best.
    """
    objects = shares[..., 1:]
    touching = (objects.sum(dim=-1) > touch)[..., None]
    to_objects = objects @ objects.transpose(1, 2)                        # (B, N, N): shared object labels
    to_background = shares[..., :1] @ shares[..., :1].transpose(1, 2)
    return row_normalise(torch.where(touching, to_objects, to_background))


# ---------------------------------------------------------------- the backbones' attention

def last_block_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised -> (B, heads, T, T) softmax attention of a timm ViT's last block.

    timm's fused kernel returns no weights, so the block runs its own plain path for
    this call and a hook reads the weights where that path applies attention dropout.
    """
    attn = model.blocks[-1].attn
    captured = []
    fused = attn.fused_attn
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        handle.remove()
        attn.fused_attn = fused
    return captured[0]


def dino_cls_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised -> (B, h, w): a timm ViT's last-block CLS-to-patch attention, head-averaged."""
    grid = model.patch_embed.dynamic_feat_size(images.shape[-2:])
    prefix = model.num_prefix_tokens
    return last_block_attention(model, images).mean(dim=1)[:, 0, prefix:].reshape(-1, *grid)


@torch.no_grad()
def clip_cls_attention(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised -> (B, h, w): an open_clip ViT's last-block CLS-to-patch attention, head-averaged."""
    out = clip_visual_forward(visual, images, attn_blocks=1)
    attention = out.attentions[len(visual.transformer.resblocks) - 1]
    return attention[:, 0, 1:].reshape(-1, *out.grid)


@torch.no_grad()
def clip_patch_attention(visual: nn.Module, images: torch.Tensor, clip_blocks: int) -> torch.Tensor:
    """(B, 3, H, W) normalised -> (B, N, N): A_CLIP before its transform, as `ssr.model` builds it."""
    depth = len(visual.transformer.resblocks)
    out = clip_visual_forward(visual, images, attn_blocks=clip_blocks)
    return average_attention([out.attentions[i] for i in range(max(0, depth - clip_blocks), depth)])


# ---------------------------------------------------------------- held-out images and the report

def eval_samples(demo: DemoParams, stream: str, num_images: int) -> dict[str, torch.Tensor]:
    """The first `num_images` of a held-out stream: images (N, 3, H, W) in [0, 1], foreground
    (N, H, W) bool and instances (N, H, W) long."""
    samples = [render_sample(demo, stream, i) for i in range(num_images)]
    return {"images": to_unit(np.stack([s.image for s in samples])),
            "foreground": torch.from_numpy(np.stack([s.label > 0 for s in samples])),
            "instances": torch.from_numpy(np.stack([s.instances for s in samples]).astype(np.int64))}


@torch.no_grad()
def measure(cls_attention: Callable[[torch.Tensor], torch.Tensor], patch_attention: Callable[[torch.Tensor], torch.Tensor],
            mean, std, held_out: dict[str, torch.Tensor], mass: float) -> dict[str, float]:
    """Both measures of one backbone on `held_out` (from `eval_samples`).

    cls_attention: normalised (B, 3, H, W) -> (B, h, w); patch_attention: -> (B, N, N);
    mean/std: the backbone's statistics.
    """
    x = normalise(held_out["images"], mean, std)
    ious, attention = [], []
    for chunk, fg in zip(x.split(CHUNK), held_out["foreground"].split(CHUNK), strict=True):
        cls = cls_attention(chunk)
        ious.append(attention_iou(cls, fg, mass))
        attention.append(patch_attention(chunk))
    grid = tuple(cls.shape[-2:])
    own = own_object_share(torch.cat(attention), patch_objects(held_out["instances"], grid))
    return {"cls_iou": float(torch.cat(ious).mean()), "own_object_share": own["share"],
            "own_object_patch_share": own["patch_share"], "own_object_ratio": own["ratio"],
            "own_object_patches": own["patches"]}


def measure_clip(clip, held_out: dict[str, torch.Tensor], mass: float, clip_blocks: int) -> dict[str, float]:
    """`measure` for an open_clip model (the attention SSR's A_CLIP averages over its last `clip_blocks` blocks)."""
    return measure(lambda x: clip_cls_attention(clip.visual, x), lambda x: clip_patch_attention(clip.visual, x, clip_blocks),
                   *clip_normalisation(clip), held_out, mass)


def measure_dino(dino: nn.Module, held_out: dict[str, torch.Tensor], mass: float) -> dict[str, float]:
    """`measure` for a timm ViT (its last block's attention, as SSR's A_DINO)."""
    return measure(lambda x: dino_cls_attention(dino, x), lambda x: dino_last_attention(dino, x), *dino_normalisation(dino),
                   held_out, mass)


def protocol(mass: float, image_size: int, stream: str, num_images: int, clip_blocks: int) -> str:
    """The measures' protocol, in words, for a provenance record."""
    return (f"held-out images: the first {num_images} of the {stream} stream; the fp16 weights as saved. cls_iou: the "
            f"last block's CLS-to-patch attention averaged over heads; per image, the patches holding {mass:.0%} of its "
            f"mass (largest first) upsampled by nearest neighbour to {image_size}x{image_size}; IoU with the foreground "
            f"(label > 0), averaged over images. own_object_*: patch-to-patch attention averaged over heads (CLIP: the "
            f"mean of its last {clip_blocks} blocks' attention, capped at its depth, as ssr.model's A_CLIP; DINO: its "
            f"last block's, as A_DINO), rows renormalised over patches; for every patch with more than half of its "
            f"pixels in one object (pooled over images): own_object_share = mean row mass on that object's patches, "
            f"own_object_patch_share = mean share of the patches the object holds, own_object_ratio = their quotient")
