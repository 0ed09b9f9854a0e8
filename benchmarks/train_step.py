"""Throughput of the whole SSR training step: `ssr.train.optimiser_step`, exactly as training calls it.

Timed: CLIP forward with the attention of the affinity's blocks, GradCAM, DINO's last-block
attention, the affinity, SGC, online labels, CMPA (ISA/TSA, L_proto), decoder forward and
backward with L_ce and the affinity loss, and the AdamW step, with the operators params.yaml's
`train.fast_path` selects (benchmarks/step_phases.py compares the two paths phase by phase).
Not timed: data loading (benchmarks/data_loading.py), whose crops arrive here pre-made.

On CUDA: the real configuration (ViT-B/16 + DINO ViT-S/16, random weights), bf16 autocast,
reporting images/s, peak memory, FLOPs per image (torch's FLOP counter over one step, forward
and backward) and MFU against the bf16 matrix-product rate measured in the same process. On
CPU: the tiny configuration, a smoke run.

    python benchmarks/train_step.py [--device cuda] [--micro-batch 16 32 64] [--crop 320]
        [--accumulation 1] [--steps 10] [--no-amp] [--profile] [--compare]

`--compare` times each speed option against the baseline in the same process (alternating);
`--profile` prints torch.profiler's top operators of one step. The last line of output is a
JSON object with every figure; `--out` also writes it to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from configs import REPO, build, device_name, emit, fill_prototypes, synthetic_batch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ssr.config import load_params  # noqa: E402  (configs puts the repo on sys.path)
from ssr.train import build_optimiser, optimiser_step  # noqa: E402

DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16 tensor-core peaks (SXM)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device, dtype=torch.bfloat16, n=8192, repeats=10) -> float:
    """The device's measured bf16 matrix-product rate: the ceiling MFU is taken against."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


class Setup:
    """A model, its optimiser and pre-made micro-batches for one (micro-batch, crop) size."""

    def __init__(self, kind, device, micro, crop, accumulation, classes_per_image, amp, fused_adamw=False, par=None):
        self.params, self.backbones, self.model = build(kind, device)
        if par is not None:     # switch WeCLIP's PAR refinement of the online labels on or off (to see its cost)
            voc = self.params.dataset("voc").model_copy(update={"par": par})
            self.params = self.params.model_copy(update={"datasets": {**self.params.datasets, "voc": voc}})
        gen = torch.Generator().manual_seed(0)
        fill_prototypes(self.model, gen)
        self.preset = self.params.preset("voc")
        self.optimiser = build_optimiser(self.model, self.preset)
        if fused_adamw:
            groups = [{"params": g["params"], "lr_mult": g["lr_mult"]} for g in self.optimiser.param_groups]
            self.optimiser = torch.optim.AdamW(groups, lr=self.preset.lr, weight_decay=self.preset.weight_decay, fused=True)
        regions = self.params.superpixels.n_clusters
        # a few distinct step inputs, rotated, so no step re-reads the previous one's cached tensors
        self.steps = [[{k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                        for k, v in synthetic_batch(micro, crop, regions, classes_per_image, gen).items()}
                       for _ in range(accumulation)] for _ in range(3)]
        self.amp = torch.bfloat16 if amp else None
        self.micro, self.accumulation, self.device, self.count = micro, accumulation, device, 0

    def step(self):
        batches = self.steps[self.count % len(self.steps)]
        self.count += 1
        return optimiser_step(self.backbones, self.model, self.optimiser, batches, self.params, self.preset,
                              lr=self.preset.lr, par=self.params.dataset("voc").par, autocast_dtype=self.amp)

    @property
    def images(self) -> int:
        return self.micro * self.accumulation


def time_steps(setup: Setup, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        setup.step()
    times = []
    for _ in range(steps):
        sync(setup.device)
        start = time.perf_counter()
        setup.step()
        sync(setup.device)
        times.append(time.perf_counter() - start)
    return times


class FlopCount(TorchDispatchMode):
    """Matrix-product and convolution FLOPs of every operator run inside, by torch's own formulas.

    torch's FlopCounterMode also tracks modules with backward hooks, which autograd.grad (GradCAM)
    refuses; this mode only counts.
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def flops_per_image(setup: Setup) -> float:
    with FlopCount() as counter:
        setup.step()
    return counter.total / setup.images


def peak_memory(setup: Setup):
    if setup.device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(setup.device)
    setup.step()
    sync(setup.device)
    return torch.cuda.max_memory_allocated(setup.device) / 2**30


def profile_table(setup: Setup, rows: int = 15) -> tuple[str, list[dict]]:
    """torch.profiler's operators of one step, by self time on the device (CPU when there is none)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = setup.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    setup.step()
    with profile(activities=activities) as prof:
        setup.step()
        sync(setup.device)
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    averages = prof.key_averages()
    total = sum(getattr(e, key) for e in averages) or 1
    top = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:rows]
    table = averages.table(sort_by=key, row_limit=rows)
    return table, [{"op": e.key, "self_ms": getattr(e, key) / 1000, "share": getattr(e, key) / total,
                    "calls": e.count} for e in top]


SPEED_OPTIONS = {
    "fused_adamw": "torch.optim.AdamW(fused=True): one kernel for the whole update",
    "tf32": "TF32 for the float32 matrix products (affinity power, CMPA heads, GradCAM weights)",
}


@contextlib.contextmanager
def tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def compare(kind, device, micro, crop, classes, amp, steps, rounds=3) -> dict:
    """Each speed option against the baseline, alternating rounds in one process: median ms/step."""
    out = {}
    base = Setup(kind, device, micro, crop, 1, classes, amp)
    for name in SPEED_OPTIONS:
        if name == "fused_adamw" and device.type != "cuda":
            continue
        option = Setup(kind, device, micro, crop, 1, classes, amp, fused_adamw=name == "fused_adamw")
        times = {"baseline": [], name: []}
        for _ in range(rounds):
            times["baseline"] += time_steps(base, steps, 1)
            with tf32(name == "tf32"):
                times[name] += time_steps(option, steps, 1)
        b, o = statistics.median(times["baseline"]), statistics.median(times[name])
        out[name] = {"what": SPEED_OPTIONS[name], "baseline_ms": 1000 * b, "option_ms": 1000 * o, "speedup": b / o,
                     "spread_baseline_ms": 1000 * (max(times["baseline"]) - min(times["baseline"]))}
    return out


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--model", choices=("real", "tiny"), help="default: real on CUDA, tiny on CPU")
    ap.add_argument("--micro-batch", type=int, nargs="+", help="micro-batch sizes to time (default: 16 32 64 on CUDA, 8 on CPU)")
    ap.add_argument("--crop", type=int, help="crop side (default: 320, the voc preset; 32 tiny)")
    ap.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimiser step")
    ap.add_argument("--classes-per-image", type=int, default=3, help="each image has 1..this many classes")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-amp", action="store_true", help="float32 on CUDA (bf16 autocast otherwise; CPU is float32)")
    ap.add_argument("--par", choices=("on", "off"),
                    help="force PAR refinement of the online labels on or off (default: datasets.voc.par)")
    ap.add_argument("--profile", action="store_true", help="print the top operators of one step (first micro-batch size)")
    ap.add_argument("--compare", action="store_true", help="time the speed options against the baseline (first micro-batch size)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    kind = args.model or ("real" if device.type == "cuda" else "tiny")
    crop = args.crop or (320 if kind == "real" else 32)
    micros = args.micro_batch or ([16, 32, 64] if device.type == "cuda" else [8])
    amp = device.type == "cuda" and not args.no_amp
    report = {"benchmark": "train_step", "device": device_name(device), "torch": torch.__version__,
              "model": "ViT-B-16 + DINO ViT-S/16 (random init)" if kind == "real" else "tiny CLIP + tiny DINO (random init)",
              "dtype": "bf16 autocast" if amp else "fp32", "crop": crop, "accumulation": args.accumulation,
              "classes_per_image": f"1..{args.classes_per_image}", "steps": args.steps, "sizes": [],
              "par": args.par or "datasets.voc.par", "fast_path": load_params(REPO / "params.yaml").train.fast_path}
    if device.type == "cuda":
        report["measured_bf16_tflops"] = matmul_tflops(device)
        report["datasheet_bf16_tflops"] = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in report["device"]), None)
    for micro in micros:
        setup = Setup(kind, device, micro, crop, args.accumulation, args.classes_per_image, amp,
                      par=None if args.par is None else args.par == "on")
        times = time_steps(setup, args.steps, args.warmup)
        median = statistics.median(times)
        entry = {"micro_batch": micro, "images_per_step": setup.images, "median_step_s": median,
                 "images_per_s": setup.images / median, "step_times_s": times,
                 "flops_per_image": flops_per_image(setup), "peak_memory_gib": peak_memory(setup)}
        if device.type == "cuda":
            achieved = entry["flops_per_image"] * entry["images_per_s"] / 1e12
            entry["achieved_tflops"] = achieved
            entry["mfu_vs_measured"] = achieved / report["measured_bf16_tflops"]
            if report["datasheet_bf16_tflops"]:
                entry["mfu_vs_datasheet"] = achieved / report["datasheet_bf16_tflops"]
        report["sizes"].append(entry)
        mem = f"{entry['peak_memory_gib']:.1f} GiB" if entry["peak_memory_gib"] is not None else "n/a"
        mfu = f", MFU {100 * entry['mfu_vs_measured']:.1f}% of measured bf16" if "mfu_vs_measured" in entry else ""
        print(f"micro-batch {micro:3d} x {args.accumulation}: {1000 * median:8.1f} ms/step, "
              f"{entry['images_per_s']:8.1f} images/s, {entry['flops_per_image'] / 1e9:6.1f} GFLOP/image, peak {mem}{mfu}",
              flush=True)
        if args.profile and micro == micros[0]:
            table, top = profile_table(setup)
            print(table, flush=True)
            report["profile_top"] = top
        del setup
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.compare:
        report["compare"] = compare(kind, device, micros[0], crop, args.classes_per_image, amp, args.steps)
        for name, c in report["compare"].items():
            print(f"{name}: {c['baseline_ms']:.1f} -> {c['option_ms']:.1f} ms/step ({c['speedup']:.3f}x; baseline spread "
                  f"{c['spread_baseline_ms']:.1f} ms) - {c['what']}", flush=True)
    emit(report, args.out)


if __name__ == "__main__":
    main()
