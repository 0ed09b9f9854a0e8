"""Seeds are scored where the paper scores them: VOC `train` (VOC's own masks), while the
pseudo-labels are exported for all of `train_aug`, as retraining needs.

A tiny VOC 2012 + SBD tree in the official layout (tests/archives.py), the tiny random-init
CLIP of conftest standing in for ViT-B/16, the `voc` dataset entry otherwise as configured.
"""

from __future__ import annotations

import json
from pathlib import Path

import archives as A
import numpy as np
import pytest
from conftest import write_tiny_params

from ssr.cli import main as ssr_main
from ssr.data.layout import DatasetLayout, read_label_png

VOC_TINY = {
    "datasets.voc.clip_model": "demo", "datasets.voc.clip_pretrained": "", "datasets.voc.dino_model": "",
    "datasets.voc.long_side": 32, "datasets.voc.par": False,
    "train_presets.voc.iterations": 2, "train_presets.voc.batch_size": 2, "train_presets.voc.accumulation": 1,
    "train_presets.voc.crop_size": 32, "train_presets.voc.warmup": 1, "train_presets.voc.refresh_every": 1,
}


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory, tiny_clip_dir):
    base = tmp_path_factory.mktemp("voc_seeds")
    trees = base / "trees"
    A.build_voc_tree(trees)
    A.build_sbd_tree(trees)
    path, params = write_tiny_params(base, base / "data", tiny_clip_dir, **VOC_TINY)
    assert ssr_main(["prepare", "--dataset", "voc", "--params", str(path), "--archives", str(trees), "--quiet"]) == 0
    for stage in ("superpixels", "train", "pseudo-labels"):
        assert ssr_main([stage, "--dataset", "voc", "--params", str(path), "--quiet"]) == 0, stage
    return path, params


def _miou(pairs, num_classes=21) -> float:
    inter, union = np.zeros(num_classes), np.zeros(num_classes)
    for pred, gt in pairs:
        keep = gt != 255
        for c in range(num_classes):
            inter[c] += np.sum((pred == c) & (gt == c) & keep)
            union[c] += np.sum(((pred == c) | (gt == c)) & keep)
    return float((inter[union > 0] / union[union > 0]).mean())


def test_voc_seeds_are_scored_on_train_not_train_aug(voc_run):
    path, params = voc_run
    layout = DatasetLayout(params.dataset_root("voc"))
    assert params.dataset("voc").train_split == "train_aug" and params.dataset("voc").seed_split == "train"
    train, train_aug = layout.split("train"), layout.split("train_aug")
    assert set(train) < set(train_aug)

    seeds = json.loads((Path(params.results_root) / "voc_seeds.json").read_text())
    assert seeds["split"] == "train" and seeds["images"] == len(train)
    exported = Path(params.results_root) / "voc" / "method" / "seed0" / "pseudo_labels"
    assert sorted(p.stem for p in exported.glob("*.png")) == sorted(train_aug)     # exported for retraining

    def pairs(ids):
        return [(read_label_png(exported / f"{i}.png"), read_label_png(layout.label_path(i))) for i in ids]

    assert seeds["method_miou"] == pytest.approx(_miou(pairs(train)), abs=1e-12)
    bites = "train and train_aug score alike: the test would not bite"
    assert seeds["method_miou"] != pytest.approx(_miou(pairs(train_aug)), abs=1e-6), bites


def test_a_seed_split_outside_the_exported_split_is_refused(voc_run, tmp_path, capsys):
    path, params = voc_run
    bad = tmp_path / "params.yaml"
    bad.write_text(path.read_text().replace("seed_split: train\n", "seed_split: val\n", 2))
    assert ssr_main(["pseudo-labels", "--dataset", "voc", "--params", str(bad), "--quiet"]) == 2
    assert "datasets.voc.seed_split" in capsys.readouterr().err
