"""Compare readings of the paper's open choices on the offline demo, over training seeds.

Every reading is the repository's params.yaml with a few dotted keys changed. Each runs the
real stages (`ssr train`, `ssr pseudo-labels`, optionally `ssr evaluate`) for the demo's
training seeds into its own folder, sharing one prepared dataset and its superpixels (a reading
that changes superpixels.* keys computes superpixels of its own beside the shared images).
Choices are made on the demo's train split: the seeds' scores, and for readings that act on the
decoder only (PAR, its learning rate) `--decoder-on-train`, the decoder's mIoU on the train split;
`--evaluate` adds the val figures for reporting only.

    python experiments/demo_readings.py --out /tmp/readings \\
        --reading default \\
        --reading image_denominator sgc.denominator=image sgc.rho=0.1 \\
        --reading finer_regions superpixels.n_clusters=32 \\
        [--decoder-on-train] [--evaluate] [--seeds 0 1 2]

Prints one JSON line per reading (mean, std, min, max of every seed row) and writes
{out}/{reading}/results/demo_{seeds,miou}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ROWS = ("cam", "clip", "dino", "sgc", "method")


def ssr(*args: str, cwd: Path, threads: int = 1) -> None:
    cmd = [sys.executable, "-m", "ssr", *args, "--quiet", "--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stderr[-3000:]}")


def write_params(folder: Path, data_root: Path, overrides: dict, seeds: list[int]) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data_root"], raw["results_root"] = str(data_root), str(folder / "results")
    for backbone in ("demo_clip", "demo_dino"):
        raw[backbone]["checkpoint"] = str(REPO / raw[backbone]["checkpoint"])
    raw["datasets"]["demo"].update(seeds=seeds, variants={})
    raw["train"]["num_workers"] = 0       # one process per reading: readings run side by side on a small machine
    for dotted, value in overrides.items():
        node, parts = raw, dotted.split(".")
        for key in parts[:-1]:
            node = node[key]
        if parts[-1] not in node:
            raise SystemExit(f"{dotted}: no such key in params.yaml")
        node[parts[-1]] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def superpixel_root(folder: Path, data_root: Path, overrides: dict, seeds: list[int]) -> Path:
    """A data root of the reading's own for superpixels.* readings: the shared images, its own superpixels.h5."""
    root = folder / "data"
    shared, own = data_root / "demo", root / "demo"
    own.mkdir(parents=True, exist_ok=True)
    for entry in shared.iterdir():
        if entry.name != "superpixels.h5" and not (own / entry.name).exists():
            (own / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    if not (own / "superpixels.h5").is_file():
        path = write_params(folder / "prep", root, overrides, seeds)
        ssr("superpixels", "--dataset", "demo", "--params", str(path), cwd=REPO)
    return root


def decoder_scores(results: Path) -> tuple[list[float], list[float]]:
    """The decoder's mIoU without and with DenseCRF in results/demo_miou.json, each [mean, std] in %."""
    miou = json.loads((results / "demo_miou.json").read_text())
    return tuple([round(100 * miou[f"{key}{s}"], 1) for s in ("", "_std")] for key in ("miou", "crf_miou"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reading", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"),
                        help="a name, then dotted params keys with YAML values")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--evaluate", action="store_true", help="also score the decoder on val (for reporting, not choosing)")
    parser.add_argument("--decoder-on-train", action="store_true",
                        help="also score the decoder on the train split (for choosing)")
    args = parser.parse_args()

    data_root = args.out / "data"
    prep = write_params(args.out / "prep", data_root, {}, args.seeds)
    if not (data_root / "demo" / "superpixels.h5").is_file():
        ssr("prepare", "--dataset", "demo", "--params", str(prep), cwd=REPO)
        ssr("superpixels", "--dataset", "demo", "--params", str(prep), cwd=REPO)
    for name, *pairs in args.reading:
        overrides = {k: yaml.safe_load(v) for k, v in (pair.split("=", 1) for pair in pairs)}
        folder = args.out / name
        reading_root = data_root
        if any(key.startswith("superpixels.") for key in overrides):
            reading_root = superpixel_root(folder, data_root, overrides, args.seeds)
        path = write_params(folder, reading_root, overrides, args.seeds)
        stages = ("train", "pseudo-labels", "evaluate") if args.evaluate else ("train", "pseudo-labels")
        for stage in stages:
            ssr(stage, "--dataset", "demo", "--params", str(path), cwd=REPO)
        seeds = json.loads((folder / "results" / "demo_seeds.json").read_text())
        line = {"reading": name, "overrides": overrides}
        for row in ROWS:
            if seeds.get(f"{row}_miou") is not None:
                line[row] = [round(100 * seeds[f"{row}_miou{s}"], 1) for s in ("", "_std", "_min", "_max")]
        if args.evaluate:
            line["val"], line["val_crf"] = decoder_scores(folder / "results")
        if args.decoder_on_train:
            # the same trained models scored on the train split, in a folder of their own
            on_train = folder / "decoder_on_train"
            path = write_params(on_train, reading_root, {**overrides, "datasets.demo.val_split": "train"}, args.seeds)
            (on_train / "results").mkdir(parents=True, exist_ok=True)
            link = on_train / "results" / "demo"
            if not link.exists():
                link.symlink_to(folder / "results" / "demo", target_is_directory=True)
            ssr("evaluate", "--dataset", "demo", "--params", str(path), cwd=REPO)
            line["decoder_train"], line["decoder_train_crf"] = decoder_scores(on_train / "results")
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
