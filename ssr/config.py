"""Typed, validated view of params.yaml.

Each section of params.yaml is a frozen pydantic model; every field carries its meaning
(`description`), its bounds and its source (`json_schema_extra["source"]`: P = the SSR
paper, W = WeCLIP's reference code, O = our choice; the comment on its params.yaml line
says the same and is the text the description repeats, which tests/test_config.py checks).
Validation reports every problem at once, one line per dotted key:

    train_presets.demo.lr: must be > 0, got -1.0
    sgc.colour: unknown key (did you mean 'rho'?)

`ssr schema` writes the same models as JSON Schema (workflow/schemas/params.schema.json),
which the Snakefile checks params.yaml against. The per-site paths (`data_root`,
`results_root`, `weights_root`) may also come from params.local.yaml or SSR_DATA_ROOT /
SSR_RESULTS_ROOT / SSR_WEIGHTS_ROOT (`ssr.site`).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ssr.cam import CAM_WEIGHTINGS
from ssr.site import SiteError, apply_site


class ConfigError(ValueError):
    """params.yaml has unknown keys, wrong types or out-of-range values (one line each)."""


# Table 4's readings of L_proto (ssr.cmpa.sample_loss_sum, prototype_loss_term).
CMPA_LOSSES = ("cross_modal", "in_modal", "feature")
SEGMENTERS = ("deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "lraspp_mobilenet_v3_large")
# Where a value comes from, for the fields whose value (and source) differs per dataset or preset:
# each entry's params.yaml comment says it.
PER_ENTRY = "per entry (see its params.yaml comment)"
OFFICIAL = "official"


def _f(default: Any = ..., description: str = "", source: str = "O", **bounds) -> Any:
    """A field with its description, its source (P, W, O) and its bounds (ge, gt, le, lt, min_length)."""
    return Field(default, description=description, json_schema_extra={"source": source}, **bounds)


def _problems(problems: list[tuple[str, str]]) -> None:
    """Raise every cross-field problem of one model at once: (key relative to the model, message) pairs."""
    if problems:
        raise PydanticCustomError("ssr_checks", "{text}", {"text": "; ".join(f"{k}: {m}" for k, m in problems),
                                                          "problems": problems})


class Section(BaseModel):
    """A params.yaml section: immutable, strict types (an int is also a float, nothing else converts), no unknown keys."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class DemoParams(Section):
    """The offline procedural dataset (README, "The offline demo")."""

    seed: int = _f(0, "same seed -> byte-identical dataset", ge=0)
    image_size: int = _f(64, "square images, pixels", ge=16, le=1024)
    num_train: int = _f(400, "train split size", ge=1)
    num_val: int = _f(100, "val split size", ge=1)
    classes: list[str] = _f(["circle", "square", "triangle", "cross"], "class = shape; colour and texture are distractors",
                            min_length=1)
    min_objects: int = _f(1, "objects per image, inclusive", ge=1, le=8)
    max_objects: int = _f(3, "most objects per image", ge=1, le=8)
    min_object_size: float = _f(0.28, "object bounding-box side as a fraction of the image side", ge=0.05, le=1.0)
    max_object_size: float = _f(0.45, "largest object bounding-box side as a fraction of the image side", ge=0.05, le=1.0)
    max_overlap: float = _f(0.25, "an object may hide at most this share of its area under earlier ones", ge=0.0, le=1.0)
    texture_contrast: float = _f(60.0, "max per-channel difference of a background's two colours", ge=0.0, le=255.0)
    max_rotation: float = _f(0.0, "rotation range, degrees either way; upright: the tiny CLIP learns rotated shapes far slower "
                                  "(README)", ge=0.0, le=180.0)

    @model_validator(mode="after")
    def _ranges(self) -> DemoParams:
        problems = []
        if self.min_objects > self.max_objects:
            problems.append(("min_objects", f"{self.min_objects} exceeds max_objects {self.max_objects}"))
        if self.min_object_size > self.max_object_size:
            problems.append(("min_object_size", f"{self.min_object_size} exceeds max_object_size {self.max_object_size}"))
        _problems(problems)
        return self


class DemoClipParams(Section):
    """The tiny open_clip model pretrained on demo captions (`ssr demo-clip`)."""

    checkpoint: str = _f("ssr/assets/demo_clip/open_clip_model.safetensors", "committed product of the stage")
    seed: int = _f(0, "pretraining seed", ge=0)
    embed_dim: int = _f(64, "joint embedding width", ge=8)
    vision_width: int = _f(128, "ViT width: sized for CPU pretraining", ge=8)
    vision_layers: int = _f(4, "ViT blocks", ge=1)
    vision_heads: int = _f(4, "ViT attention heads", ge=1)
    patch_size: int = _f(8, "64 px -> 8x8 patch grid", ge=2)
    text_width: int = _f(64, "text transformer width", ge=8)
    text_layers: int = _f(2, "text transformer blocks", ge=1)
    text_heads: int = _f(2, "text transformer attention heads", ge=1)
    context_length: int = _f(16, "captions are short", ge=4)
    steps: int = _f(12000, "optimiser steps; held-out mAP flattens from about 6,000 (README)", ge=1)
    batch_size: int = _f(64, "captioned images per step", ge=2)
    single_object_fraction: float = _f(0.5, "share of single-object pretraining images: clean captions speed up learning",
                                       ge=0.0, le=1.0)
    lr: float = _f(3e-4, "AdamW, cosine after warmup; 1e-3 learnt shapes slower in trials", gt=0.0)
    weight_decay: float = _f(0.05, "AdamW weight decay (not on embeddings, gains and biases)", ge=0.0)
    warmup: int = _f(500, "steps", ge=0)
    eval_images: int = _f(400, "held-out images for zero-shot mAP", ge=8)
    threads: int = _f(2, "torch CPU threads", ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> DemoClipParams:
        _problems([(f"{tower}_heads", f"must divide {tower}_width {width}, got {heads}")
                   for tower, width, heads in (("vision", self.vision_width, self.vision_heads),
                                               ("text", self.text_width, self.text_heads)) if width % heads])
        return self


class DemoDinoParams(Section):
    """The tiny timm ViT pretrained by DINO self-distillation and masked denoising on unlabelled demo images (`ssr demo-dino`)."""

    checkpoint: str = _f("ssr/assets/demo_dino/model.safetensors", "committed product of the stage")
    seed: int = _f(0, "pretraining seed", ge=0)
    width: int = _f(128, "ViT width: sized for CPU pretraining, as the demo CLIP's", ge=8)
    depth: int = _f(4, "ViT blocks", ge=1)
    heads: int = _f(4, "ViT attention heads", ge=1)
    patch_size: int = _f(8, "64 px -> 8x8 patch grid, the demo CLIP's", ge=2)
    head_hidden: int = _f(512, "projection MLP width (DINO: 2048)", ge=8)
    head_bottleneck: int = _f(128, "width before the prototype layer (DINO: 256)", ge=8)
    prototypes: int = _f(1024, "output dimension K (DINO: 65536)", ge=2)
    steps: int = _f(1000, "optimiser steps: 24 min on 2 CPU threads (README)", ge=1)
    batch_size: int = _f(64, "images per step", ge=2)
    local_crops: int = _f(6, "local views per image besides the 2 global ones (DINO: 8 or 10)", ge=0)
    local_size: int = _f(32, "local view side, pixels; global views keep demo.image_size (DINO: 96 vs 224)", ge=8)
    global_scale_min: float = _f(0.4, "global crops cover this to all of the image area (DINO: 0.4)", gt=0.0, le=1.0)
    local_scale_min: float = _f(0.05, "local crops cover at least this share of the image area (DINO: 0.05)", gt=0.0, le=1.0)
    local_scale_max: float = _f(0.4, "local crops cover at most this share of the image area (DINO: 0.4)", gt=0.0, le=1.0)
    colour_jitter: float = _f(1.0, "colour-jitter strength; 1 = DINO's (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1)",
                              ge=0.0)
    blur_sigma: float = _f(0.57, "largest Gaussian-blur sigma, pixels (DINO: 2 px at 224 px)", gt=0.0)
    student_temp: float = _f(0.1, "student softmax temperature (DINO: 0.1)", gt=0.0)
    teacher_temp: float = _f(0.04, "teacher temperature, below the student's: sharpening (DINO: 0.04-0.07)", gt=0.0)
    teacher_temp_start: float = _f(0.04, "teacher temperature at step 0 (DINO: 0.04)", gt=0.0)
    teacher_temp_warmup: int = _f(0, "steps of linear warmup to teacher_temp; 0.07 after 300 steps drifted to uniform in trials",
                                  ge=0)
    centre_momentum: float = _f(0.9, "EMA of the teacher-output centre (DINO: 0.9)", ge=0.0, le=1.0)
    teacher_momentum: float = _f(0.996, "teacher EMA momentum at step 0, cosine to 1 at the end (DINO: 0.996)", ge=0.0, le=1.0)
    lr: float = _f(5e-4, "AdamW peak, cosine after warmup (DINO: 0.0005 x batch / 256)", gt=0.0)
    min_lr: float = _f(1e-6, "end of the cosine (DINO: 1e-6)", ge=0.0)
    warmup: int = _f(100, "steps of linear lr warmup", ge=0)
    weight_decay: float = _f(0.04, "weight decay at step 0, cosine to weight_decay_end (DINO: 0.04)", ge=0.0)
    weight_decay_end: float = _f(0.4, "weight decay at the last step (DINO: 0.4)", ge=0.0)
    clip_grad: float = _f(3.0, "gradient-norm clip; 0 = off (DINO: 3.0)", ge=0.0)
    freeze_last_layer: int = _f(100, "steps the prototype layer stays fixed (DINO: 1 epoch)", ge=0)
    denoise_weight: float = _f(1.0, "weight of the masked-denoising patch loss beside DINO's; 0 = DINO alone, whose attention "
                                    "misses the shapes (README)", ge=0.0)
    denoise_sigma: float = _f(0.6, "the denoised view's noise std is drawn per image from 0 to this, pixel units in [0, 1]",
                              ge=0.0)
    denoise_mask: float = _f(0.3, "share of the denoised view's patches the mask token replaces", ge=0.0, le=1.0)
    attention_mass: float = _f(0.6, "attention masks keep the top patches holding this share of the mass (DINO: 0.6)",
                               gt=0.0, le=1.0)
    eval_images: int = _f(400, "held-out dino_eval images for the attention measures", ge=8)
    threads: int = _f(1, "torch CPU threads", ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> DemoDinoParams:
        problems = []
        if self.width % self.heads:
            problems.append(("heads", f"must divide width {self.width}, got {self.heads}"))
        if self.local_scale_min > self.local_scale_max:
            problems.append(("local_scale_min", f"{self.local_scale_min} exceeds local_scale_max {self.local_scale_max}"))
        if self.local_size % self.patch_size:
            problems.append(("local_size", f"must be a multiple of patch_size {self.patch_size}, got {self.local_size}"))
        _problems(problems)
        return self


Overrides = dict[str, Any]


class DatasetParams(Section):
    """One dataset: where it is split, how it is prompted and which backbones and runs it uses."""

    train_split: str = _f(..., "split the model trains on (data/{ds}/splits/{name}.txt)", PER_ENTRY, min_length=1)
    val_split: str = _f(..., "split the evaluate stage scores", PER_ENTRY, min_length=1)
    preset: str = _f(..., "training preset, see train_presets", PER_ENTRY)
    prompt_template: str = _f(..., "CLIP prompt; {} stands for the class name", PER_ENTRY)
    background_prompts: list[str] = _f(..., "background classes prompted beside the foreground classes", PER_ENTRY)
    clip_model: str = _f(..., 'open_clip model name; "demo" = the committed tiny CLIP', PER_ENTRY)
    clip_pretrained: str = _f(..., "open_clip pretrained tag (unused for demo)", PER_ENTRY)
    dino_model: str = _f(..., 'timm model name of the DINO ViT; "demo" = the committed tiny DINO; "" = no DINO (the DINO '
                              'row is skipped)', PER_ENTRY)
    dino_weights: str = _f("", 'a local weights file for dino_model instead of timm\'s download ("" = download)', PER_ENTRY)
    prompt_names: list[str] = _f([], "the text each foreground class is prompted with, in class order; [] = the class names "
                                     "themselves", PER_ENTRY)
    long_side: int = _f(512, "inference resizes the long side to this, pixels", PER_ENTRY, ge=16)
    cam_weighting: Literal[CAM_WEIGHTINGS] = _f(  # type: ignore[valid-type]
        "gradcam", "gradcam: gradient averaged over patches (CLIP-ES); hirescam: each patch weighted by its own gradient",
        PER_ENTRY)
    par: bool = _f(False, "PAR refinement of the online pseudo-labels", PER_ENTRY)
    seed_split: str = _f("train", "split whose ground truth scores the exported seeds", PER_ENTRY, min_length=1)
    seeds: list[Annotated[int, Field(ge=0)]] = _f([0], "training seeds; every metric is their mean, with std, min and max",
                                                  PER_ENTRY, min_length=1)
    gpus: int = _f(1, "training processes; > 1 runs torchrun --nproc_per_node", PER_ENTRY, ge=1)
    variants: dict[str, Overrides] = _f({}, "extra training runs per seed, each the method with these params changed: "
                                            "{name: {dotted.key: value}}", PER_ENTRY)
    overrides: Overrides = _f({}, "params set for this dataset only: {dotted.key: value}", PER_ENTRY)

    @model_validator(mode="after")
    def _consistent(self) -> DatasetParams:
        problems = []
        if "{}" not in self.prompt_template:
            problems.append(("prompt_template", f"must contain '{{}}' where the class name goes, got {self.prompt_template!r}"))
        if len(set(self.seeds)) != len(self.seeds):
            problems.append(("seeds", f"must be distinct, got {self.seeds}"))
        if any(key.startswith("datasets.") for key in self.overrides):
            problems.append(("overrides", "may not change datasets.* (set them in the dataset itself)"))
        for run, overrides in self.variants.items():
            if run == METHOD_RUN or not re.fullmatch(r"[a-z0-9_]+", run):
                problems.append((f"variants.{run}",
                                 f"a variant name is lower-case letters, digits and '_', and not {METHOD_RUN!r}"))
            if not isinstance(overrides, dict) or not overrides:
                problems.append((f"variants.{run}", "expected a non-empty mapping of dotted params keys to values"))
            elif any(key.startswith("datasets.") for key in overrides):
                problems.append((f"variants.{run}", "a variant may not change datasets.*"))
        _problems(problems)
        return self

    def prompt_name_list(self, class_names: list[str]) -> list[str]:
        """The text each foreground class is prompted with: its synonyms, else its name."""
        if not self.prompt_names:
            return list(class_names)
        if len(self.prompt_names) != len(class_names):
            raise ConfigError(f"prompt_names: {len(self.prompt_names)} names for {len(class_names)} foreground classes")
        return list(self.prompt_names)


class DownloadParams(Section):
    """The official archives: URLs and MD5 sums (docs/datasets.md)."""

    voc_url: str = _f(..., "VOC 2012 trainval archive", OFFICIAL)
    voc_md5: str = _f(..., "MD5 of the VOC archive", OFFICIAL)
    sbd_url: str = _f(..., "SBD archive (benchmark.tgz)", OFFICIAL)
    sbd_md5: str = _f(..., "MD5 of the SBD archive", OFFICIAL)
    coco_train_url: str = _f(..., "COCO 2014 train images", OFFICIAL)
    coco_train_md5: str = _f(..., "MD5 of the COCO train archive", OFFICIAL)
    coco_val_url: str = _f(..., "COCO 2014 val images", OFFICIAL)
    coco_val_md5: str = _f(..., "MD5 of the COCO val archive", OFFICIAL)
    coco_annotations_url: str = _f(..., "COCO 2014 train/val annotations", OFFICIAL)
    coco_annotations_md5: str = _f(..., "MD5 of the COCO annotations archive", OFFICIAL)


class SuperpixelParams(Section):
    """SGC step 1: SLIC superpixels, then k-means on their mean colour (paper Eq. 8)."""

    n_segments: int = _f(100, "SLIC target segment count", ge=2)
    compactness: float = _f(10.0, "SLIC compactness", gt=0.0)
    n_clusters: int = _f(64, "k-means clusters on superpixel mean Lab colour (Eq. 8 gives no count); "
                            "64 won on the demo's train split over 8 and 32 (README)", ge=1)
    seed: int = _f(0, "k-means initialisation", ge=0)
    workers: int = _f(2, "parallel processes over images", ge=1)
    backend: Literal["skimage", "opencv"] = _f(
        "opencv", "SLIC implementation: opencv (several times faster, as good on the demo masks: benchmarks/superpixels.py) "
                  "or skimage (the reference)")


class AffinityParams(Section):
    """Attention affinity and propagation (paper Eq. 9-11); the Table 3 switches."""

    use_clip: bool = _f(True, 'Table 3 row "+ CLIP attention"', "P")
    use_dino: bool = _f(True, 'Table 3 row "+ DINO attention"', "P")
    use_sgc: bool = _f(True, 'Table 3 row "+ SGC mask"', "P")
    clip_weight: float = _f(0.4, "A = 0.4 A_CLIP + 0.6 A_DINO", "P", ge=0.0)
    dino_weight: float = _f(0.6, "weight of A_DINO in the fusion", "P", ge=0.0)
    clip_blocks: int = _f(8, "average the attention of the last 8 blocks (capped at depth)", "W", ge=1)
    sinkhorn_rounds: int = _f(3, "alternating column/row normalisation rounds", "W", ge=0)
    power: int = _f(2, "square the symmetrised affinity", "W", ge=1)
    fusion: Literal["transform_then_fuse", "fuse_then_transform"] = _f(
        "transform_then_fuse", "Eq. 9 leaves open whether the CLIP-ES transform comes before the 0.4:0.6 fusion "
                               "(transform_then_fuse) or after it (fuse_then_transform); chosen on the train split (README)")
    box_mask: bool = _f(True, "CLIP-ES's box mask on the propagation of the Table 3 rows without SGC and of the method when "
                              "use_sgc is false", "W")
    box_threshold: float = _f(0.4, "CLIP-ES's box threshold, a share of the CAM's maximum (VOC 0.4, COCO 0.7)", "W",
                              ge=0.0, le=1.0)


class SgcParams(Section):
    """Superpixel-guided target regions (paper Eq. 7-8)."""

    t_hi: float = _f(0.5, "high-confidence CAM threshold; paper leaves it unnamed", ge=0.0, le=1.0)
    rho: float = _f(0.3, "min share of high-confidence activation for a target region; chosen on the train split (README)",
                    ge=0.0, le=1.0)
    patch_area: float = _f(0.5, "a patch belongs to a region if more than this share of it lies there", ge=0.0, le=1.0)
    keep_best: bool = _f(True, "a class with no region over rho keeps its best region, never vanishes")
    denominator: Literal["region", "image"] = _f(
        "region", "\"the total activation\" of Eq. 8: the region's own (region) or the image's (image); chosen on the train "
                  "split (README)")
    within_box: bool = _f(False, "SGC's column mask intersected with CLIP-ES's box mask (true) or in its place (false); "
                                 "chosen on the train split (README)")


class CmpaParams(Section):
    """Cross-Modal Prototype Alignment (paper Eq. 1-6)."""

    enabled: bool = _f(True, "CMPA heads and prototype loss on; off = plain CLIP features", "P")
    head: Literal["projection", "residual"] = _f(
        "residual", "ISA/TSA: x + MLP(x), the MLP's last Linear zero-initialised, so training starts from CLIP-ES's CAM; "
                    "\"projection\" = the paper's Linear+BN+ReLU d1 -> d2, whose CAM starts as a random map (README)")
    proj_dim: int = _f(256, "d2 of the projection heads: the paper reduces the width but gives no value; capped at d1", ge=1)
    hidden_dim: int = _f(512, "MLP width of ISA and TSA", ge=1)
    num_layers: int = _f(2, "stacked layers; (O) depth", "P", ge=1)
    tau_init: float = _f(0.05, "learnable temperature, initial value", "P", gt=0.0)
    loss: Literal[CMPA_LOSSES] = _f("cross_modal", "Table 4: cross_modal (the method), in_modal, feature", "P")  # type: ignore[valid-type]
    text_prototype_term: bool = _f(True, "constraint (2): text prototypes gather with same-class visual prototypes", "P")
    positive: Literal["class", "nearest_prototype"] = _f(
        "class", "pos_idx (Eq. 4-5): constraint (1), the text prototype of the sample's own class; "
                 "\"nearest_prototype\" = the class of its nearest image prototype (O)", "P")
    text_prototypes: Literal["live", "snapshot"] = _f(
        "live", "P_T of the sample term: the current projected prompts (live) or those of the last refresh (snapshot); "
                "chosen on the train split (README)")
    kmeans_iters: int = _f(0, "0 = P_I is each class's mean stored feature (k-means stopped at its class seed); "
                              "> 0 = free k-means iterations, clusters relabelled to classes", ge=0)


class PseudoLabelParams(Section):
    """Online and exported pseudo-labels (WeCLIP's conventions, PAR)."""

    bg_power: float = _f(1.0, "background score = (1 - max_c CAM) ** bg_power", "W", gt=0.0)
    ignore_low: float = _f(0.0, "scores in [ignore_low, ignore_high) -> 255; equal = off", ge=0.0, le=1.0)
    ignore_high: float = _f(0.0, "upper end of the ignore band", ge=0.0, le=1.0)
    par_iterations: int = _f(20, "PAR propagation steps", "W", ge=1)
    par_dilations: list[Annotated[int, Field(ge=1)]] = _f([1, 2, 4, 8, 12, 24], "PAR neighbourhood dilations, pixels", "W",
                                                         min_length=1)
    par_w_colour: float = _f(0.3, "PAR colour-affinity temperature", "W", gt=0.0)
    par_w_position: float = _f(0.01, "PAR weight of the neighbour-distance term", "W", ge=0.0)
    figures: int = _f(4, "images drawn per selection, a fixed random sample and the lowest-mIoU ones (2x this in all): "
                         "pseudo_labels' CAM figures, evaluate's prediction strips", ge=0)

    @model_validator(mode="after")
    def _band(self) -> PseudoLabelParams:
        if self.ignore_low > self.ignore_high:
            _problems([("ignore_low", f"{self.ignore_low} exceeds ignore_high {self.ignore_high}")])
        return self


def usable_cpus() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_cpus(at_most: int) -> int:
    """DataLoader workers for "auto": the cores this process may run on, less one for itself, at most `at_most`."""
    return max(0, min(usable_cpus() - 1, at_most))


class TrainParams(Section):
    """Training run settings shared by every preset."""

    amp_bf16: bool = _f(True, "bf16 autocast on GPU; ignored on CPU")
    checkpoint_every: int = _f(500, "iterations between checkpoints", ge=1)
    log_every: int = _f(10, "iterations between dvclive points", ge=1)
    affinity_loss: bool = _f(True, "decoder affinity loss, weight in the preset", "W")
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = _f(
        "auto", "dataloader workers; auto = the CPU cores this process may use, less one for it, at most 16")
    supervision: Literal["pseudo", "gt"] = _f(
        "pseudo", "pseudo = the method's online labels; gt = true masks, the fully supervised bound (diagnosis only)")
    decode_cache: bool = _f(False, "keep decoded images and region maps as raw arrays in {results_root}/{ds}/decoded: about "
                                   "40% less CPU per training crop, VOC about 8 GB of disk (README, Speed and memory)")
    fast_path: bool = _f(True, "the step's fast operators (Triton PAR on CUDA, batched GradCAM, SDPA...); false = the "
                               "reference ones, same results to float rounding (README, Speed and memory)")

    @field_validator("num_workers", mode="after")
    @classmethod
    def _resolve_workers(cls, value: int | str) -> int:
        return available_cpus(16) if value == "auto" else value


class PresetParams(Section):
    """A training schedule, selected per dataset by datasets.{ds}.preset."""

    batch_size: int = _f(16, "images per optimiser step, all accumulated micro-batches together", PER_ENTRY, ge=1)
    accumulation: int = _f(1, "micro-batches per optimiser step; divides batch_size", PER_ENTRY, ge=1)
    iterations: int = _f(300, "optimiser steps", PER_ENTRY, ge=1)
    lr: float = _f(1e-3, "AdamW learning rate of the CMPA heads (poly decay after warmup)", PER_ENTRY, gt=0.0)
    weight_decay: float = _f(0.002, "AdamW weight decay", PER_ENTRY, ge=0.0)
    decoder_lr_mult: float = _f(1.0, "the decoder's learning rate is lr times this", PER_ENTRY, gt=0.0)
    warmup: int = _f(0, "iterations of linear lr warmup", PER_ENTRY, ge=0)
    gamma: float = _f(0.1, "L = L_proto + gamma L_seg", PER_ENTRY, ge=0.0)
    affinity_weight: float = _f(0.1, "weight of the decoder affinity loss", PER_ENTRY, ge=0.0)
    crop_size: int = _f(320, "training crop side, pixels", PER_ENTRY, ge=16)
    scale_min: float = _f(0.5, "smallest random rescale factor of a training image", PER_ENTRY, gt=0.0)
    scale_max: float = _f(2.0, "largest random rescale factor of a training image", PER_ENTRY, gt=0.0)
    refresh_every: int = _f(5000, "iterations between prototype (k-means) refreshes", PER_ENTRY, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> PresetParams:
        problems = []
        if self.scale_min > self.scale_max:
            problems.append(("scale_min", f"{self.scale_min} exceeds scale_max {self.scale_max}"))
        if self.batch_size % self.accumulation:
            problems.append(("accumulation", f"must divide batch_size {self.batch_size}, got {self.accumulation}"))
        _problems(problems)
        return self


class InferParams(Section):
    """Evaluation inference: multi-scale + flip, DenseCRF (WeCLIP's settings)."""

    scales: list[Annotated[float, Field(gt=0.0)]] = _f([1.0, 0.75], "inference scales, averaged", "W", min_length=1)
    flip: bool = _f(True, "also average the horizontally flipped image", "W")
    crf: bool = _f(True, "DenseCRF post-processing (both figures are reported)", "W")
    crf_iterations: int = _f(10, "DenseCRF mean-field iterations", "W", ge=1)
    crf_pos_xy_std: float = _f(3.0, "DenseCRF smoothness kernel std, pixels", "W", gt=0.0)
    crf_pos_w: float = _f(3.0, "DenseCRF smoothness kernel weight", "W", ge=0.0)
    crf_bi_xy_std: float = _f(64.0, "DenseCRF appearance kernel position std, pixels", "W", gt=0.0)
    crf_bi_rgb_std: float = _f(5.0, "DenseCRF appearance kernel colour std", "W", gt=0.0)
    crf_bi_w: float = _f(4.0, "DenseCRF appearance kernel weight", "W", ge=0.0)
    crf_reference_size: int = _f(500, "the stds above are for ~500 px images; scaled by long side / this (0 = never scaled)",
                                 ge=0)
    crf_max_side: int = _f(1024, "DenseCRF runs at most at this long side, then its probabilities are upsampled "
                                 "(0 = always at the image's size)", ge=0)


class RetrainParams(Section):
    """The optional multi-stage protocol: a fully supervised segmenter on the exported pseudo-labels."""

    enabled: bool = _f(False, "off by default")
    model: Literal[SEGMENTERS] = _f("deeplabv3_resnet50", "torchvision segmenter")  # type: ignore[valid-type]
    iterations: int = _f(20000, "SGD steps", ge=1)
    batch_size: int = _f(16, "images per step (BatchNorm needs 2 or more)", ge=2)
    lr: float = _f(0.01, "SGD, poly", gt=0.0)
    crop_size: int = _f(512, "training crop side, pixels", ge=16)
    scale_min: float = _f(0.5, "random rescale range of the crops", gt=0.0)
    scale_max: float = _f(2.0, "largest random rescale factor of the crops", gt=0.0)
    momentum: float = _f(0.9, "SGD", ge=0.0, le=1.0)
    weight_decay: float = _f(1e-4, "SGD weight decay", ge=0.0)
    weights_backbone: str = _f("", 'torchvision backbone weights, e.g. IMAGENET1K_V1 (downloads); "" = random init')

    @model_validator(mode="after")
    def _consistent(self) -> RetrainParams:
        if self.scale_min > self.scale_max:
            _problems([("scale_min", f"{self.scale_min} exceeds scale_max {self.scale_max}")])
        return self


# The run that trains the configured method; variants are named in datasets.{ds}.variants.
METHOD_RUN = "method"


class Params(Section):
    """params.yaml: the one configuration file (Snakemake configfile, DVC params)."""

    model_config = ConfigDict(title="SSR params.yaml")

    data_root: str = _f(..., "datasets live in data/{ds}/ (per site: params.local.yaml or $SSR_DATA_ROOT)", min_length=1)
    results_root: str = _f(..., "stage outputs live in results/ (per site: params.local.yaml or $SSR_RESULTS_ROOT)",
                           min_length=1)
    weights_root: str = _f(..., "CLIP and DINO weights that `ssr weights` fetches, shared by the datasets (per site: "
                              "params.local.yaml or $SSR_WEIGHTS_ROOT)", min_length=1)
    progress_interval: float = _f(10.0, "seconds between progress lines in a stage's log when stderr is not a terminal "
                                        "(Snakemake, DVC, SLURM); 0 = every step", ge=0.0)
    demo: DemoParams = _f(..., DemoParams.__doc__, PER_ENTRY)
    demo_clip: DemoClipParams = _f(..., DemoClipParams.__doc__, PER_ENTRY)
    demo_dino: DemoDinoParams = _f(..., DemoDinoParams.__doc__, PER_ENTRY)
    datasets: dict[str, DatasetParams] = _f(..., "per dataset: where it lives and how it is split", PER_ENTRY)
    download: DownloadParams = _f(..., DownloadParams.__doc__, OFFICIAL)
    superpixels: SuperpixelParams = _f(..., SuperpixelParams.__doc__, PER_ENTRY)
    affinity: AffinityParams = _f(..., AffinityParams.__doc__, PER_ENTRY)
    sgc: SgcParams = _f(..., SgcParams.__doc__, PER_ENTRY)
    cmpa: CmpaParams = _f(..., CmpaParams.__doc__, PER_ENTRY)
    pseudo_labels: PseudoLabelParams = _f(..., PseudoLabelParams.__doc__, PER_ENTRY)
    train: TrainParams = _f(..., TrainParams.__doc__, PER_ENTRY)
    train_presets: dict[str, PresetParams] = _f(..., "training schedules, selected per dataset by datasets.{ds}.preset",
                                                PER_ENTRY)
    infer: InferParams = _f(..., InferParams.__doc__, PER_ENTRY)
    retrain: RetrainParams = _f(..., RetrainParams.__doc__, PER_ENTRY)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Params:
        # The demo backbones see whole demo images: a patch grid that does not tile them would drop pixels.
        problems = [(f"{model}.patch_size", f"must divide demo.image_size {self.demo.image_size}, got {patch}")
                    for model, patch in (("demo_clip", self.demo_clip.patch_size), ("demo_dino", self.demo_dino.patch_size))
                    if self.demo.image_size % patch]
        for name, ds in self.datasets.items():
            if ds.preset not in self.train_presets:
                problems.append((f"datasets.{name}.preset",
                                 f"unknown preset {ds.preset!r}{_suggestion(ds.preset, list(self.train_presets))}"))
        # The overridden params of each dataset and variant must be valid params too. Checked once,
        # at the top: the params they make are validated without this step (no recursion).
        if not (info.context or {}).get("overridden"):
            own = {f"{key}: {message}" for key, message in problems}
            raw = self.model_dump()
            for name, ds in self.datasets.items():
                todo = [(f"datasets.{name}.overrides", ds.overrides)] if ds.overrides else []
                todo += [(f"datasets.{name}.variants.{run}", v) for run, v in ds.variants.items() if isinstance(v, dict) and v]
                for where, overrides in todo:
                    try:
                        Params.model_validate(_override(raw, overrides), context={"overridden": True})
                    except (ConfigError, ValidationError) as err:
                        # A problem of the params themselves is reported once, not again per override.
                        problems += [(where, line) for line in _lines(err) if line not in own]
        _problems(problems)
        return self

    def dataset(self, name: str) -> DatasetParams:
        if name not in self.datasets:
            raise ConfigError(f"datasets.{name}: unknown dataset (known: {', '.join(self.datasets)})")
        return self.datasets[name]

    def preset(self, dataset: str) -> PresetParams:
        name = self.dataset(dataset).preset
        if name not in self.train_presets:
            raise ConfigError(f"datasets.{dataset}.preset: unknown preset {name!r} (known: {', '.join(self.train_presets)})")
        return self.train_presets[name]

    def dataset_root(self, name: str) -> Path:
        self.dataset(name)
        return Path(self.data_root) / name

    def for_dataset(self, dataset: str) -> Params:
        """These params with the dataset's own `overrides` applied (every stage of that dataset reads these)."""
        overrides = self.dataset(dataset).overrides
        if not overrides:
            return self
        return self.with_overrides(overrides, f"datasets.{dataset}.overrides: ")

    def with_overrides(self, overrides: dict, where: str = "") -> Params:
        """These params with dotted-key `overrides` set, validated; ConfigError (each line after `where`)
        for a key params.yaml does not have or a value it does not accept."""
        return _validated(_override(self.model_dump(), overrides), where)

    def shadowed(self, dataset: str) -> list[tuple[str, Any, Any]]:
        """(dotted key, top-level value, the dataset's value) for each key the dataset's `overrides`
        sets to something else: an edit of that key at the top level does not reach the dataset."""
        raw = self.model_dump()
        out = []
        for dotted, value in self.dataset(dataset).overrides.items():
            node = raw
            for key in str(dotted).split("."):
                node = node[key]
            if node != value:
                out.append((str(dotted), node, value))
        return out

    def runs(self, dataset: str) -> list[str]:
        """The training runs of a dataset: the method, then its variants in params order."""
        return [METHOD_RUN, *self.dataset(dataset).variants]

    def for_run(self, dataset: str, run: str) -> Params:
        """The params one training run of `dataset` uses: the dataset's `overrides`, then the variant's.

        Idempotent (overrides set fixed values), so it may be applied to params that already
        went through `for_dataset` or `for_run`; the variant always has the last word.
        """
        params = self.for_dataset(dataset)
        if run == METHOD_RUN:
            return params
        variants = params.dataset(dataset).variants
        if run not in variants:
            raise ConfigError(f"datasets.{dataset}.variants: no variant {run!r} (known: {', '.join(variants) or 'none'})")
        return params.with_overrides(variants[run], f"datasets.{dataset}.variants.{run}: ")


def _override(raw: dict, overrides: dict) -> dict:
    """A copy of `raw` with dotted-key `overrides` set; ConfigError for a key params.yaml does not have."""
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node, parts = raw, str(dotted).split(".")
        for key in parts[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"{dotted}: unknown key{_suggestion(str(dotted), _dotted_keys(raw))}")
        node[parts[-1]] = value
    return raw


def _dotted_keys(raw: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in raw.items():
        out.append(f"{prefix}{key}")
        if isinstance(value, dict):
            out += _dotted_keys(value, f"{prefix}{key}.")
    return out


def _validated(raw: dict, where: str = "") -> Params:
    """Params from a dict; ConfigError listing every problem, one line each, `where` before each."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("\n".join(f"{where}{line}" for line in _lines(err))) from None


# ---------------------------------------------------------------- error messages

def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _suggestion(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(known)})" if known and len(known) <= 20 else ""


def _fields_at(loc: tuple) -> list[str]:
    """The keys params.yaml allows at a location (a section's fields), for 'did you mean'."""
    node: Any = Params
    for part in loc:
        if typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        elif isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = node.model_fields[part].annotation
        else:
            return []
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _got(value) -> str:
    text = repr(value)
    return f"got {type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


TYPE_NAMES = {"int_type": "int", "float_type": "float", "bool_type": "true/false", "string_type": "a string",
              "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping"}
BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
          "less_than": ("<", "lt")}


def _explain(error: dict) -> str:
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key" + _suggestion(str(error["loc"][-1]), _fields_at(tuple(error["loc"][:-1])))
    if kind == "missing":
        return "missing"
    if kind in TYPE_NAMES:
        return f"expected {TYPE_NAMES[kind]}, {_got(value)}"
    if kind in BOUNDS:
        sign, name = BOUNDS[kind]
        return f"must be {sign} {ctx[name]}, got {value!r}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected'].replace(' or ', ', ')}, got {value!r}"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} item{'s' if ctx['min_length'] != 1 else ''}, got {value!r}"
    if kind == "finite_number":
        return f"must be a finite number, got {value!r}"
    return error["msg"]


def _lines(err: ValidationError | ConfigError) -> list[str]:
    """One 'dotted.key: problem' line per problem."""
    if isinstance(err, ConfigError):
        return str(err).splitlines()
    out = []
    for error in err.errors(include_url=False):
        where = _dotted(tuple(error["loc"]))
        if error["type"] == "ssr_checks":
            out += [f"{where}.{key}: {message}" if where else f"{key}: {message}" for key, message in error["ctx"]["problems"]]
        else:
            out.append(f"{where}: {_explain(error)}" if where else _explain(error))
    return out


# ---------------------------------------------------------------- training identity

def training_identity(params: Params, dataset: str) -> dict:
    """Every setting that shapes a trained model, as flat dotted keys.

    A checkpoint records it; resuming or loading under params whose identity differs is an
    error naming the keys, since the weights would silently belong to another configuration.
    Run-time choices (seeds list, workers, logging, inference, retraining) are not part of it.
    """
    ds = params.dataset(dataset).model_dump(exclude={"seeds", "gpus", "variants", "overrides", "long_side", "seed_split",
                                                     "val_split"})
    sections = {
        f"datasets.{dataset}": ds,
        f"train_presets.{params.dataset(dataset).preset}": params.preset(dataset).model_dump(),
        "train": params.train.model_dump(exclude={"checkpoint_every", "log_every", "num_workers", "fast_path",
                                                              "decode_cache"}),
        "superpixels": params.superpixels.model_dump(exclude={"workers"}),
        "affinity": params.affinity.model_dump(), "sgc": params.sgc.model_dump(), "cmpa": params.cmpa.model_dump(),
        "pseudo_labels": params.pseudo_labels.model_dump(exclude={"figures"}),
    }
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}


def identity_differences(recorded: dict, current: dict) -> list[str]:
    """'key (recorded X, now Y)' for every key whose value differs between two identities."""
    keys = sorted(set(recorded) | set(current))
    missing = object()
    return [f"{k} (recorded {recorded.get(k, 'absent')!r}, now {current.get(k, 'absent')!r})"
            for k in keys if _jsonable(recorded.get(k, missing)) != _jsonable(current.get(k, missing))]


def _jsonable(value):
    """Lists and tuples compare equal once they have been through JSON."""
    return list(map(_jsonable, value)) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- loading

def params_from_dict(raw: dict) -> Params:
    """Validated params from a dict shaped like params.yaml; ConfigError listing every problem, one per line."""
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of params.yaml sections, got {type(raw).__name__}")
    return _validated(raw)


def load_params(path: str | Path = "params.yaml", *, site: bool = True) -> Params:
    """params.yaml, validated; with `site`, the per-site roots as params.local.yaml and SSR_* set them (ssr.site)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the repository root, or pass --params FILE)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    try:
        if site:
            raw = apply_site(raw, path)
    except SiteError as err:
        raise ConfigError(str(err)) from None
    try:
        return params_from_dict(raw)
    except ConfigError as err:
        lines = str(err).splitlines()
        if len(lines) == 1:
            raise ConfigError(f"{path}: {lines[0]}") from None
        raise ConfigError(f"{path}: {len(lines)} problems\n" + "\n".join(f"  {line}" for line in lines)) from None


# ---------------------------------------------------------------- JSON Schema

SCHEMA_PATH = "workflow/schemas/params.schema.json"


def json_schema() -> dict:
    """params.yaml's JSON Schema (draft 2020-12), from the models: types, bounds, choices, descriptions, sources."""
    schema = Params.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "description": "params.yaml of ssr; generated from ssr/config.py by `ssr schema` (make schema): edit those, "
                           "not this file. `source`: P = the SSR paper, W = WeCLIP's code, O = our choice.",
            **{k: v for k, v in schema.items() if k != "description"}}


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"
