"""Throughput of one SSR training step's CAM pass: batched GradCAM vs the reference per-image loop.

(a) batched: `ssr.model.refined_cams` exactly as `ssr.train.train_step` calls it; its GradCAM
    (`ssr.cam.gradcam`) does one backward per class *slot* for the whole batch.
(b) loop:    the reference code's (WeCLIP / CLIP-ES) way: the frozen blocks run batched, then for
    every image the last block is re-run with grad and every present class gets its own backward.
Both then do the same affinity / DINO / SGC propagation, so the difference is the GradCAM strategy.
They run in the same process on the same inputs, alternating per repeat, and their CAMs are compared.

On CUDA (default there): ViT-B/16 (open_clip, random init) + DINO ViT-S/16 (timm, random init),
crop 320, batch 16, bf16 autocast; peak memory from torch.cuda.max_memory_allocated.
On CPU (default there): the tiny test CLIP (patch 8) + a tiny timm ViT, batch 8, 32 px, fp32.

    python benchmarks/gradcam_throughput.py [--device cuda] [--batch 16] [--size 320] [--repeats 5]
                                            [--classes-per-image 2] [--model vitb|tiny]

The last line of output is a JSON object with every number printed above.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import open_clip
import timm
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssr.affinity import clip_affinity, fuse_affinities, propagate  # noqa: E402
from ssr.backbones import clip_visual_forward, dino_last_attention, load_dino  # noqa: E402
from ssr.cam import class_slots, minmax_normalise  # noqa: E402
from ssr.config import AffinityParams, CmpaParams, DatasetParams, SgcParams, load_params  # noqa: E402
from ssr.model import SSR, build_backbones, eval_mode, normalise, refined_cams  # noqa: E402
from ssr.sgc import sgc_mask  # noqa: E402

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
NUM_REGIONS = 8

# Same as tests/conftest.py:tiny_clip_config(32, 8).
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 24, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def load_settings():
    """VOC prompts and the affinity / SGC / CMPA params from params.yaml (defaults if it cannot be read)."""
    try:
        params = load_params(REPO / "params.yaml")
        return params.dataset("voc"), params.affinity, params.sgc, params.cmpa, params.superpixels.n_clusters
    except Exception as err:  # noqa: BLE001 - a benchmark should still run on a broken params file
        print(f"# params.yaml not usable ({err}); using dataclass defaults")
        ds = DatasetParams(train_split="train", val_split="val", preset="voc", prompt_template="a clean origami {}.",
                           background_prompts=["ground", "grass", "tree", "building", "wall", "sky", "water", "road"],
                           clip_model="ViT-B-16", clip_pretrained="openai", dino_model="vit_small_patch16_224.dino")
        return ds, AffinityParams(), SgcParams(), CmpaParams(), NUM_REGIONS


def build(kind: str, device: torch.device, ds: DatasetParams, cmpa: CmpaParams):
    torch.manual_seed(0)
    if kind == "vitb":
        clip = open_clip.create_model("ViT-B-16", pretrained=None, device=device)
        tokenizer = open_clip.get_tokenizer("ViT-B-16")
        dino = load_dino("vit_small_patch16_224", pretrained=False, device=device)
        hidden = cmpa.hidden_dim
    else:
        clip = open_clip.CLIP(**TINY_CLIP).to(device)
        tokenizer = open_clip.SimpleTokenizer(context_length=TINY_CLIP["text_cfg"]["context_length"])
        dino = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, embed_dim=48, num_heads=3,
                                 patch_size=8, img_size=32, dynamic_img_size=True, num_classes=0)
        dino = dino.to(device).eval().requires_grad_(False)
        hidden = 32
    clip.eval().requires_grad_(False)
    backbones = build_backbones(ds, VOC_CLASSES, demo_clip_dir=REPO, device=device, clip=clip, tokenizer=tokenizer,
                                dino=dino)
    model = SSR(backbones, CmpaParams(enabled=cmpa.enabled, hidden_dim=hidden, num_layers=cmpa.num_layers),
                decoder_width=64 if kind == "tiny" else 256, decoder_heads=8).to(device).train()
    return backbones, model


def batched_pass(backbones, model, images, labels, regions, affinity, sgc, num_regions, amp_dtype):
    classes, valid = class_slots(labels, images.device)
    out = refined_cams(backbones, model, images, classes, valid, regions, affinity, sgc, num_regions=num_regions,
                       rows=("cam",), autocast_dtype=amp_dtype)
    return out.cams["cam"], out.method


def loop_pass(backbones, model, images, labels, regions, affinity, sgc, num_regions, amp_dtype):
    """The reference code's CAM pass: frozen blocks batched, then per image x present class one backward."""
    device = images.device
    classes, valid = class_slots(labels, device)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    visual_model = backbones.clip.visual
    last = visual_model.transformer.resblocks[-1]
    num_fg, total = backbones.num_foreground, backbones.text.shape[0]
    scale = backbones.clip.logit_scale.exp()
    with amp:
        with torch.no_grad():
            visual = clip_visual_forward(visual_model, normalise(images, backbones.clip_mean, backbones.clip_std),
                                         attn_blocks=affinity.clip_blocks, cam_block=-1, cam_grad=False)
        cam = torch.zeros(len(labels), classes.shape[1], visual.grid[0] * visual.grid[1], device=device)
        with eval_mode(model.isa, model.tsa), torch.enable_grad():
            for b, present in enumerate(labels):
                x = visual.cam_input[b:b + 1].detach().requires_grad_(True)
                y = last(x)
                pooled = visual_model.ln_post(y[:, 0]) @ visual_model.proj
                img = F.normalize(model.adapt_image(pooled.float()), dim=-1)
                txt = F.normalize(model.adapt_text(backbones.text), dim=-1)
                logits = scale * img @ txt.T
                keep = torch.tensor([c - 1 for c in present] + list(range(num_fg, total)), device=device)
                probs = logits[0, keep].softmax(dim=-1)
                feats = x[0, 1:].detach()
                for s in range(len(present)):
                    (grad,) = torch.autograd.grad(probs[s], x, retain_graph=s < len(present) - 1)
                    cam[b, s] = F.relu(feats @ grad[0, 1:].mean(dim=0)).float()
        cam = minmax_normalise(cam) * valid[..., None]
        with torch.no_grad():
            depth = len(visual_model.transformer.resblocks)
            attn = [visual.attentions[i] for i in range(max(0, depth - affinity.clip_blocks), depth)]
            a_clip = clip_affinity(attn, rounds=affinity.sinkhorn_rounds, power=affinity.power)
            a_dino = dino_last_attention(backbones.dino, normalise(images, backbones.dino_mean, backbones.dino_std)).float()
    with torch.no_grad():
        mask = sgc_mask(cam, regions, num_regions, visual.grid, t_hi=sgc.t_hi, rho=sgc.rho,
                        patch_area=sgc.patch_area, keep_best=sgc.keep_best)
        fused = fuse_affinities(a_clip if affinity.use_clip else None, a_dino if affinity.use_dino else None,
                                affinity.clip_weight, affinity.dino_weight)
        method = propagate(fused, cam, mask if affinity.use_sgc else None) * valid[..., None]
    return cam, method


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def peak_memory(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "above_resident_mib": (torch.cuda.max_memory_allocated(device) - base) / 2**20}


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--model", choices=("vitb", "tiny"), default=None, help="default: vitb on CUDA, tiny on CPU")
    ap.add_argument("--batch", type=int, default=None, help="default: 16 (vitb), 8 (tiny)")
    ap.add_argument("--size", type=int, default=None, help="crop side; default: 320 (vitb), 32 (tiny)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--classes-per-image", type=int, default=2,
                    help="present classes per image (each image draws its own random set)")
    ap.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (bf16 autocast otherwise; CPU is always fp32)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    kind = args.model or ("vitb" if device.type == "cuda" else "tiny")
    batch = args.batch or (16 if kind == "vitb" else 8)
    size = args.size or (320 if kind == "vitb" else 32)
    k = args.classes_per_image
    if not 1 <= k <= len(VOC_CLASSES):
        ap.error(f"--classes-per-image must be in 1..{len(VOC_CLASSES)}")
    amp_dtype = torch.bfloat16 if (device.type == "cuda" and not args.no_amp) else None
    if device.type == "cpu":
        print(f"# CPU run: {'tiny CLIP (patch 8) + tiny timm DINO, fp32' if kind == 'tiny' else 'ViT-B/16 + ViT-S/16, fp32'}"
              f"; numbers are a smoke test, not the GPU figure")

    ds, affinity, sgc, cmpa, num_regions = load_settings()
    backbones, model = build(kind, device, ds, cmpa)
    patch = backbones.patch_size
    if size % patch:
        ap.error(f"--size {size} is not a multiple of the patch size {patch}")

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=gen).to(device)
    regions = torch.randint(0, num_regions, (batch, size, size), generator=gen).to(device)
    labels = [sorted((torch.randperm(len(VOC_CLASSES), generator=gen)[:k] + 1).tolist()) for _ in range(batch)]
    run = {
        "batched": lambda: batched_pass(backbones, model, images, labels, regions, affinity, sgc, num_regions, amp_dtype),
        "loop": lambda: loop_pass(backbones, model, images, labels, regions, affinity, sgc, num_regions, amp_dtype),
    }

    for _ in range(args.warmup):
        for fn in run.values():
            fn()
    times = {name: [] for name in run}
    results = {}
    for _ in range(args.repeats):        # alternate so background load hits both alike
        for name, fn in run.items():
            seconds, results[name] = timed(fn, device)
            times[name].append(seconds)
    memory = {name: peak_memory(fn, device) for name, fn in run.items()}

    valid = class_slots(labels, device)[1]
    cam_diff = (results["batched"][0] - results["loop"][0]).abs()[valid].max().item()
    method_diff = (results["batched"][1] - results["loop"][1]).abs()[valid].max().item()

    report = {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "model": "ViT-B-16 + DINO ViT-S/16 (random init)" if kind == "vitb" else "tiny CLIP + tiny DINO (random init)",
        "dtype": "bf16 autocast" if amp_dtype else "fp32",
        "batch": batch, "size": size, "grid": [size // patch, size // patch],
        "classes_per_image": k, "backwards_batched": k, "backwards_loop": batch * k,
        "repeats": args.repeats, "threads": torch.get_num_threads(),
    }
    print(f"device {report['device']} | {report['model']} | {report['dtype']} | batch {batch} | {size}px | "
          f"{k} classes/image | median of {args.repeats}")
    for name in run:
        med = statistics.median(times[name])
        report[name] = {"median_s": med, "images_per_s": batch / med, "times_s": times[name], "memory": memory[name]}
        mem = memory[name]
        mem_text = f"peak {mem['peak_mib']:.0f} MiB ({mem['above_resident_mib']:.0f} MiB above resident)" if mem else "peak memory n/a on CPU"
        backwards = report["backwards_batched"] if name == "batched" else report["backwards_loop"]
        print(f"  {name:8s} {backwards:4d} backward(s): {med * 1000:9.1f} ms/step  {batch / med:9.1f} images/s  {mem_text}")
    report["speedup"] = report["loop"]["median_s"] / report["batched"]["median_s"]
    report["max_abs_diff"] = {"cam": cam_diff, "refined": method_diff}
    print(f"  speedup batched / loop: {report['speedup']:.2f}x   max |CAM diff| {cam_diff:.2e}, "
          f"max |refined diff| {method_diff:.2e}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
