"""What an A_DINO can add to Eq. 9 on the demo: the seed rows re-scored with A_DINO replaced by
affinities drawn from the ground truth.

The trained models of a reading folder (`experiments/demo_readings.py`, trained with a DINO:
`datasets.demo.dino_model=demo`) are re-scored on the seed split, as `ssr pseudo-labels` scores
them. Only A_DINO changes, and the CMPA heads never see the affinity, so the CAM and + CLIP rows
stay the folder's own and the + DINO and + SGC rows are exact for each affinity:

- `dino`: the folder's DINO, whose rows must equal the folder's demo_seeds.json (a check);
- `class_oracle`: `ssr.attention_quality.object_oracle` over the ground truth's class shares, the
  A_DINO of a perfect grouping of every class;
- `instance_oracle`: the same over the demo generator's instances (no patch attends to another
  object of its class);
- `dino_on_oracle`: the DINO's rows kept only on the class oracle's support and renormalised: its
  distribution over its own objects, without the mass it puts elsewhere.

    python experiments/affinity_bounds.py /tmp/readings/dino [--touch 0.25] [--set sgc.rho=0.1 ...]
        [--sgc-regions instances]

`--set` changes the re-scoring's params only (affinity.*, sgc.*, pseudo_labels.*), never the models.
`--sgc-regions instances` gives SGC the ground truth's regions (each object one region, the
background one) in place of the superpixel clusters: SGC's rule with perfect regions.
Prints one JSON line per affinity: the mean, std, min and max over seeds of each row's mIoU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssr.attention_quality import object_oracle, patch_label_shares  # noqa: E402
from ssr.backbones import dino_last_attention  # noqa: E402
from ssr.cam import class_slots  # noqa: E402
from ssr.checkpoint import read_model  # noqa: E402
from ssr.cli import demo_dir, run_dir  # noqa: E402
from ssr.config import METHOD_RUN, ConfigError, Params  # noqa: E402
from ssr.config import load_params as ssr_load_params  # noqa: E402
from ssr.data.dataset import WholeImages, collate  # noqa: E402
from ssr.data.demo import render_sample  # noqa: E402
from ssr.data.layout import DatasetLayout  # noqa: E402
from ssr.data.transforms import normalise  # noqa: E402
from ssr.metrics import aggregate_seeds, confusion_matrix, segmentation_scores  # noqa: E402
from ssr.model import ABLATION_ROWS, build_backbones, cams_to_labels, refined_cams  # noqa: E402
from ssr.weights import cached_models  # noqa: E402

AFFINITIES = ("dino", "class_oracle", "instance_oracle", "dino_on_oracle")
BATCH = 8  # seed_metrics' batches, so that the `dino` rows sum in the same order as the folder's


def load_params(folder: Path, overrides: list[str]) -> Params:
    """The reading's params.yaml with the re-scoring's `overrides` (dotted KEY=VALUE)."""
    path = folder / "params.yaml"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; pass a reading folder of experiments/demo_readings.py")
    changes = {}
    for item in overrides:
        dotted, _, value = item.partition("=")
        if dotted.split(".")[0] not in ("affinity", "sgc", "pseudo_labels"):
            raise SystemExit(f"--set {item}: only affinity.*, sgc.* and pseudo_labels.* keys change the re-scoring")
        changes[dotted] = yaml.safe_load(value)
    try:
        return ssr_load_params(path, site=False).with_overrides(changes, "--set ")
    except ConfigError as err:
        raise SystemExit(f"{path}: {err}") from None


def instance_maps(items: list[dict], params: Params, split: str) -> torch.Tensor:
    """(B, H, W) long: the demo generator's instance ids (0 = background) of a batch of demo images."""
    return torch.from_numpy(np.stack([render_sample(params.demo, split, int(item["id"].rsplit("_", 1)[1])).instances
                                      for item in items]).astype(np.int64))


def oracles(items: list[dict], instances: torch.Tensor, grid: tuple[int, int], num_classes: int, touch: float):
    """-> {affinity: (B, N, N)} of the ground-truth affinities for a batch of demo images."""
    labels = torch.from_numpy(np.stack([item["gt"] for item in items]).astype(np.int64))
    classes = patch_label_shares(labels, grid, num_classes)
    return {"class_oracle": object_oracle(classes, touch),
            "instance_oracle": object_oracle(patch_label_shares(instances, grid, int(instances.max()) + 1), touch)}


def bounds(folder: Path, *, touch: float = 0.25, overrides: list[str] = (), seeds: list[int] | None = None,
           sgc_regions: str = "superpixels") -> dict:
    """-> {affinity: {seed: {row: mIoU}}} over the demo's seed split."""
    params = load_params(folder, list(overrides))
    ds = params.dataset("demo")
    if not ds.dino_model:
        raise SystemExit(f"{folder}: trained without a DINO (datasets.demo.dino_model is empty); the rows need one")
    root = params.dataset_root("demo")
    classes = DatasetLayout(root).classes()
    backbones = build_backbones(ds, classes[1:], demo_clip_dir=demo_dir(params, "demo_clip"),
                                demo_dino_dir=demo_dir(params, "demo_dino"),
                                **cached_models(ds, params.weights_root, "demo"))
    data = WholeImages(root, ds.train_split, long_side=ds.long_side, patch_size=backbones.patch_size,
                       superpixels=root / "superpixels.h5")
    score_ids = sorted(set(DatasetLayout(root).split(ds.seed_split)))
    index = {image_id: k for k, image_id in enumerate(data.ids)}
    out = {}
    for seed in seeds if seeds is not None else ds.seeds:
        model, _ = read_model(run_dir(params, "demo", METHOD_RUN, seed))
        conf = {(a, row): np.zeros((len(classes), len(classes) + 1), np.int64) for a in AFFINITIES for row in ABLATION_ROWS}
        for start in range(0, len(score_ids), BATCH):
            items = [data[index[i]] for i in score_ids[start:start + BATCH]]
            if any(item["gt"].shape != tuple(item["image"].shape[-2:]) for item in items):
                raise SystemExit("the oracles need the images at their original size (datasets.demo.long_side)")
            batch = collate(items)
            images = batch["image"]
            slots, valid = class_slots(batch["labels"])
            with torch.no_grad():
                a_dino = dino_last_attention(backbones.dino, normalise(images, backbones.dino_mean, backbones.dino_std))
            grid = (images.shape[-2] // backbones.patch_size, images.shape[-1] // backbones.patch_size)
            instances = instance_maps(items, params, ds.train_split)
            truth = oracles(items, instances, grid, len(classes), touch)
            regions = batch["regions"] if sgc_regions == "superpixels" else instances
            support = truth["class_oracle"] > 0
            replace = {"dino": None, **truth,
                       "dino_on_oracle": a_dino / a_dino.sum(dim=-1, keepdim=True) * support}
            for affinity, attention in replace.items():
                cams = refined_cams(backbones, model, images, slots, valid, regions, params.affinity, params.sgc,
                                    num_regions=max(params.superpixels.n_clusters, int(regions.max()) + 1),
                                    dino_attention=attention)
                for row, value in cams.rows.items():
                    for b, item in enumerate(items):
                        label = cams_to_labels(value[b:b + 1], slots[b:b + 1], valid[b:b + 1], cams.grid,
                                               item["original"].shape[:2], params.pseudo_labels)[0]
                        conf[affinity, row] += confusion_matrix(label.numpy().astype(np.uint8), item["gt"], len(classes))
        for (affinity, row), matrix in conf.items():
            out.setdefault(affinity, {}).setdefault(seed, {})[row] = segmentation_scores(matrix, classes)["miou"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a demo_readings.py reading folder trained with a DINO")
    parser.add_argument("--touch", type=float, default=0.25,
                        help="a patch whose object pixels exceed this share of it attends to its objects (the oracles)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sgc-regions", choices=("superpixels", "instances"), default="superpixels",
                        help="SGC's regions: the superpixel clusters, or the ground truth's objects and background")
    parser.add_argument("--seeds", type=int, nargs="*")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    found = bounds(args.folder, touch=args.touch, overrides=args.overrides, seeds=args.seeds, sgc_regions=args.sgc_regions)
    for affinity, per_seed in found.items():
        summary = aggregate_seeds(list(per_seed.values()))
        print(json.dumps({"affinity": affinity, "touch": args.touch, "set": args.overrides, "sgc_regions": args.sgc_regions,
                          **{k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
