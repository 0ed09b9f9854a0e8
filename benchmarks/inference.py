"""Images/s of the evaluate stage's inference: multi-scale + flip decoder, then DenseCRF.

`ssr.infer.image_probs` (scales 1.0 and 0.75, each with its flip, as params.yaml's `infer`)
and `ssr.crf.dense_crf_from_params`, timed per image:
- demo: the committed demo CLIP on 64 px demo images;
- real: ViT-B/16 (random weights) at long side 512 on a 375x500 image, VOC's size.

    python benchmarks/inference.py [--device cpu] [--images 8] [--config demo real] [--out FILE]

Prints a line per configuration and, last, a JSON object.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from configs import build, device_name, emit

from ssr.crf import dense_crf_from_params  # noqa: E402
from ssr.data.demo import render_sample  # noqa: E402
from ssr.infer import image_probs  # noqa: E402


def timed(fn, device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--config", nargs="+", choices=("demo", "real"), default=["demo", "real"])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"benchmark": "inference", "device": device_name(device), "torch": torch.__version__, "configs": {}}
    rng = np.random.default_rng(0)
    for kind in args.config:
        params, backbones, model = build(kind, device)
        model.eval()
        if kind == "demo":
            images = [render_sample(params.demo, "val", i).image for i in range(args.images)]
            long_side = params.dataset("demo").long_side
        else:
            images = [rng.integers(0, 256, (375, 500, 3), dtype=np.uint8) for _ in range(args.images)]
            long_side = params.dataset("voc").long_side
        infer = params.infer
        image_probs(backbones, model, images[0], long_side, infer, device=device)   # warm-up
        decoder, crf = [], []
        for image in images:
            predict = functools.partial(image_probs, backbones, model, image, long_side, infer, device=device)
            seconds, probs = timed(predict, device)
            decoder.append(seconds)
            crf.append(timed(functools.partial(dense_crf_from_params, image, probs, infer), device)[0])
        entry = {"image_size": list(images[0].shape[:2]), "long_side": long_side, "scales": infer.scales, "flip": infer.flip,
                 "decoder_images_per_s": 1 / statistics.median(decoder), "crf_images_per_s": 1 / statistics.median(crf),
                 "images_per_s": 1 / (statistics.median(decoder) + statistics.median(crf)), "images": len(images)}
        report["configs"][kind] = entry
        print(f"{kind:5s} {entry['image_size']} -> long side {long_side}, scales {infer.scales}, flip {infer.flip}: "
              f"decoder {entry['decoder_images_per_s']:.2f} images/s, DenseCRF {entry['crf_images_per_s']:.2f} images/s, "
              f"together {entry['images_per_s']:.2f} images/s", flush=True)
    emit(report, args.out)


if __name__ == "__main__":
    main()
