"""The demo's tiny CLIP: open_clip's own model classes, a small config, trained
with open_clip's ClipLoss on demo captions.

The product is an open_clip `local-dir:` folder (open_clip_config.json +
open_clip_model.safetensors) that loads through `open_clip.create_model`, the
same loader that serves `ViT-B-16` / `openai` for real runs, plus
provenance.json saying how it was made.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

from ssr.config import DemoClipParams, DemoParams
from ssr.data.demo import render_sample
from ssr.data.layout import write_json
from ssr.data.transforms import normalise, to_unit
from ssr.pretraining import RESUME_FILE, load_resume, save_half_weights, save_resume
from ssr.progress import progress_bar
from ssr.schedules import cosine

# open_clip's OpenAI statistics; the demo model is trained with them, and
# every consumer reads them back from the model's preprocess config.
MEAN = open_clip.OPENAI_DATASET_MEAN
STD = open_clip.OPENAI_DATASET_STD


def model_config(p: DemoClipParams, image_size: int) -> dict:
    return {
        "embed_dim": p.embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": p.vision_layers,
            "width": p.vision_width,
            "head_width": p.vision_width // p.vision_heads,
            "patch_size": p.patch_size,
        },
        "text_cfg": {
            "context_length": p.context_length,
            "vocab_size": 49408,
            "width": p.text_width,
            "heads": p.text_heads,
            "layers": p.text_layers,
        },
    }


def clip_input(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float, normalised with the model's statistics."""
    return normalise(to_unit(images), MEAN, STD)


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of one class: scores (N,) float, positives (N,) bool; mean precision at each positive."""
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(np.float64)
    if hits.sum() == 0:
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


@torch.no_grad()
def zero_shot_map(model, tokenizer, demo: DemoParams, num_images: int, template: str = "a photo of a {}.") -> dict:
    """Held-out zero-shot multi-label mAP over `num_images` clip_eval images.

    `map` ranks images per class by CLIP's zero-shot probability, the softmax over the
    class prompts of logit_scale * cos (how CLIP classifies, and how CLIP-ES scores
    classes); `map_cosine` ranks by the raw cosine. The raw cosine of one prompt falls
    as an image holds more objects, so it also ranks images by object count.
    """
    model.eval()
    samples = [render_sample(demo, "clip_eval", i) for i in range(num_images)]
    images = clip_input(np.stack([s.image for s in samples]))
    text = model.encode_text(tokenizer([template.format(c) for c in demo.classes]), normalize=True)
    image = torch.cat([model.encode_image(chunk, normalize=True) for chunk in images.split(256)])
    cosine = image @ text.T
    probability = (model.logit_scale.exp() * cosine).softmax(dim=-1)
    positives = np.array([[(s.label == c + 1).any() for c in range(len(demo.classes))] for s in samples])
    out = {}
    for key, scores in (("", probability.numpy()), ("_cosine", cosine.numpy())):
        per_class = {name: average_precision(scores[:, c], positives[:, c]) for c, name in enumerate(demo.classes)}
        out["map" + key] = float(np.nanmean(list(per_class.values())))
        out["ap" + key] = per_class
    return out


def pretrain(out_dir: str | Path, p: DemoClipParams, demo: DemoParams, *, progress: bool = True, eval_every: int = 500) -> dict:
    """Train the demo CLIP from scratch and write the `local-dir:` folder (each file atomically)."""
    torch.manual_seed(p.seed)
    torch.set_num_threads(p.threads)
    cfg = model_config(p, demo.image_size)
    model = open_clip.CLIP(**cfg)
    tokenizer = open_clip.SimpleTokenizer(context_length=p.context_length)
    loss_fn = open_clip.ClipLoss()
    decays = {n: q.ndim >= 2 and "token_embedding" not in n and "positional" not in n for n, q in model.named_parameters()}
    decay = [q for n, q in model.named_parameters() if decays[n]]
    no_decay = [q for n, q in model.named_parameters() if not decays[n]]
    optimiser = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=p.lr)

    token_cache: dict[str, torch.Tensor] = {}
    start = time.time()
    history = []
    out_dir = Path(out_dir)
    resume_path = out_dir / RESUME_FILE
    # Threads are not part of the run: they change speed, and the float summation order of some
    # kernels (so the result to rounding); a run may resume with more or fewer threads.
    run_id = {"config": cfg, "params": p.model_dump(exclude={"threads"}), "demo_params": demo.model_dump()}
    first, ev = 0, None
    if (saved := load_resume(resume_path, run_id)) is not None:
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        first, history = saved["step"], saved["history"]
        start -= saved["seconds"]
        print(f"demo CLIP: resuming from {resume_path} at step {first}", flush=True)
    # Single-object images give captions as clean as the zero-shot prompts; from
    # scratch on 2 CPU cores, multi-object captions alone learn far slower.
    single_rng = np.random.default_rng([p.seed, 7])
    for _ in range(first):  # replay the draws of the steps already done, so a resumed run is the same run
        single_rng.random(p.batch_size)
    bar = progress_bar(range(first, p.steps), initial=first, total=p.steps, desc="demo CLIP", progress=progress)
    for step in bar:
        model.train()
        single = single_rng.random(p.batch_size) < p.single_object_fraction
        samples = [render_sample(demo, "clip_train", step * p.batch_size + i, max_objects=1 if single[i] else None)
                   for i in range(p.batch_size)]
        images = clip_input(np.stack([s.image for s in samples]))
        for s in samples:
            if s.caption not in token_cache:
                token_cache[s.caption] = tokenizer([s.caption])[0]
        texts = torch.stack([token_cache[s.caption] for s in samples])
        for group in optimiser.param_groups:
            group["lr"] = cosine(step, p.steps, p.lr, warmup=p.warmup)
        image_features, text_features, logit_scale = model(images, texts)
        loss = loss_fn(image_features, text_features, logit_scale)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % eval_every == 0 or step + 1 == p.steps:
            ev = zero_shot_map(model, tokenizer, demo, p.eval_images)
            history.append({"step": step + 1, "loss": float(loss.item()), "map": ev["map"], "map_cosine": ev["map_cosine"],
                            "seconds": round(time.time() - start, 1)})
            print(json.dumps(history[-1]), flush=True)
            save_resume(resume_path, run_id, model=model.state_dict(), optimiser=optimiser.state_dict(), step=step + 1,
                        history=history, seconds=time.time() - start)
    # The loop always evaluates its last step; only a run resumed at its end has no result yet.
    final = ev if ev is not None else zero_shot_map(model, tokenizer, demo, p.eval_images)
    provenance = {
        "config": cfg,
        "params": p.model_dump(),
        "demo_params": demo.model_dump(),
        "seed": p.seed,
        "steps": p.steps,
        "device": f"cpu ({platform.processor() or platform.machine()}, {p.threads} threads)",
        "wall_seconds": round(time.time() - start, 1),
        "held_out_zero_shot_map": final["map"],
        "held_out_ap": final["ap"],
        "held_out_zero_shot_map_cosine": final["map_cosine"],
        "held_out_ap_cosine": final["ap_cosine"],
        "held_out_images": p.eval_images,
        "history": history,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    save(out_dir, model, cfg, provenance)
    resume_path.unlink(missing_ok=True)
    return provenance


def save(out_dir: str | Path, model: torch.nn.Module, cfg: dict, provenance: dict) -> None:
    """Write the open_clip `local-dir:` folder and its provenance."""
    out_dir = Path(out_dir)
    write_json(out_dir / "open_clip_config.json", {"model_cfg": cfg, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)}})
    save_half_weights(out_dir / "open_clip_model.safetensors", model)
    write_json(out_dir / "provenance.json", provenance)
