"""Throughput of the CAM pass: SSR's batched GradCAM against the reference codes' per-image loop.

(a) batched: `ssr.model.refined_cams` with the reference operators; its GradCAM
    (`ssr.cam.gradcam`) does one backward per class *slot* for the whole batch.
(b) fast:    the same with `fast=True`, as training calls it (`train.fast_path`): one batched
    backward stopped at the last block's qkv projection, SDPA, the fast SGC and DINO.
(c) loop:    CLIP-ES / WeCLIP's way: the frozen blocks run batched, then for every image the
    last block is re-run from its input with ln_1's output as the GradCAM leaf, and every
    present class gets its own backward.
All then do the same affinity / DINO / SGC propagation, so the difference is the GradCAM
strategy. They run in the same process on the same inputs, alternating per repeat, and their
CAMs are compared with the loop's: in float32 they must agree to rounding (relative 1e-4:
reductions of up to 3072 terms reordered, sqrt(3072) u = 3e-6, with room for ~30 of them in
a row); under bf16 autocast the GradCAM to `benchmarks/bf16_cams.py`'s tolerance. The region maps are
blocks of whole patches, so SGC keeps target regions and the refined CAM is not zero: a
broken propagation fails the check (`within_tolerance`, which also needs every refined CAM
of a present class to be non-zero).

On CUDA (default there): the real configuration (ViT-B/16 + DINO ViT-S/16, random weights),
crop 320, batch 16, bf16 autocast; peak memory from torch.cuda.max_memory_allocated. On CPU:
the tiny configuration, batch 8, 32 px, fp32.

    python benchmarks/gradcam_throughput.py [--device cuda] [--batch 16] [--size 320] [--repeats 5]
        [--classes-per-image 2] [--model real|tiny] [--out FILE]

The last line of output is a JSON object with every number printed above.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bf16_cams import TOLERANCE as BF16_TOLERANCE
from configs import blocky_regions, build, device_name, emit

from ssr.affinity import average_attention, fuse_attention, propagate  # noqa: E402
from ssr.backbones import clip_visual_forward, dino_last_attention  # noqa: E402
from ssr.cam import class_slots, minmax_normalise  # noqa: E402
from ssr.data.transforms import normalise  # noqa: E402
from ssr.data.voc import VOC_CLASSES  # noqa: E402
from ssr.model import autocast, eval_mode, refined_cams  # noqa: E402
from ssr.sgc import sgc_mask  # noqa: E402

FP32_TOLERANCE = {"relative": 1e-4}


def batched_pass(backbones, model, images, labels, regions, params, amp_dtype, fast=False):
    classes, valid = class_slots(labels, images.device)
    out = refined_cams(backbones, model, images, classes, valid, regions, params.affinity, params.sgc,
                       num_regions=params.superpixels.n_clusters, rows=(), autocast_dtype=amp_dtype, fast=fast)
    return out.cam, out.method


def loop_pass(backbones, model, images, labels, regions, params, amp_dtype):
    """The reference codes' CAM pass: frozen blocks batched, then per image x present class one backward."""
    device, affinity, sgc = images.device, params.affinity, params.sgc
    classes, valid = class_slots(labels, device)
    visual_model = backbones.clip.visual
    last = visual_model.transformer.resblocks[-1]
    num_fg, total = backbones.num_foreground, backbones.text.shape[0]
    scale = backbones.clip.logit_scale.exp().float()
    with autocast(device.type, amp_dtype):
        with torch.no_grad():
            visual = clip_visual_forward(visual_model, normalise(images, backbones.clip_mean, backbones.clip_std),
                                         attn_blocks=affinity.clip_blocks)
        block_input = visual.tokens[-2]
        cam = torch.zeros(len(labels), classes.shape[1], visual.grid[0] * visual.grid[1], device=device)
        with eval_mode(model.isa, model.tsa), torch.enable_grad():
            for b, present in enumerate(labels):
                x = block_input[b:b + 1].detach()
                leaf = last.ln_1(x).detach().requires_grad_(True)      # what the hook on ln_1 sees
                out, _ = last.attn(leaf, leaf, leaf, need_weights=False)
                y = x + last.ls_1(out)
                y = y + last.ls_2(last.mlp(last.ln_2(y)))
                dense = (visual_model.ln_post(y[:, 1:]) @ visual_model.proj).float()
                with torch.autocast(device.type, enabled=False):
                    img = F.normalize(model.adapt_patches(dense).mean(dim=1), dim=-1)
                    txt = F.normalize(model.adapt_text(backbones.text), dim=-1)
                    logits = scale * img @ txt.T
                keep = torch.tensor([c - 1 for c in present] + list(range(num_fg, total)), device=device)
                probs = logits[0, keep].softmax(dim=-1)
                feats = leaf[0, 1:].detach()
                for s in range(len(present)):
                    (grad,) = torch.autograd.grad(probs[s], leaf, retain_graph=s < len(present) - 1)
                    cam[b, s] = F.relu(feats @ grad[0, 1:].mean(dim=0)).float()
        cam = minmax_normalise(cam) * valid[..., None]
        with torch.no_grad():
            depth = len(visual_model.transformer.resblocks)
            a_clip = average_attention([visual.attentions[i] for i in range(max(0, depth - affinity.clip_blocks), depth)])
            a_dino = dino_last_attention(backbones.dino, normalise(images, backbones.dino_mean, backbones.dino_std)).float()
    with torch.no_grad():
        mask = sgc_mask(cam, regions, params.superpixels.n_clusters, visual.grid, t_hi=sgc.t_hi, rho=sgc.rho,
                        patch_area=sgc.patch_area, keep_best=sgc.keep_best, denominator=sgc.denominator)
        fused = fuse_attention(a_clip if affinity.use_clip else None, a_dino if affinity.use_dino else None, affinity.clip_weight,
                               affinity.dino_weight, order=affinity.fusion, rounds=affinity.sinkhorn_rounds, power=affinity.power)
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
    ap.add_argument("--model", choices=("real", "tiny"), default=None, help="default: real on CUDA, tiny on CPU")
    ap.add_argument("--batch", type=int, default=None, help="default: 16 (real), 8 (tiny)")
    ap.add_argument("--size", type=int, default=None, help="crop side; default: 320 (real), 32 (tiny)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--classes-per-image", type=int, default=2, help="present classes per image (each image draws its own set)")
    ap.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (bf16 autocast otherwise; CPU is always fp32)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    kind = args.model or ("real" if device.type == "cuda" else "tiny")
    batch = args.batch or (16 if kind == "real" else 8)
    size = args.size or (320 if kind == "real" else 32)
    k = args.classes_per_image
    if not 1 <= k < len(VOC_CLASSES):
        ap.error(f"--classes-per-image must be in 1..{len(VOC_CLASSES) - 1}")
    amp_dtype = torch.bfloat16 if (device.type == "cuda" and not args.no_amp) else None

    params, backbones, model = build(kind, device)
    if size % backbones.patch_size:
        ap.error(f"--size {size} is not a multiple of the patch size {backbones.patch_size}")
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=gen).to(device)
    regions = blocky_regions(batch, size, params.superpixels.n_clusters, gen).to(device)
    labels = [sorted((torch.randperm(len(VOC_CLASSES) - 1, generator=gen)[:k] + 1).tolist()) for _ in range(batch)]
    run = {
        "batched": lambda: batched_pass(backbones, model, images, labels, regions, params, amp_dtype),
        "fast": lambda: batched_pass(backbones, model, images, labels, regions, params, amp_dtype, fast=True),
        "loop": lambda: loop_pass(backbones, model, images, labels, regions, params, amp_dtype),
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
    report = {
        "benchmark": "gradcam_throughput", "device": device_name(device), "torch": torch.__version__,
        "model": "ViT-B-16 + DINO ViT-S/16 (random init)" if kind == "real" else "tiny CLIP + tiny DINO (random init)",
        "dtype": "bf16 autocast" if amp_dtype else "fp32", "batch": batch, "size": size,
        "grid": [size // backbones.patch_size] * 2, "classes_per_image": k,
        "backwards_batched": k, "backwards_loop": batch * k, "repeats": args.repeats,
    }
    print(f"{report['device']} | {report['model']} | {report['dtype']} | batch {batch} | {size}px | "
          f"{k} classes/image | median of {args.repeats}")
    for name in run:
        med = statistics.median(times[name])
        report[name] = {"median_s": med, "images_per_s": batch / med, "times_s": times[name], "memory": memory[name]}
        mem = memory[name]
        mem_text = (f"peak {mem['peak_mib']:.0f} MiB ({mem['above_resident_mib']:.0f} MiB above resident)" if mem
                    else "peak memory n/a on CPU")
        backwards = report["backwards_loop"] if name == "loop" else 1 if name == "fast" else report["backwards_batched"]
        print(f"  {name:8s} {backwards:4d} backward(s): {med * 1000:9.1f} ms/step  {batch / med:9.1f} images/s  {mem_text}")
    tolerance = BF16_TOLERANCE if amp_dtype else FP32_TOLERANCE
    report["tolerance"] = tolerance
    loop_cam, loop_refined = (r.float()[valid] for r in results["loop"])
    report["refined_nonzero"] = float((loop_refined.amax(dim=-1) > 0).float().mean())
    report["within_tolerance"] = report["refined_nonzero"] == 1.0
    for name in ("batched", "fast"):
        report[f"speedup_{name}"] = report["loop"]["median_s"] / report[name]["median_s"]
        diffs = {}
        for part, got, want in (("cam", results[name][0], loop_cam), ("refined", results[name][1], loop_refined)):
            got = got.float()[valid]
            diffs[part] = {"relative": float((got - want).norm() / want.norm().clamp_min(1e-12)),
                           "mean_abs": float((got - want).abs().mean()), "max_abs": float((got - want).abs().max())}
        report[f"diff_{name}_vs_loop"] = diffs
        # bf16: SGC's thresholds can flip a region on a rounding-sized change, so only the GradCAM has a
        # value tolerance there (as in bf16_cams.py)
        ok = all(diffs[part]["relative"] <= tolerance["relative"] for part in (("cam",) if amp_dtype else ("cam", "refined")))
        if "mean_abs" in tolerance:
            ok = ok and diffs["cam"]["mean_abs"] <= tolerance["mean_abs"]
        report["within_tolerance"] = report["within_tolerance"] and ok
        print(f"  {name} / loop: {report[f'speedup_{name}']:.2f}x   CAM vs loop: relative {diffs['cam']['relative']:.1e}, "
              f"max {diffs['cam']['max_abs']:.1e}; refined: relative {diffs['refined']['relative']:.1e}, "
              f"max {diffs['refined']['max_abs']:.1e}")
    print(f"  refined CAMs non-zero for {100 * report['refined_nonzero']:.0f}% of present classes; "
          f"within tolerance ({tolerance}): {report['within_tolerance']}")
    emit(report, args.out)


if __name__ == "__main__":
    main()
