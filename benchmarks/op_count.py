"""Dispatched operators per micro-batch of the real configuration: the reference step against the fast path.

A CPU proxy for the GPU step any machine can check: on a GPU nearly every operator that is not
a view launches at least one kernel, and most of this step's kernels are small (micro-batch
launch overhead, not FLOPs, sets its time), so fewer operators means a faster step. One
micro-batch of `ssr.train` (the CAM pass `prepare_micro_batch`, the loss `micro_batch_loss`,
its backward) runs under torch.profiler with `train.fast_path` false, then true, in this process,
on the same inputs: ViT-B/16 + DINO ViT-S/16 (random init), crop 320, PAR on, micro-batch 2,
fp32 (the CPU's dtype; bf16 autocast would add casts to the reference only).

Counted: the profiler's leaf aten operators (those calling no other operator) and each Triton
launch. Sorted into kernels (everything that computes or copies), views (outputs aliasing an
input: view, transpose, slice...), allocations (empty, resize_: no kernel) and, among the
kernels, the ones that wait for the device on a GPU (nonzero, item / _local_scalar_dense);
metadata queries (result_type, size...) and operators that return their input (dropout in eval
mode, contiguous of a contiguous tensor...) are left out.
The fast path's PAR runs as Triton kernels: on the CPU through Triton's interpreter, which
this script turns on (TRITON_INTERPRET=1, before Triton loads); each launch counts as one kernel
whatever the interpreter does inside it.

    python benchmarks/op_count.py [--micro-batch 2] [--crop 320] [--classes-per-image 3] [--out FILE]

Prints a table and one JSON line (with the ratio reference / fast); takes a few minutes on 2 cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before torch (and so Triton) loads

import argparse  # noqa: E402
import collections  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from configs import build, device_name, emit, fill_prototypes, synthetic_batch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from ssr.train import micro_batch_loss, prepare_micro_batch, step_counts  # noqa: E402

ALLOCATIONS = {"aten::empty", "aten::empty_strided", "aten::resize_", "aten::set_", "aten::empty_like"}
# No kernel and no alias annotation in their schema: metadata queries, and views the schema does not mark.
METADATA = {"aten::result_type", "aten::size", "aten::stride", "aten::numel", "aten::dim", "aten::is_same_size",
            "aten::_has_compatible_shallow_copy_type", "aten::is_floating_point", "aten::is_complex"}
UNMARKED_VIEWS = {"aten::_unsafe_view", "aten::lift_fresh", "aten::_reshape_alias"}
# Operators that return their input when they call nothing else: dropout in eval mode, contiguous of a
# contiguous tensor, to() to its own dtype and device.
NO_OP_WHEN_LEAF = {"aten::dropout", "aten::contiguous", "aten::to", "aten::type_as"}
SYNCS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::masked_select"}


def is_view(name: str) -> bool:
    """An operator whose output aliases an input without writing it (its schema says so)."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if packet is None:
        return False
    for overload in packet.overloads():
        schema = getattr(packet, overload)._schema
        if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            return True
    return False


def classify(events) -> dict:
    """Leaf aten operators and Triton launches of a profile -> counts per kind and per operator."""
    counts = collections.Counter()
    per_op = collections.Counter()
    views: dict[str, bool] = {}

    def inside_triton(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("triton::"):
                return True
            parent = parent.cpu_parent
        return False

    for event in events:
        name = event.name
        if name.startswith("triton::"):
            if not inside_triton(event):
                counts["kernels"] += 1
                per_op[name] += 1
            continue
        if not name.startswith("aten::") or any(c.name.startswith("aten::") for c in event.cpu_children):
            continue
        if inside_triton(event):
            continue
        if name not in views:
            views[name] = name in UNMARKED_VIEWS or is_view(name)
        kind = ("views" if views[name] else "allocations" if name in ALLOCATIONS
                else "metadata" if name in METADATA or name in NO_OP_WHEN_LEAF else "kernels")
        counts[kind] += 1
        if name in SYNCS:
            counts["syncs"] += 1
        if kind == "kernels":
            per_op[name] += 1
    return {"counts": dict(counts), "top_kernels": per_op.most_common(12)}


def micro_batch(backbones, model, batch, params, preset, fast: bool):
    params = params.model_copy(update={"train": params.train.model_copy(update={"fast_path": fast})})
    m = prepare_micro_batch(backbones, model, batch, params, num_regions=params.superpixels.n_clusters, par=True)
    loss, _ = micro_batch_loss(backbones, model, m, params, preset, step_counts([m], m.labels.device))
    loss.backward()


def compact(batch: dict) -> dict:
    """The batch as the fast path's loader delivers it (TrainCrops' compact): uint8 images and region maps."""
    return {**batch, "image": (batch["image"] * 255).round().to(torch.uint8), "regions": batch["regions"].to(torch.uint8)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("real", "tiny"), default="real")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--crop", type=int, default=320)
    ap.add_argument("--classes-per-image", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    params, backbones, model = build(args.model, device)
    params = params.model_copy(update={"datasets": {**params.datasets,
                                                    "voc": params.dataset("voc").model_copy(update={"par": True})}})
    gen = torch.Generator().manual_seed(0)
    fill_prototypes(model, gen)
    preset = params.preset("voc")
    batch = synthetic_batch(args.micro_batch, args.crop, params.superpixels.n_clusters, args.classes_per_image, gen)
    # exact uint8 values, so that both paths see the same images
    batch["image"] = (batch["image"] * 255).round() / 255
    report = {"benchmark": "op_count", "device": device_name(device), "torch": torch.__version__,
              "model": "ViT-B-16 + DINO ViT-S/16 (random init)" if args.model == "real" else "tiny",
              "micro_batch": args.micro_batch, "crop": args.crop, "classes_per_image": f"1..{args.classes_per_image}",
              "par": True, "pseudo_label_par_iterations": params.pseudo_labels.par_iterations}
    for name, fast in (("reference", False), ("fast", True)):
        inputs = compact(batch) if fast else batch
        micro_batch(backbones, model, inputs, params, preset, fast)          # warm-up: caches, first-call setup
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            micro_batch(backbones, model, inputs, params, preset, fast)
        seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        report[name] = {**classify(prof.events()), "profiled_seconds": seconds}
        c = report[name]["counts"]
        print(f"{name:9s}: {c.get('kernels', 0):6d} kernel-issuing ops, {c.get('views', 0):6d} views, "
              f"{c.get('allocations', 0):5d} allocations, {c.get('syncs', 0):3d} of them host syncs  ({seconds:.0f} s profiled)",
              flush=True)
    ref, fast = report["reference"]["counts"], report["fast"]["counts"]
    report["kernel_ratio"] = ref.get("kernels", 0) / max(1, fast.get("kernels", 0))
    dispatched = [sum(c.get(k, 0) for k in ("kernels", "views", "allocations")) for c in (ref, fast)]
    report["all_ops_ratio"] = dispatched[0] / max(1, dispatched[1])
    print(f"reference / fast: {report['kernel_ratio']:.2f}x fewer kernel-issuing ops, {report['all_ops_ratio']:.2f}x fewer "
          f"dispatched ops in all")
    for name in ("reference", "fast"):
        print(f"  {name} top kernels: " + ", ".join(f"{op} {n}" for op, n in report[name]["top_kernels"][:8]))
    emit(report, args.out)


if __name__ == "__main__":
    main()
