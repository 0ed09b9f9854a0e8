"""The single-stage SSR model: frozen CLIP (+ DINO), CMPA heads, SGC-refined CAMs, decoder.

`FrozenBackbones` holds what never trains (and never goes into a checkpoint);
`SSR` holds what does. `refined_cams` is the whole CAM path of the paper:
GradCAM through the CMPA heads, then affinity propagation with the SGC mask,
for every ablation row of the paper's Table 3 at once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ssr.affinity import clip_affinity, fuse_affinities, propagate
from ssr.backbones import (
    clip_normalisation,
    clip_visual_forward,
    dino_last_attention,
    dino_normalisation,
    encode_prompts,
    load_clip,
    load_dino,
)
from ssr.cam import gradcam, present_class_probs
from ssr.cmpa import PrototypeBank, SemanticAdapter, Temperature
from ssr.config import AffinityParams, CmpaParams, DatasetParams, SgcParams
from ssr.data.layout import IGNORE_INDEX
from ssr.decoder import SegDecoder
from ssr.sgc import sgc_mask

# Rows of the paper's Table 3, in order: CAM only, + CLIP attention, + DINO attention, + SGC mask.
ABLATION_ROWS = ("cam", "clip", "dino", "sgc")


@dataclass
class FrozenBackbones:
    clip: nn.Module
    text: torch.Tensor                 # (C_fg + C_bg, E) normalised prompt embeddings, foreground first
    num_foreground: int
    dino: nn.Module | None
    clip_mean: torch.Tensor            # (1, 3, 1, 1)
    clip_std: torch.Tensor
    dino_mean: torch.Tensor | None
    dino_std: torch.Tensor | None
    cam_weighting: str = "gradcam"     # see ssr.cam.gradcam

    @property
    def depth(self) -> int:
        return len(self.clip.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        return self.clip.visual.conv1.out_channels

    @property
    def embed_dim(self) -> int:
        return self.text.shape[1]

    @property
    def patch_size(self) -> int:
        return self.clip.visual.conv1.kernel_size[0]


def _stats(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)


def build_backbones(ds: DatasetParams, class_names: list[str], *, demo_clip_dir: str | Path, device="cpu",
                    clip=None, tokenizer=None, dino=None) -> FrozenBackbones:
    """Load (or take) the frozen models and encode the prompts once.

    class_names: foreground names (no "background"). `clip`/`tokenizer`/`dino` may be
    given directly (tests pass tiny random-init models); otherwise they are loaded
    from the dataset's params.
    """
    if clip is None:
        clip, tokenizer = load_clip(ds.clip_model, ds.clip_pretrained, demo_dir=demo_clip_dir, device=device)
    if dino is None and ds.dino_model:
        dino = load_dino(ds.dino_model, device=device)
    names = list(class_names) + list(ds.background_prompts)
    text = encode_prompts(clip, tokenizer, names, ds.prompt_template)
    mean, std = clip_normalisation(clip)
    dmean, dstd = dino_normalisation(dino) if dino is not None else (None, None)
    return FrozenBackbones(
        clip=clip, text=text, num_foreground=len(class_names), dino=dino,
        clip_mean=_stats(mean, device), clip_std=_stats(std, device),
        dino_mean=_stats(dmean, device) if dino is not None else None,
        dino_std=_stats(dstd, device) if dino is not None else None,
        cam_weighting=ds.cam_weighting,
    )


class SSR(nn.Module):
    """Everything SSR trains: ISA, TSA, tau and the prototype bank (CMPA), and the decoder."""

    def __init__(self, backbones: FrozenBackbones, cmpa: CmpaParams, *, decoder_width: int = 256, decoder_layers: int = 3, decoder_heads: int = 8):
        super().__init__()
        e = backbones.embed_dim
        self.use_cmpa = cmpa.enabled
        self.isa = SemanticAdapter(e, cmpa.hidden_dim, cmpa.num_layers)
        self.tsa = SemanticAdapter(e, cmpa.hidden_dim, cmpa.num_layers)
        self.tau = Temperature(cmpa.tau_init)
        self.bank = PrototypeBank(backbones.num_foreground, e, cmpa.bank_size)
        self.decoder = SegDecoder(backbones.width, backbones.depth - 1, backbones.num_foreground + 1,
                                  width=decoder_width, layers=decoder_layers, heads=decoder_heads)

    def adapt_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.isa(x) if self.use_cmpa else x

    def adapt_text(self, x: torch.Tensor) -> torch.Tensor:
        return self.tsa(x) if self.use_cmpa else x


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """BatchNorm in train mode couples the images of a batch; the CAM pass must not."""
    states = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, state in zip(modules, states):
            m.train(state)


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> normalised with a backbone's own statistics."""
    return (images - mean) / std


@dataclass
class CamPass:
    cams: dict[str, torch.Tensor]      # row -> (B, S, N) in [0, 1]
    method: torch.Tensor               # (B, S, N) the configured method's refined CAM
    visual: object                     # ClipVisualOutput (tokens for the decoder, dense embeddings)
    grid: tuple[int, int]


def refined_cams(
    backbones: FrozenBackbones,
    model: SSR,
    images: torch.Tensor,
    classes: torch.Tensor,
    valid: torch.Tensor,
    region_maps: torch.Tensor | None,
    affinity: AffinityParams,
    sgc: SgcParams,
    *,
    num_regions: int,
    rows: tuple[str, ...] = ABLATION_ROWS,
    autocast_dtype: torch.dtype | None = None,
) -> CamPass:
    """Initial CAM -> affinity propagation -> SGC, for an image batch.

    images (B, 3, H, W) in [0, 1]; classes/valid (B, S) from `cam.class_slots`;
    region_maps (B, H, W) long or None (SGC rows then fall back to unmasked).
    Returns the CAMs of the requested Table 3 rows and of the configured method.
    """
    device_type = images.device.type
    amp = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with amp:
        visual = clip_visual_forward(
            backbones.clip.visual, normalise(images, backbones.clip_mean, backbones.clip_std),
            attn_blocks=affinity.clip_blocks, cam_block=-1, cam_grad=True)
        with eval_mode(model.isa, model.tsa), torch.enable_grad():
            image_emb = model.adapt_image(visual.pooled.float())
            text_emb = model.adapt_text(backbones.text)
            probs = present_class_probs(image_emb, text_emb, backbones.clip.logit_scale.exp(), classes, valid, backbones.num_foreground)
        cam = gradcam(visual.cam_input, probs, valid, weighting=backbones.cam_weighting)
        grid = visual.grid
        with torch.no_grad():
            depth = backbones.depth
            attn = [visual.attentions[i] for i in range(max(0, depth - affinity.clip_blocks), depth)]
            a_clip = clip_affinity(attn, rounds=affinity.sinkhorn_rounds, power=affinity.power)
            a_dino = None
            if backbones.dino is not None:
                a_dino = dino_last_attention(backbones.dino, normalise(images, backbones.dino_mean, backbones.dino_std)).float()
                if a_dino.shape[-1] != a_clip.shape[-1]:
                    raise ValueError(f"DINO grid ({a_dino.shape[-1]} patches) differs from CLIP's ({a_clip.shape[-1]}); patch sizes must match")

    with torch.no_grad():
        mask = None
        if region_maps is not None:
            mask = sgc_mask(cam, region_maps, num_regions, grid, t_hi=sgc.t_hi, rho=sgc.rho, patch_area=sgc.patch_area, keep_best=sgc.keep_best)
        fused = fuse_affinities(a_clip, a_dino, affinity.clip_weight, affinity.dino_weight)
        out = {}
        for row in rows:
            if row == "cam":
                out[row] = cam
            elif row == "clip":
                out[row] = propagate(a_clip, cam)
            elif row == "dino" and a_dino is not None:
                out[row] = propagate(fused, cam)
            elif row == "sgc" and mask is not None:
                out[row] = propagate(fused, cam, mask)
        chosen = [a for a, use in ((a_clip, affinity.use_clip), (a_dino, affinity.use_dino)) if use and a is not None]
        if not chosen:
            method = cam if not (affinity.use_sgc and mask is not None) else cam * mask
        else:
            a = fuse_affinities(a_clip if affinity.use_clip else None, a_dino if affinity.use_dino else None,
                                affinity.clip_weight, affinity.dino_weight)
            method = propagate(a, cam, mask if affinity.use_sgc else None)
        method = method * valid[..., None]
    return CamPass({k: v * valid[..., None] for k, v in out.items()}, method, visual, grid)


def cams_to_labels(
    cams: torch.Tensor,
    classes: torch.Tensor,
    valid: torch.Tensor,
    grid: tuple[int, int],
    size: tuple[int, int],
    *,
    bg_power: float = 1.0,
    ignore_low: float = 0.0,
    ignore_high: float = 0.0,
) -> torch.Tensor:
    """Patch CAMs (B, S, N) -> label maps (B, H, W) long: 0 background, class + 1, 255 ignore.

    Background score = (1 - max_c CAM) ** bg_power; pixels whose winning score
    lies in [ignore_low, ignore_high) become ignore (off when the two are equal).
    """
    b, s, _ = cams.shape
    up = F.interpolate(cams.reshape(b, s, *grid).float(), size=size, mode="bilinear", align_corners=False)
    up = up.masked_fill(~valid[..., None, None], -1.0)
    background = (1 - up.clamp(0, 1).amax(dim=1, keepdim=True)) ** bg_power
    scores = torch.cat([background, up], dim=1)
    best, index = scores.max(dim=1)
    labels = torch.where(index == 0, torch.zeros_like(index), classes.gather(1, (index - 1).clamp(min=0).flatten(1)).view_as(index) + 1)
    if ignore_high > ignore_low:
        labels = labels.masked_fill((best >= ignore_low) & (best < ignore_high), IGNORE_INDEX)
    return labels
