"""The training step phase by phase, each fast replacement against today's (reference) code, in one run.

Phases of one micro-batch (and the step's optimiser update), timed with the reference operators
(`train.fast_path: false`) and the fast ones (true), alternating, on the same inputs:

- cam_pass:      `ssr.model.initial_cams`: CLIP forward (attention of the affinity's blocks) + GradCAM
- affinity_sgc:  the rest of `ssr.model.refined_cams`: DINO's last attention, the fused affinity, SGC
                 masks, propagation (timed as refined_cams minus the CAM pass, medians)
- par:           PAR of the online pseudo-label scores (`ssr.par.par_refine`, torch vs Triton)
- decoder:       decoder forward, logits upsampled (F.interpolate vs two GEMMs), L_ce + L_aff, backward
- cmpa:          ISA/TSA, Eq. 2 pooling and L_proto (valid slots indexed vs weighted), backward
- optimiser:     the AdamW update (unchanged; for the share of the step)
- step:          the whole `ssr.train.optimiser_step` (the headline: images/s)

It also checks, where only a GPU can: the Triton PAR against torch's (max |diff| <= 1e-5, the CPU
test's bound), the host syncs each path's micro-batch makes (torch.cuda.set_sync_debug_mode), the
device's uint8 -> float conversion against the loader's (bit for bit), and the fast step's losses
against the reference step's from the same weights and inputs (bf16: `benchmarks/bf16_cams.py`'s
relative tolerance, 0.05).

On CUDA: the real configuration (ViT-B/16 + DINO ViT-S/16, random weights), bf16 autocast,
crop 320, PAR on. On CPU: the tiny configuration, a smoke run (PAR stays on torch there).

    python benchmarks/step_phases.py [--device cuda] [--micro-batch 64] [--accumulation 1] [--repeats 5]
        [--out FILE]

Prints a table and one JSON line last.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from configs import build, device_name, emit, fill_prototypes, synthetic_batch

from ssr.cam import class_slots  # noqa: E402
from ssr.data.layout import IGNORE_INDEX  # noqa: E402
from ssr.data.transforms import channels_first, to_unit, unit_images  # noqa: E402
from ssr.decoder import affinity_loss_sums, upsample_bilinear  # noqa: E402
from ssr.model import autocast, initial_cams, refined_cams  # noqa: E402
from ssr.par import par_refine  # noqa: E402
from ssr.train import (  # noqa: E402
    build_optimiser,
    optimiser_step,
    prepare_micro_batch,
    prototype_loss_share,
    step_counts,
)

PATHS = ("reference", "fast")
LOSS_TOLERANCE = 0.05   # relative, bf16 (benchmarks/bf16_cams.py); fp32 runs land near 1e-6


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def with_path(params, fast: bool):
    return params.model_copy(update={"train": params.train.model_copy(update={"fast_path": fast})})


class Phases:
    """The model, inputs and each phase's function for one path."""

    def __init__(self, kind, device, micro, crop, accumulation, amp, classes_per_image):
        self.device = device
        self.params, self.backbones, self.model = build(kind, device)
        voc = self.params.dataset("voc").model_copy(update={"par": True})
        self.params = self.params.model_copy(update={"datasets": {**self.params.datasets, "voc": voc}})
        gen = torch.Generator().manual_seed(0)
        fill_prototypes(self.model, gen)
        self.preset = self.params.preset("voc")
        self.amp = torch.bfloat16 if amp else None
        self.start = copy.deepcopy(self.model.state_dict())
        self.optimiser = build_optimiser(self.model, self.preset)
        batches = [synthetic_batch(micro, crop, self.params.superpixels.n_clusters, classes_per_image, gen)
                   for _ in range(accumulation)]
        for b in batches:
            b["image"] = (b["image"] * 255).round() / 255      # exact uint8 values: both paths see the same images
        # each path's loader output: float and int64 (reference), uint8 (fast, TrainCrops' compact)
        self.batches = {
            "reference": [{**b, "image": b["image"].to(device), "regions": b["regions"].to(device)} for b in batches],
            "fast": [{**b, "image": (b["image"] * 255).round().to(torch.uint8).to(device),
                      "regions": b["regions"].to(torch.uint8).to(device)} for b in batches]}
        self.micro, self.accumulation = micro, accumulation
        self.prepared = {path: prepare_micro_batch(self.backbones, self.model, self.batches[path][0],
                                                   with_path(self.params, path == "fast"),
                                                   num_regions=self.params.superpixels.n_clusters, par=True,
                                                   autocast_dtype=self.amp) for path in PATHS}

    def reset(self):
        self.model.load_state_dict(self.start)
        self.optimiser = build_optimiser(self.model, self.preset)

    def cam_inputs(self, path):
        batch = self.batches[path][0]
        classes, valid = class_slots(batch["labels"], self.device)
        return unit_images(batch["image"], self.device), batch["regions"], classes, valid

    def cam_pass(self, path):
        images, _, classes, valid = self.cam_inputs(path)
        with autocast(self.device.type, self.amp):
            initial_cams(self.backbones, self.model, images, classes, valid, attn_blocks=self.params.affinity.clip_blocks,
                         fast=path == "fast")

    def refined(self, path):
        images, regions, classes, valid = self.cam_inputs(path)
        return refined_cams(self.backbones, self.model, images, classes, valid, regions, self.params.affinity,
                            self.params.sgc, num_regions=self.params.superpixels.n_clusters, rows=(),
                            autocast_dtype=self.amp, fast=path == "fast")

    def par_inputs(self):
        """The pseudo-label scores cams_to_labels refines (background first; padded slots 0) and their valid mask."""
        images, _, classes, valid = self.cam_inputs("reference")
        cams = self.refined("reference")
        b, s, _ = cams.method.shape
        up = F.interpolate(cams.method.reshape(b, s, *cams.grid).float(), size=images.shape[-2:], mode="bilinear",
                           align_corners=False).masked_fill(~valid[..., None, None], 0.0).clamp(0, 1)
        scores = torch.cat([1 - up.amax(dim=1, keepdim=True), up], dim=1)
        return images, scores, torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)

    def par(self, path, inputs):
        images, scores, active = inputs
        pl = self.params.pseudo_labels
        return par_refine(images, scores, dilations=pl.par_dilations, iterations=pl.par_iterations, w_colour=pl.par_w_colour,
                          w_position=pl.par_w_position, backend="auto" if path == "fast" else "torch",
                          active=active if path == "fast" else None)

    def decoder(self, path):
        m = self.prepared[path]
        with autocast(self.device.type, self.amp):
            logits, feats = self.model.decoder(m.tokens, m.grid)
        size = m.labels.shape[-2:]
        logits = (upsample_bilinear(logits.float(), size) if path == "fast"
                  else F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False))
        loss = F.cross_entropy(logits, m.labels, ignore_index=IGNORE_INDEX, reduction="sum") / m.labels.numel()
        pos, neg = affinity_loss_sums(feats, m.patch_labels)
        (loss + (pos + neg) / m.patch_labels.numel() ** 2).backward()

    def cmpa(self, path):
        m, model, backbones = self.prepared[path], self.model, self.backbones
        n = m.valid.sum().clamp_min(1).float()
        loss = prototype_loss_share(backbones, model, m, self.params, n, masked=path == "fast")[0]
        loss.backward()

    def optimiser_update(self, path):
        self.optimiser.step()

    def step(self, path):
        return optimiser_step(self.backbones, self.model, self.optimiser, self.batches[path],
                              with_path(self.params, path == "fast"), self.preset, lr=self.preset.lr, par=True,
                              autocast_dtype=self.amp)

    def micro_batch_syncs(self, path) -> int:
        """Host syncs of one micro-batch's CAM pass and loss (CUDA's sync debug mode warns on each)."""
        if self.device.type != "cuda":
            return -1
        from ssr.train import micro_batch_loss

        params = with_path(self.params, path == "fast")
        sync(self.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                m = prepare_micro_batch(self.backbones, self.model, self.batches[path][0], params,
                                        num_regions=params.superpixels.n_clusters, par=True, autocast_dtype=self.amp)
                micro_batch_loss(self.backbones, self.model, m, params, self.preset, step_counts([m], self.device),
                                 autocast_dtype=self.amp)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)


def alternate(fns: dict, device, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each function, run in turns so that drifting clocks or load hit all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: {"median_ms": 1000 * statistics.median(t), "spread_ms": 1000 * (max(t) - min(t))} for name, t in times.items()}


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--model", choices=("real", "tiny"), help="default: real on CUDA, tiny on CPU")
    ap.add_argument("--micro-batch", type=int, help="default 64 on CUDA, 4 on CPU")
    ap.add_argument("--accumulation", type=int, default=1, help="micro-batches per step (the step phase only)")
    ap.add_argument("--crop", type=int)
    ap.add_argument("--classes-per-image", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    kind = args.model or ("real" if device.type == "cuda" else "tiny")
    crop = args.crop or (320 if kind == "real" else 32)
    micro = args.micro_batch or (64 if device.type == "cuda" else 4)
    amp = device.type == "cuda" and not args.no_amp
    setup = Phases(kind, device, micro, crop, args.accumulation, amp, args.classes_per_image)
    report = {"benchmark": "step_phases", "device": device_name(device), "torch": torch.__version__,
              "model": "ViT-B-16 + DINO ViT-S/16 (random init)" if kind == "real" else "tiny CLIP + tiny DINO (random init)",
              "dtype": "bf16 autocast" if amp else "fp32", "micro_batch": micro, "accumulation": args.accumulation,
              "crop": crop, "classes_per_image": f"1..{args.classes_per_image}", "par": True, "repeats": args.repeats,
              "phases": {}}

    # every uint8 value through the device's conversion against the loader's float conversion (numpy)
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=-1)
    report["uint8_to_float_exact"] = torch.equal(unit_images(channels_first(pixels)[None], device).cpu(), to_unit(pixels)[None])

    def phase(name, fns):
        result = alternate(fns, device, args.repeats)
        report["phases"][name] = result
        return result

    phase("cam_pass", {p: (lambda p=p: setup.cam_pass(p)) for p in PATHS})
    refined = phase("cam_pass_affinity_sgc", {p: (lambda p=p: setup.refined(p)) for p in PATHS})
    report["phases"]["affinity_sgc"] = {p: {"median_ms": refined[p]["median_ms"] - report["phases"]["cam_pass"][p]["median_ms"]}
                                        for p in PATHS}
    del report["phases"]["cam_pass_affinity_sgc"]
    par_inputs = setup.par_inputs()
    phase("par", {p: (lambda p=p: setup.par(p, par_inputs)) for p in PATHS})
    torch_par, fast_par = setup.par("reference", par_inputs), setup.par("fast", par_inputs)
    active = par_inputs[2][..., None, None]
    report["par_check"] = {"max_abs_diff": float(((fast_par - torch_par) * active).abs().max()),
                           "label_agreement": float((fast_par.masked_fill(~active, -1).argmax(1)
                                                     == torch_par.masked_fill(~active, -1).argmax(1)).float().mean()),
                           "backend": "triton" if device.type == "cuda" else "torch (CPU)"}
    report["par_check"]["within_tolerance"] = report["par_check"]["max_abs_diff"] <= 1e-5
    phase("decoder", {p: (lambda p=p: setup.decoder(p)) for p in PATHS})
    phase("cmpa", {p: (lambda p=p: setup.cmpa(p)) for p in PATHS})
    phase("optimiser", {p: (lambda p=p: setup.optimiser_update(p)) for p in PATHS})
    setup.model.zero_grad(set_to_none=True)
    report["host_syncs_per_micro_batch"] = {p: setup.micro_batch_syncs(p) for p in PATHS}

    # the whole step: losses from the same weights first, then throughput
    losses = {}
    for p in PATHS:
        setup.reset()
        losses[p] = setup.step(p)
    report["step_losses"] = losses
    relative = {k: abs(losses["fast"][k] - losses["reference"][k]) / max(abs(losses["reference"][k]), 1e-12)
                for k in losses["reference"] if k.startswith("loss")}
    report["step_loss_relative_diff"] = relative
    report["step_losses_within_tolerance"] = max(relative.values()) <= LOSS_TOLERANCE
    setup.reset()
    step = phase("step", {p: (lambda p=p: setup.step(p)) for p in PATHS})
    images = micro * args.accumulation
    for p in PATHS:
        step[p]["images_per_s"] = images / (step[p]["median_ms"] / 1000)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        setup.step("fast")
        report["fast_step_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    print(f"{report['device']} | {report['model']} | {report['dtype']} | micro-batch {micro} x {args.accumulation} | "
          f"crop {crop} | PAR on | median of {args.repeats}")
    print(f"{'phase':14s} {'reference ms':>13s} {'fast ms':>9s} {'speed-up':>9s}")
    for name, result in report["phases"].items():
        ref, fast = result["reference"]["median_ms"], result["fast"]["median_ms"]
        print(f"{name:14s} {ref:13.1f} {fast:9.1f} {ref / fast if fast > 0 else float('nan'):8.2f}x")
    print(f"step: {step['reference']['images_per_s']:.0f} -> {step['fast']['images_per_s']:.0f} images/s; "
          f"host syncs per micro-batch {report['host_syncs_per_micro_batch']}; "
          f"PAR check {report['par_check']}; uint8 conversion exact {report['uint8_to_float_exact']}; "
          f"step losses relative diff max {max(relative.values()):.1e} "
          f"(within {LOSS_TOLERANCE}: {report['step_losses_within_tolerance']})")
    emit(report, args.out)


if __name__ == "__main__":
    main()
