"""The single-stage SSR model: frozen CLIP (+ DINO), CMPA heads, SGC-refined CAMs, decoder.

`FrozenBackbones` holds what never trains (and never goes into a checkpoint);
`SSR` holds what does. `refined_cams` is the whole CAM path of the paper:
GradCAM through the CMPA heads, then affinity propagation with the SGC mask,
for every ablation row of the paper's Table 3 at once.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ssr.affinity import average_attention, box_mask, fuse_attention, propagate
from ssr.backbones import (
    FrozenCache,
    clip_normalisation,
    clip_visual_forward,
    dino_last_attention,
    dino_normalisation,
    encode_prompts,
    load_clip,
    load_dino,
)
from ssr.cam import gradcam, gradcam_at_qkv, present_class_probs
from ssr.cmpa import Prototypes, Temperature, build_head
from ssr.config import AffinityParams, CmpaParams, DatasetParams, PseudoLabelParams, SgcParams, TrainParams
from ssr.data.layout import IGNORE_INDEX
from ssr.data.transforms import normalise
from ssr.decoder import SegDecoder
from ssr.par import par_refine
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
    cache: FrozenCache = field(default_factory=FrozenCache)  # the fast path's casts of these weights (ssr.backbones)

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
                    clip=None, tokenizer=None, dino=None, demo_dino_dir: str | Path | None = None) -> FrozenBackbones:
    """Load (or take) the frozen models and encode the prompts once.

    class_names: foreground names (no "background"); they are prompted with
    `ds.prompt_names` where given (CLIP-ES synonyms). `clip`/`tokenizer`/`dino` may be
    given directly (tests pass tiny random-init models); otherwise they are loaded from
    the dataset's params.
    """
    if clip is None:
        clip, tokenizer = load_clip(ds.clip_model, ds.clip_pretrained, demo_dir=demo_clip_dir, device=device)
    if dino is None and ds.dino_model:
        dino = load_dino(ds.dino_model, weights=ds.dino_weights or None, demo_dir=demo_dino_dir, device=device)
    names = ds.prompt_name_list(class_names) + list(ds.background_prompts)
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


@dataclass(frozen=True)
class ModelDims:
    """Everything that fixes the shapes of an SSR model; stored with its weights."""
    embed_dim: int          # CLIP's joint embedding width (d1)
    width: int              # CLIP ViT width (decoder input)
    depth: int              # CLIP ViT blocks; the decoder reads the first depth - 1
    num_foreground: int
    decoder_width: int
    decoder_layers: int
    decoder_heads: int

    @classmethod
    def of(cls, backbones: FrozenBackbones) -> ModelDims:
        """WeCLIP's 256-wide, 3-layer decoder for real CLIPs; 64 x 1 for a tiny demo CLIP."""
        wide = backbones.width >= 256
        return cls(backbones.embed_dim, backbones.width, backbones.depth, backbones.num_foreground,
                   256 if wide else 64, 3 if wide else 1, 8 if wide else 4)


class SSR(nn.Module):
    """Everything SSR trains: ISA, TSA, tau and the prototypes (CMPA), and the decoder."""

    def __init__(self, dims: ModelDims, cmpa: CmpaParams):
        super().__init__()
        self.dims = dims
        self.use_cmpa = cmpa.enabled
        self.cmpa_loss = cmpa.loss
        e = dims.embed_dim
        proj = e if cmpa.head == "residual" else min(cmpa.proj_dim, e)
        self.isa = build_head(cmpa.head, e, proj, cmpa.hidden_dim, cmpa.num_layers)
        self.tsa = build_head(cmpa.head, e, proj, cmpa.hidden_dim, cmpa.num_layers)
        self.tau = Temperature(cmpa.tau_init)
        self.prototypes = Prototypes(dims.num_foreground, proj)
        self.decoder = SegDecoder(dims.width, dims.depth - 1, dims.num_foreground + 1,
                                  width=dims.decoder_width, layers=dims.decoder_layers, heads=dims.decoder_heads)

    def adapt_patches(self, dense: torch.Tensor) -> torch.Tensor:
        """ISA on patch embeddings (B, N, E) -> (B, N, d2); the identity without CMPA."""
        return self.isa(dense) if self.use_cmpa else dense

    def adapt_text(self, text: torch.Tensor) -> torch.Tensor:
        """TSA on prompt embeddings (C, E) -> (C, d2); the identity without CMPA."""
        return self.tsa(text) if self.use_cmpa else text


def amp_dtype(train: TrainParams, device: torch.device) -> torch.dtype | None:
    """bf16 on a GPU when `train.amp_bf16`; None (fp32) on CPU, where bf16 kernels are slower."""
    return torch.bfloat16 if device.type == "cuda" and train.amp_bf16 else None


def autocast(device_type: str, dtype: torch.dtype | None):
    """Autocast to `dtype`; None turns it off, so that no enclosing autocast reaches the fp32 path."""
    return torch.autocast(device_type, dtype=dtype) if dtype else torch.autocast(device_type, enabled=False)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """BatchNorm in train mode couples the images of a batch; the CAM pass must not."""
    states = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, state in zip(modules, states, strict=True):
            m.train(state)


@contextlib.contextmanager
def batch_statistics(*modules: nn.Module):
    """Train mode (BatchNorm normalises by the batch, as in the training loss) with every running
    statistic restored afterwards: features computed outside a training step leave no trace."""
    states = [m.training for m in modules]
    saved = [{k: v.clone() for k, v in m.named_buffers()} for m in modules]
    for m in modules:
        m.train()
    try:
        yield
    finally:
        for m, state, buffers in zip(modules, states, saved, strict=True):
            m.train(state)
            for name, value in m.named_buffers():
                value.copy_(buffers[name])


@dataclass
class CamPass:
    cam: torch.Tensor                  # (B, S, N) GradCAM in [0, 1]: Table 3's first row, and Eq. 2's pooling weights
    method: torch.Tensor               # (B, S, N) the configured method's refined CAM
    rows: dict[str, torch.Tensor]      # requested Table 3 rows -> (B, S, N) in [0, 1]
    visual: object                     # ClipVisualOutput (tokens for the decoder, dense embeddings)
    grid: tuple[int, int]


def initial_cams(backbones: FrozenBackbones, model: SSR, images: torch.Tensor, classes: torch.Tensor, valid: torch.Tensor,
                 *, attn_blocks: int, cmpa: bool = True, fast: bool = False):
    """CLIP-ES GradCAM through the CMPA heads: -> (cams (B, S, N), ClipVisualOutput).

    The scored image embedding is the mean over patches of ISA(ln_post(patch) @ proj), so
    ISA sees the same per-patch features here as in Eq. 2's pooling; without CMPA (or with
    `cmpa=False`, Table 4's CLIP row) it is CLIP-ES's mean patch embedding. Softmax over each
    image's present classes and all background prompts; gradients at the last block's ln_1.
    `fast`: the fast CLIP forward and one batched backward (`gradcam`'s `batched`; for the
    "gradcam" weighting stopped at the qkv projection, `gradcam_at_qkv`): same CAMs to rounding.
    """
    at_qkv = fast and backbones.cam_weighting == "gradcam"
    visual = clip_visual_forward(backbones.clip.visual, normalise(images, backbones.clip_mean, backbones.clip_std),
                                 attn_blocks=attn_blocks, cam_block=-1, cam_grad=True, fast=fast, cam_at_qkv=at_qkv,
                                 cache=backbones.cache)
    use_heads = cmpa and model.use_cmpa
    with eval_mode(model.isa, model.tsa), torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
        dense = visual.dense.float()
        image_emb = (model.isa(dense) if use_heads else dense).mean(dim=1)
        text_emb = model.tsa(backbones.text) if use_heads else backbones.text
        probs = present_class_probs(image_emb, text_emb, backbones.clip.logit_scale.exp().float(), classes, valid,
                                    backbones.num_foreground)
        if at_qkv:
            cams = gradcam_at_qkv(visual.cam_activations, visual.cam_qkv, visual.cam_in_proj_weight, probs, valid)
        else:
            cams = gradcam(visual.cam_activations, probs, valid, weighting=backbones.cam_weighting, batched=fast)
    return cams, visual


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
    fast: bool = False,
    dino_attention: torch.Tensor | None = None,
) -> CamPass:
    """Initial CAM -> affinity propagation -> SGC, for an image batch.

    images (B, 3, H, W) in [0, 1]; classes/valid (B, S) from `cam.class_slots`;
    region_maps (B, H, W) long or None (then the sgc row is left out and the method uses the rows' mask).
    The rows without SGC (+ CLIP, + DINO) propagate inside CLIP-ES's boxes (`affinity.box_mask`);
    the SGC row inside its target regions (and the boxes, with `sgc.within_box`).
    Returns the CAMs of the requested Table 3 rows and of the configured method.
    `fast`: the training step's fast operators (`initial_cams`, DINO, SGC), same CAMs to rounding.
    `dino_attention` (B, N, N): an A_DINO to use in place of the DINO backbone's, for what-if readings
    of Eq. 9 (`experiments/affinity_bounds.py`); None = the backbone's (none without DINO).
    """
    with autocast(images.device.type, autocast_dtype):
        cam, visual = initial_cams(backbones, model, images, classes, valid, attn_blocks=affinity.clip_blocks, fast=fast)
        grid = visual.grid
        with torch.no_grad():
            depth = backbones.depth
            a_clip = visual.patch_attention if fast else average_attention(
                [visual.attentions[i] for i in range(max(0, depth - affinity.clip_blocks), depth)])
            a_dino = dino_attention.float() if dino_attention is not None else None
            if a_dino is None and backbones.dino is not None:
                a_dino = dino_last_attention(backbones.dino, normalise(images, backbones.dino_mean, backbones.dino_std),
                                             fast=fast, cache=backbones.cache).float()
            if a_dino is not None and a_dino.shape[-1] != a_clip.shape[-1]:
                raise ValueError(f"DINO grid ({a_dino.shape[-1]} patches) differs from CLIP's ({a_clip.shape[-1]}); "
                                 f"patch sizes must match")

    with torch.no_grad():
        # CLIP-ES's boxes go through the host (OpenCV), a device sync: made only where a row or the method uses them
        box = functools.cache(lambda: box_mask(cam, grid, affinity.box_threshold))
        sgc_columns = None
        if region_maps is not None:
            sgc_columns = sgc_mask(cam, region_maps, num_regions, grid, t_hi=sgc.t_hi, rho=sgc.rho, patch_area=sgc.patch_area,
                                   keep_best=sgc.keep_best, denominator=sgc.denominator, fast=fast)
            if sgc.within_box:
                sgc_columns = sgc_columns * box()

        def rows_box() -> torch.Tensor | None:  # CLIP-ES's mask of the rows without SGC
            return box() if affinity.box_mask else None

        @functools.cache  # the rows share affinities; each is a matrix power over (B, N, N)
        def fused(use_clip: bool, use_dino: bool) -> torch.Tensor:
            return fuse_attention(a_clip if use_clip else None, a_dino if use_dino else None, affinity.clip_weight,
                                  affinity.dino_weight, order=affinity.fusion, rounds=affinity.sinkhorn_rounds,
                                  power=affinity.power)

        out = {}
        for row in rows:
            if row == "cam":
                out[row] = cam
            elif row == "clip":
                out[row] = propagate(fused(True, False), cam, rows_box())
            elif row == "dino" and a_dino is not None:
                out[row] = propagate(fused(True, True), cam, rows_box())
            elif row == "sgc" and sgc_columns is not None:
                out[row] = propagate(fused(True, a_dino is not None), cam, sgc_columns)
        use_dino = affinity.use_dino and a_dino is not None
        sgc_on = affinity.use_sgc and sgc_columns is not None
        if affinity.use_clip or use_dino:
            method = propagate(fused(affinity.use_clip, use_dino), cam, sgc_columns if sgc_on else rows_box())
        else:  # no propagation, so no box: the CAM row, or the CAM inside its SGC target regions
            method = cam * sgc_columns if sgc_on else cam
        method = method * valid[..., None]
    return CamPass(cam, method, {k: v * valid[..., None] for k, v in out.items()}, visual, grid)


def cams_to_labels(
    cams: torch.Tensor,
    classes: torch.Tensor,
    valid: torch.Tensor,
    grid: tuple[int, int],
    size: tuple[int, int],
    pl: PseudoLabelParams,
    *,
    images: torch.Tensor | None = None,
    par: bool = False,
    fast: bool = False,
) -> torch.Tensor:
    """Patch CAMs (B, S, N) -> label maps (B, H, W) long: 0 background, class + 1, 255 ignore.

    Background score = (1 - max_c CAM) ** bg_power; with `par`, the scores are refined by
    PAR on `images` (B, 3, H, W) in [0, 1] at `size` before the argmax (WeCLIP's online
    labels). Pixels whose winning score lies in [ignore_low, ignore_high) become ignore
    (off when the two are equal). `fast`: PAR through `ssr.par_triton` on CUDA (backend
    "auto"), skipping the padded slots' channels, which come out -1 either way.
    """
    b, s, _ = cams.shape
    up = F.interpolate(cams.reshape(b, s, *grid).float(), size=size, mode="bilinear", align_corners=False)
    up = up.masked_fill(~valid[..., None, None], -1.0)
    background = (1 - up.clamp(0, 1).amax(dim=1, keepdim=True)) ** pl.bg_power
    scores = torch.cat([background, up], dim=1)
    if par:
        if images is None:
            raise ValueError("PAR refinement needs the images")
        active = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)  # background and the valid class slots
        refined = par_refine(images, scores.clamp_min(0), dilations=pl.par_dilations, iterations=pl.par_iterations,
                             w_colour=pl.par_w_colour, w_position=pl.par_w_position, backend="auto" if fast else "torch",
                             active=active if fast else None)
        scores = refined.masked_fill(~active[..., None, None], -1.0)
    best, index = scores.max(dim=1)
    foreground = classes.gather(1, (index - 1).clamp(min=0).flatten(1)).view_as(index) + 1
    labels = torch.where(index == 0, torch.zeros_like(index), foreground)
    if pl.ignore_high > pl.ignore_low:
        labels = labels.masked_fill((best >= pl.ignore_low) & (best < pl.ignore_high), IGNORE_INDEX)
    return labels
