"""The real configuration, executed: ViT-B/16 + DINO ViT-S/16 at crop 320, inference at long side
512 with scales 1 and 0.75 plus flip, and DenseCRF, through the `ssr` command line.

Everything is the `voc` entry of params.yaml except what must shrink for a CPU (2 iterations
of batch 2, one seed) and the weights' source: random-init ViT-B-16 (open_clip) and
vit_small_patch16_224 (timm) written to local files and loaded through the same loaders a real
run uses (open_clip's `pretrained=` path, timm's pretrained-file overlay). The images are a
tiny VOC 2012 + SBD tree in the official layout (tests/archives.py). Every stage runs as its
own process, which records its wall time and peak RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import archives as A
import numpy as np
import open_clip
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from ssr.data.layout import DatasetLayout, read_label_png

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "superpixels", "train", "pseudo-labels", "evaluate")
# Runs one stage in this process and appends its wall time and peak RSS to the report.
LAUNCH = """
import json, resource, sys, time
from ssr.cli import main
tic = time.time()
code = main(sys.argv[2:])
entry = {"stage": sys.argv[2], "seconds": round(time.time() - tic, 1), "exit": code,
         "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(entry) + "\\n")
sys.exit(code)
"""


def _weights(base: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None)
    clip_path = base / "vit_b_16_random.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_path))
    dino = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    dino_path = base / "vit_small_patch16_224_random.safetensors"
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, str(dino_path))
    return clip_path, dino_path


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("real_config")
    trees = base / "trees"
    A.build_voc_tree(trees)
    A.build_sbd_tree(trees)
    clip_path, dino_path = _weights(base)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data_root"], raw["results_root"] = str(base / "data"), str(base / "results")
    raw["datasets"]["voc"].update(clip_pretrained=str(clip_path), dino_weights=str(dino_path), seeds=[0])
    raw["train_presets"]["voc"].update(iterations=2, batch_size=2, accumulation=1, warmup=1, refresh_every=1)
    raw["train"]["num_workers"] = 0
    params = base / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    report = base / "stages.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    for stage in STAGES:
        extra = ["--archives", str(trees)] if stage == "prepare" else []
        proc = subprocess.run([sys.executable, "-c", LAUNCH, str(report), stage, "--dataset", "voc", "--params", str(params),
                               "--quiet", "--threads", "2", *extra],
                              capture_output=True, text=True, cwd=base, env=env, timeout=600)
        assert proc.returncode == 0, f"{stage}:\n{proc.stderr[-3000:]}"
    entries = [json.loads(line) for line in report.read_text().splitlines()]
    print("real configuration, per stage:", json.dumps(entries))
    return base, raw, entries


def test_every_stage_runs_and_reports_its_time_and_memory(real_run):
    _, _, entries = real_run
    assert [e["stage"] for e in entries] == list(STAGES)
    assert all(e["exit"] == 0 and e["seconds"] >= 0 and e["peak_rss_mib"] > 100 for e in entries)   # seconds: rounded, may be 0.0


def test_the_trained_model_is_vit_b_16_at_crop_320(real_run):
    base, raw, _ = real_run
    config = json.loads((base / "results" / "voc" / "method" / "seed0" / "model.json").read_text())
    assert config["dims"]["embed_dim"] == 512 and config["dims"]["width"] == 768 and config["dims"]["depth"] == 12
    assert config["dims"]["decoder_width"] == 256 and config["dims"]["decoder_layers"] == 3
    assert config["identity"]["train_presets.voc.crop_size"] == 320
    assert config["dataset_params"]["dino_model"] == "vit_small_patch16_224.dino"
    train = json.loads((base / "results" / "voc_train.json").read_text())
    assert train["iterations"] == 2 and np.isfinite(train["final_loss"])


def test_pseudo_labels_have_each_image_s_size_and_only_its_classes(real_run):
    base, _, _ = real_run
    layout = DatasetLayout(base / "data" / "voc")
    out = base / "results" / "voc" / "method" / "seed0" / "pseudo_labels"
    ids = layout.split("train_aug")
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ids)
    labels = layout.image_labels()
    for image_id in ids:
        label = read_label_png(out / f"{image_id}.png")
        assert label.shape == A.image_shape(image_id)
        assert set(np.unique(label).tolist()) <= {0, 255, *labels[image_id]}


def test_metrics_files_hold_finite_scores_under_their_keys(real_run):
    base, raw, _ = real_run
    seeds = json.loads((base / "results" / "voc_seeds.json").read_text())
    assert seeds["split"] == "train" and seeds["images"] == len(A.VOC_TRAIN)
    for row in ("cam", "clip", "dino", "sgc", "method", "cam_without_cmpa"):
        assert seeds[f"{row}_miou"] is not None and np.isfinite(seeds[f"{row}_miou"]), row
    miou = json.loads((base / "results" / "voc_miou.json").read_text())
    for key in ("miou", "crf_miou", "precision", "recall", "confusion_ratio", "iou_aeroplane", "crf_iou_person"):
        assert key in miou, key
    assert all(np.isfinite(v) for k, v in miou.items() if isinstance(v, float))
    predictions = base / "results" / "voc" / "predictions"
    for image_id in A.VOC_VAL:
        assert read_label_png(predictions / f"{image_id}.png").shape == A.image_shape(image_id)
    assert raw["infer"]["scales"] == [1.0, 0.75] and raw["infer"]["flip"] and raw["infer"]["crf"]
    assert raw["datasets"]["voc"]["long_side"] == 512
