"""The demo's tiny DINO: timm's VisionTransformer, a small config, trained by DINO
self-distillation (Caron et al. 2021, "Emerging Properties in Self-Supervised
Vision Transformers") on unlabelled demo images.

The product is a folder in timm's own export layout (config.json +
model.safetensors) that `ssr.backbones.load_dino("demo", demo_dir=...)` loads
through `timm.create_model(..., pretrained=True)`, the loader that serves
`vit_small_patch16_224.dino` for real runs, plus provenance.json saying how it
was made and how well its attention finds the shapes.

DINO in brief: a student and a teacher network (same architecture, teacher =
EMA of the student) each end in a projection head giving K logits. The teacher
sees the two global views of an image, the student all views (2 global + the
local ones); the student is trained to match, by cross-entropy, the teacher's
centred and sharpened distribution for every global view it did not see itself.

DINO alone does not make this tiny ViT's attention find the demo's shapes (README, "The
demo DINO"): every demo image has a background no other image has, and self-distillation
learns it as the image's identity. So a second, named objective (O) is added beside DINO's,
with weight `denoise_weight`: masked denoising of patch pixels, in the family of masked image
modelling (SimMIM, Xie et al. 2022; MAE, He et al. 2022). The student sees a third view with
Gaussian noise on every pixel and a share of its patches replaced by a mask token, and a
linear decoder predicts the clean pixels of every patch from the last block's tokens. The
clean colour of a noisy patch is best estimated from the patches that show the same surface,
so the last block's attention learns to gather an object's patches (the own-object share of
`ssr.attention_quality`). No labels, masks or captions enter; the pixels are the targets.
Grouping by that measure did not make a better Eq. 9 affinity on the demo (README).
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ssr.attention_quality import eval_samples, measure_clip, measure_dino, protocol
from ssr.backbones import load_clip, load_dino
from ssr.config import DemoDinoParams, DemoParams
from ssr.data.demo import render_sample
from ssr.data.layout import write_json
from ssr.data.transforms import normalise, to_unit
from ssr.pretraining import RESUME_FILE, load_resume, save_half_weights, save_resume
from ssr.progress import progress_bar
from ssr.schedules import cosine

# The real DINO's statistics; the pretrained cfg carries them to `dino_normalisation`.
MEAN = IMAGENET_DEFAULT_MEAN
STD = IMAGENET_DEFAULT_STD
# The builder of the real DINO ViT-S/16; the model args override its sizes.
ARCHITECTURE = "vit_small_patch16_224"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# DINO's view augmentations (its BYOL-style recipe), per view: colour jitter
# (brightness, contrast, saturation, hue; scaled by `colour_jitter`) with
# probability 0.8, grayscale 0.2, Gaussian blur (1.0 on the first global view,
# 0.1 on the second, 0.5 on local ones; sigma from blur_sigma / 20 to blur_sigma
# pixels), solarisation 0.2 on the second global view.
JITTER = (0.4, 0.4, 0.2, 0.1)
JITTER_P, GRAY_P = 0.8, 0.2


def model_args(p: DemoDinoParams, image_size: int) -> dict:
    return {"img_size": image_size, "patch_size": p.patch_size, "embed_dim": p.width, "depth": p.depth,
            "num_heads": p.heads, "num_classes": 0, "dynamic_img_size": True}


def export_config(p: DemoDinoParams, image_size: int) -> dict:
    """timm's export layout (what `save_config_for_hf` writes), so `local-dir:` reads it too."""
    return {
        "architecture": ARCHITECTURE,
        "num_classes": 0,
        "num_features": p.width,
        "global_pool": "token",
        "model_args": model_args(p, image_size),
        "pretrained_cfg": {
            "tag": "demo_dino",
            "custom_load": False,
            "input_size": [3, image_size, image_size],
            "fixed_input_size": False,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(MEAN),
            "std": list(STD),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


class DinoHead(nn.Module):
    """DINO's projection head: a 3-layer MLP down to a bottleneck, L2 normalisation, then a
    weight-normalised linear layer onto K prototypes with its norm fixed at 1 (DINO's
    `norm_last_layer`), i.e. logits are cosines between the bottleneck and each prototype."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim) -> (B, K) logits."""
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).T


class Dino(nn.Module):
    """Backbone + head, run once per view resolution (global views batch together, local ones too).

    With `pixels` > 0, a learnable mask token stands in for the patch embeddings the denoising
    view hides, and a linear decoder maps each final patch token to its patch's `pixels` values.
    """

    def __init__(self, backbone: nn.Module, head: DinoHead, pixels: int = 0):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim)) if pixels else None
        self.decoder = nn.Linear(backbone.embed_dim, pixels) if pixels else None

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """views: list of (B, 3, S_v, S_v) -> (len(views) * B, K), views in order."""
        out, i = [], 0
        while i < len(views):
            j = i
            while j < len(views) and views[j].shape[-1] == views[i].shape[-1]:
                j += 1
            out.append(self.backbone(torch.cat(views[i:j])))
            i = j
        return self.head(torch.cat(out))

    def denoise(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) corrupted view, mask (B, N) bool over its patches -> (B, N, pixels) predicted clean patches."""

        def hide(_module, _args, out: torch.Tensor) -> torch.Tensor:  # out: (B, h, w, D) with dynamic_img_size
            return torch.where(mask.reshape(*out.shape[:-1], 1), self.mask_token.to(out.dtype), out)

        handle = self.backbone.patch_embed.register_forward_hook(hide)
        try:
            tokens = self.backbone.forward_features(x)
        finally:
            handle.remove()
        return self.decoder(tokens[:, self.backbone.num_prefix_tokens:])


def build(p: DemoDinoParams, image_size: int) -> Dino:
    # The statistics the views are normalised with go into the model's pretrained cfg from the start,
    # not the architecture's default cfg (0.5, 0.5), so that whatever reads them off the model
    # (`dino_normalisation`, the attention measures during training) agrees with the saved folder.
    backbone = timm.create_model(ARCHITECTURE, pretrained=False, pretrained_cfg_overlay={"mean": MEAN, "std": STD},
                                 **model_args(p, image_size))
    pixels = 3 * p.patch_size ** 2 if p.denoise_weight > 0 else 0
    return Dino(backbone, DinoHead(p.width, p.head_hidden, p.head_bottleneck, p.prototypes), pixels)


# ------------------------------------------------------------------ views

def _gaussian_blur(x: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """(B, 3, H, W), per-image sigma (B,) in pixels -> blurred, separable kernels, reflect padding."""
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t[None] / torch.as_tensor(sigma, dtype=x.dtype)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B * 3, k)
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma (ITU-R 601, as torchvision)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _hue_shift(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma of (B, 3, H, W) RGB by `turns` (B,) of a full turn, in YIQ space."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=x.dtype)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    cos, sin = torch.cos(2 * math.pi * turns).view(-1, 1, 1), torch.sin(2 * math.pi * turns).view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq)


def augment(images: torch.Tensor, rng: np.random.Generator, size: int, scale: tuple[float, float],
            blur_p: float, solarise_p: float, colour: float, blur_sigma: float) -> torch.Tensor:
    """One DINO view of each image: (B, 3, H, W) in [0, 1] -> (B, 3, size, size) normalised.

    Random resized crop (area share in `scale`, aspect ratio 3/4-4/3) and horizontal
    flip as one affine resampling per image, then the photometric augmentations.
    """
    b = images.shape[0]
    area = rng.uniform(*scale, b)
    ratio = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), b))
    half_w = np.minimum(np.sqrt(area * ratio), 1.0)  # half extents in grid_sample's [-1, 1] units
    half_h = np.minimum(np.sqrt(area / ratio), 1.0)
    cx = rng.uniform(-1, 1, b) * (1 - half_w)
    cy = rng.uniform(-1, 1, b) * (1 - half_h)
    flip = np.where(rng.random(b) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = torch.from_numpy(half_w * flip).float()
    theta[:, 0, 2] = torch.from_numpy(cx).float()
    theta[:, 1, 1] = torch.from_numpy(half_h).float()
    theta[:, 1, 2] = torch.from_numpy(cy).float()
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def chosen(p: float) -> torch.Tensor:
        return torch.from_numpy(rng.random(b) < p).view(b, 1, 1, 1)

    def factor(strength: float) -> torch.Tensor:
        return torch.from_numpy(rng.uniform(max(0.0, 1 - strength), 1 + strength, b)).float().view(b, 1, 1, 1)

    brightness, contrast, saturation, hue = (colour * j for j in JITTER)
    jitter = chosen(JITTER_P)
    y = (x * factor(brightness)).clamp(0, 1)
    mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * factor(contrast) + mean).clamp(0, 1)
    g = _gray(y)
    y = ((y - g) * factor(saturation) + g).clamp(0, 1)
    y = _hue_shift(y, torch.from_numpy(rng.uniform(-hue, hue, b)).float()).clamp(0, 1)
    x = torch.where(jitter, y, x)
    x = torch.where(chosen(GRAY_P), _gray(x).expand_as(x), x)
    blur = chosen(blur_p)
    sigma = rng.uniform(blur_sigma / 20, blur_sigma, b)
    x = torch.where(blur, _gaussian_blur(x, sigma), x)
    x = torch.where(chosen(solarise_p), torch.where(x >= 0.5, 1 - x, x), x)
    return normalise(x, MEAN, STD)


def views(images: torch.Tensor, rng: np.random.Generator, p: DemoDinoParams) -> list[torch.Tensor]:
    """(B, 3, H, W) in [0, 1] -> [global_1, global_2, local_1, ...]: 2 of (B, 3, H, W), then
    `p.local_crops` of (B, 3, local_size, local_size)."""
    size = images.shape[-1]
    style = {"colour": p.colour_jitter, "blur_sigma": p.blur_sigma}
    out = [augment(images, rng, size, (p.global_scale_min, 1.0), blur_p=1.0, solarise_p=0.0, **style),
           augment(images, rng, size, (p.global_scale_min, 1.0), blur_p=0.1, solarise_p=0.2, **style)]
    out += [augment(images, rng, p.local_size, (p.local_scale_min, p.local_scale_max), blur_p=0.5, solarise_p=0.0, **style)
            for _ in range(p.local_crops)]
    return out


# ------------------------------------------------------------------ loss

def dino_loss(student: torch.Tensor, teacher: torch.Tensor, centre: torch.Tensor, student_temp: float,
              teacher_temp: float) -> torch.Tensor:
    """Cross-entropy between the teacher's centred, sharpened global views and the student's other views.

    student: (V * B, K) logits, views in order (the first 2 are the global ones);
    teacher: (2 * B, K) logits of the global views; centre: (K,).
    """
    targets = F.softmax((teacher - centre) / teacher_temp, dim=-1).chunk(2)
    log_probs = F.log_softmax(student / student_temp, dim=-1).chunk(student.shape[0] // targets[0].shape[0])
    total, pairs = 0.0, 0
    for t, target in enumerate(targets):
        for v, log_prob in enumerate(log_probs):
            if v == t:  # never the same view on both sides
                continue
            total = total + (-target * log_prob).sum(-1).mean()
            pairs += 1
    return total / pairs


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C), patches in row-major grid order, as the ViT's tokens."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def corrupt(view: torch.Tensor, rng: np.random.Generator, p: DemoDinoParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoising input: a normalised view (B, 3, H, W) -> (noisy view, mask (B, N) bool).

    Each image draws its noise std from [0, denoise_sigma] (pixel units in [0, 1], so some
    images are nearly clean, as the pipeline's are); each patch is masked with probability
    `denoise_mask`. The draws come from `rng`, so a resumed run is the same run.
    """
    b, _, h, w = view.shape
    sigma = torch.from_numpy(rng.uniform(0.0, p.denoise_sigma, (b, 1, 1, 1))).float()
    noise = torch.from_numpy(rng.standard_normal(view.shape, dtype=np.float32))
    noisy = view + sigma * noise / torch.tensor(STD, dtype=view.dtype).view(1, 3, 1, 1)
    mask = torch.from_numpy(rng.random((b, (h // p.patch_size) * (w // p.patch_size))) < p.denoise_mask)
    return noisy, mask


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------ training

def pretrain(out_dir: str | Path, p: DemoDinoParams, demo: DemoParams, *, clip_blocks: int,
             clip_dir: str | Path | None = None, progress: bool = True, eval_every: int = 100) -> dict:
    """Train the demo DINO from scratch and write its timm folder (each file atomically).

    Its attention is measured on held-out dino_eval images (`ssr.attention_quality`) at every
    evaluation and, as saved, at the end; with `clip_dir`, the demo CLIP's attention is measured
    on the same images for comparison, averaged over its last `clip_blocks` blocks as SSR's A_CLIP.
    """
    torch.manual_seed(p.seed)
    torch.set_num_threads(p.threads)
    student = build(p, demo.image_size)
    teacher = copy.deepcopy(student).requires_grad_(False)
    centre = torch.zeros(p.prototypes)
    # DINO's groups: no weight decay on biases and normalisation parameters.
    decay = [q for q in student.parameters() if q.ndim >= 2]
    no_decay = [q for q in student.parameters() if q.ndim < 2]
    optimiser = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=p.lr)
    held_out = eval_samples(demo, "dino_eval", p.eval_images)
    denoising = p.denoise_weight > 0

    def teacher_temp_at(step: int) -> float:
        if step < p.teacher_temp_warmup:
            return p.teacher_temp_start + (p.teacher_temp - p.teacher_temp_start) * step / p.teacher_temp_warmup
        return p.teacher_temp

    def evaluate() -> dict:
        teacher.eval()
        return measure_dino(teacher.backbone, held_out, p.attention_mass)

    start = time.time()
    history: list[dict] = []
    out_dir = Path(out_dir)
    resume_path = out_dir / RESUME_FILE
    # Threads are not part of the run: they change speed, and the float summation order of some
    # kernels (so the result to rounding); a run may resume with more or fewer threads.
    run_id = {"config": export_config(p, demo.image_size), "params": p.model_dump(exclude={"threads"}),
              "demo_params": demo.model_dump()}
    first = 0
    if (saved := load_resume(resume_path, run_id)) is not None:
        student.load_state_dict(saved["student"])
        teacher.load_state_dict(saved["teacher"])
        optimiser.load_state_dict(saved["optimiser"])
        centre = saved["centre"]
        first, history = saved["step"], saved["history"]
        start -= saved["seconds"]
        print(f"demo DINO: resuming from {resume_path} at step {first}", flush=True)
    losses, entropies, denoise_losses = [], [], []
    bar = progress_bar(range(first, p.steps), initial=first, total=p.steps, desc="demo DINO", progress=progress)
    for step in bar:
        student.train()
        # Each step's draws depend on (seed, step) alone, so a resumed run is the same run.
        rng = np.random.default_rng([p.seed, 11, step])
        samples = [render_sample(demo, "dino_train", step * p.batch_size + i) for i in range(p.batch_size)]
        images = to_unit(np.stack([s.image for s in samples]))
        crops = views(images, rng, p)
        for group in optimiser.param_groups:
            group["lr"] = cosine(step, p.steps, p.lr, p.min_lr, warmup=p.warmup)
        optimiser.param_groups[0]["weight_decay"] = cosine(step, p.steps, p.weight_decay, p.weight_decay_end)
        with torch.no_grad():
            teacher_out = teacher(crops[:2])
        student_out = student(crops)
        temp = teacher_temp_at(step)
        loss = dino_loss(student_out, teacher_out, centre, p.student_temp, temp)
        if denoising:
            clean = augment(images, rng, demo.image_size, (p.global_scale_min, 1.0), blur_p=0.0, solarise_p=0.0,
                            colour=p.colour_jitter, blur_sigma=p.blur_sigma)
            noisy, mask = corrupt(clean, rng, p)
            denoise_loss = F.mse_loss(student.denoise(noisy, mask), patchify(clean, p.patch_size))
            denoise_losses.append(float(denoise_loss.detach()))
            loss = loss + p.denoise_weight * denoise_loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if p.clip_grad > 0:
            nn.utils.clip_grad_norm_(student.parameters(), p.clip_grad)
        if step < p.freeze_last_layer:  # DINO keeps the prototypes fixed at first: it stabilises the start
            student.head.prototypes.grad = None
        optimiser.step()
        with torch.no_grad():
            m = cosine(step, p.steps, p.teacher_momentum, 1.0)
            torch._foreach_mul_(list(teacher.parameters()), m)
            torch._foreach_add_(list(teacher.parameters()), list(student.parameters()), alpha=1 - m)
            # Entropy of the targets just used: near log K means the teacher is flat, near 0 one-hot.
            target = F.softmax((teacher_out - centre) / temp, dim=-1)
            entropies.append(float(-(target * target.clamp(min=1e-12).log()).sum(-1).mean()))
            centre = p.centre_momentum * centre + (1 - p.centre_momentum) * teacher_out.mean(dim=0)
        losses.append(float(loss.item()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % eval_every == 0 or step + 1 == p.steps:
            history.append({"step": step + 1, "loss": float(np.mean(losses)), "teacher_entropy": float(np.mean(entropies)),
                            **({"denoise_loss": float(np.mean(denoise_losses))} if denoising else {}),
                            **evaluate(), "seconds": round(time.time() - start, 1)})
            losses, entropies, denoise_losses = [], [], []
            print(json.dumps(history[-1]), flush=True)
            save_resume(resume_path, run_id, student=student.state_dict(), teacher=teacher.state_dict(),
                        optimiser=optimiser.state_dict(), centre=centre, step=step + 1, history=history,
                        seconds=time.time() - start)
    wall = round(time.time() - start, 1)
    save(out_dir, teacher.backbone, export_config(p, demo.image_size))
    # The figures are those of the saved fp16 weights, loaded the way the pipeline loads them.
    dino = load_dino("demo", demo_dir=out_dir)
    quality = {"dino": measure_dino(dino, held_out, p.attention_mass)}
    if clip_dir is not None:
        clip = load_clip("demo", demo_dir=clip_dir)[0]
        quality["clip"] = measure_clip(clip, held_out, p.attention_mass, clip_blocks)
    provenance = {
        "config": export_config(p, demo.image_size),
        "params": p.model_dump(),
        "demo_params": demo.model_dump(),
        "seed": p.seed,
        "steps": p.steps,
        "device": f"cpu ({cpu_name()}, {p.threads} thread{'s' if p.threads > 1 else ''})",
        "wall_seconds": wall,
        "attention": quality,
        "attention_protocol": protocol(p.attention_mass, demo.image_size, "dino_eval", p.eval_images, clip_blocks),
        "history": history,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    write_json(out_dir / "provenance.json", provenance)
    resume_path.unlink(missing_ok=True)
    return provenance


def save(out_dir: str | Path, backbone: nn.Module, config: dict) -> None:
    """Write the timm folder: config.json and the weights (provenance.json is the caller's)."""
    out_dir = Path(out_dir)
    write_json(out_dir / CONFIG_FILE, config)
    save_half_weights(out_dir / WEIGHTS_FILE, backbone)
