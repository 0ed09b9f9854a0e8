"""The tiny demo DAG end to end through the `ssr` command line: prepare -> superpixels ->
train -> pseudo-labels -> evaluate, its metrics files, the label-folder scorer, the
ablation switches and a corrupt input.

One pipeline run (module fixture, ~2 s of work on the tiny random-init CLIP) is shared
by the tests; the heavy stages run in-process through `ssr.cli.main`, the light ones
through the installed `ssr` console script.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny_params

from ssr.cli import main as ssr_main
from ssr.data.dataset import WholeImages
from ssr.data.layout import DatasetLayout, read_label_png, write_label_png

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCORES = ("miou", "precision", "recall", "confusion_ratio", "class_swap_ratio")


def write_params(directory: Path, data_root: Path, clip_dir: Path, **overrides) -> tuple[Path, object]:
    return write_tiny_params(directory, data_root, clip_dir, **overrides)


def like_pipeline(pipeline, directory: Path, data_root: Path | None = None, **overrides) -> tuple[Path, object]:
    """Tiny params with the pipeline fixture's backbones (and by default its data)."""
    return write_tiny_params(directory, data_root or Path(pipeline.params.data_root), pipeline.clip_dir,
                             dino_dir=pipeline.dino_dir, **overrides)


def ssr_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed console script, as Snakemake and DVC call it."""
    script = BIN / "ssr"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ssr"]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_clip_dir, tiny_dino_dir):
    """prepare -> superpixels -> train -> pseudo-labels -> evaluate on the tiny demo with its tiny DINO, once."""
    base = tmp_path_factory.mktemp("pipeline")
    path, params = write_params(base, base / "data", tiny_clip_dir, dino_dir=tiny_dino_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tests (conftest), so re-scoring later sums in the same order
    try:
        for stage in ("prepare", "superpixels", "train", "pseudo-labels", "evaluate"):
            assert ssr_main([stage, "--dataset", "demo", "--params", str(path), "--quiet"]) == 0, stage
    finally:
        torch.set_num_threads(threads)
    results = Path(params.results_root)

    class Run:
        pass

    run = Run()
    run.base, run.path, run.params, run.results = base, path, params, results
    run.layout = DatasetLayout(params.dataset_root("demo"))
    run.classes = run.layout.classes()
    run.clip_dir, run.dino_dir = tiny_clip_dir, tiny_dino_dir
    run.seeds = json.loads((results / "demo_seeds.json").read_text())
    run.miou = json.loads((results / "demo_miou.json").read_text())
    return run


def numpy_miou(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int, ignore: int = 255) -> float:
    """mIoU by per-class masks, a computation independent of ssr.metrics: IoU = |P & G| / |P | G|
    over pixels whose ground truth is not `ignore`; classes absent from both are skipped."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for pred, gt in pairs:
        keep = gt != ignore
        for c in range(num_classes):
            p, g = (pred == c) & keep, (gt == c) & keep
            inter[c] += np.logical_and(p, g).sum()
            union[c] += np.logical_or(p, g).sum()
    return float(np.mean([i / u for i, u in zip(inter, union, strict=True) if u > 0]))


def in_unit_interval(metrics: dict, skip=("split", "images", "seeds")) -> list[str]:
    """Keys whose value is neither None nor a number in [0, 1] (SeCo's confusion ratio, FP / TP, is unbounded)."""
    return [k for k, v in metrics.items() if k not in skip and "confusion_ratio" not in k and v is not None
            and not (isinstance(v, (int, float)) and 0 <= v <= 1)]


# ---------------------------------------------------------------- the DAG's products


def test_seeds_json_has_every_table3_row(pipeline):
    seeds = pipeline.seeds
    assert seeds["split"] == "train" and seeds["seeds"] == 1
    # Table 3: CAM only, + CLIP attention, + DINO attention, + SGC mask
    for row in ("cam", "clip", "dino", "sgc", "method"):
        for key in SCORES:
            assert f"{row}_{key}" in seeds, f"{row}_{key} missing from demo_seeds.json: {sorted(seeds)}"
    assert "dino_available" not in seeds  # the flag marks a row that could not run
    assert in_unit_interval(seeds) == []
    assert all(seeds[f"{row}_miou"] is not None for row in ("cam", "clip", "dino", "sgc"))
    # default switches (use_clip, use_dino, use_sgc all on): the method is the SGC row, which fuses both attentions
    assert {k: seeds[f"method_{k}"] for k in SCORES} == {k: seeds[f"sgc_{k}"] for k in SCORES}


def test_affinity_bounds_rescore_the_seed_rows_with_ground_truth_affinities(pipeline):
    """experiments/affinity_bounds.py: with the run's own DINO its rows are the ones `ssr pseudo-labels`
    wrote; an A_DINO from the ground truth moves the + DINO and + SGC rows and nothing else."""
    spec = importlib.util.spec_from_file_location("affinity_bounds", REPO / "experiments" / "affinity_bounds.py")
    bounds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bounds)
    found = bounds.bounds(pipeline.base, seeds=[0])
    assert set(found) == set(bounds.AFFINITIES)
    own = found["dino"][0]
    assert own == {row: pipeline.seeds[f"{row}_miou"] for row in ("cam", "clip", "dino", "sgc")}
    for affinity in ("class_oracle", "instance_oracle", "dino_on_oracle"):
        rows = found[affinity][0]
        assert (rows["cam"], rows["clip"]) == (own["cam"], own["clip"])
        assert all(0 <= rows[row] <= 1 for row in ("dino", "sgc"))
    assert found["class_oracle"][0]["dino"] != own["dino"]
    # the ground truth's regions for SGC move the + SGC rows only
    perfect_regions = bounds.bounds(pipeline.base, seeds=[0], sgc_regions="instances")
    for affinity, per_seed in perfect_regions.items():
        assert {k: v for k, v in per_seed[0].items() if k != "sgc"} == {k: v for k, v in found[affinity][0].items() if k != "sgc"}
    assert any(perfect_regions[affinity][0]["sgc"] != found[affinity][0]["sgc"] for affinity in found)


def test_without_dino_the_dino_row_is_left_out(tmp_path, tiny_clip_dir):
    path, params = write_params(tmp_path, tmp_path / "data", tiny_clip_dir, **{"datasets.demo.seeds": [0]})
    for stage in ("prepare", "superpixels", "train", "pseudo-labels"):
        assert ssr_main([stage, "--dataset", "demo", "--params", str(path), "--quiet"]) == 0, stage
    seeds = json.loads((Path(params.results_root) / "demo_seeds.json").read_text())
    assert seeds["dino_available"] == 0
    assert not any(k.startswith("dino_") and k != "dino_available" for k in seeds)
    assert {k: seeds[f"method_{k}"] for k in SCORES} == {k: seeds[f"sgc_{k}"] for k in SCORES}


def test_pseudo_labels_cover_the_train_split_and_score_as_reported(pipeline):
    out = pipeline.results / "demo" / "method" / "seed0" / "pseudo_labels"
    ids = pipeline.layout.split(pipeline.params.dataset("demo").train_split)
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ids)
    pairs = []
    for image_id in ids:
        label = read_label_png(out / f"{image_id}.png")
        gt = read_label_png(pipeline.layout.label_path(image_id))
        assert label.shape == gt.shape
        assert set(np.unique(label)) <= set(range(len(pipeline.classes))) | {255}
        # labels only name classes the image-level label allows
        allowed = {0, 255} | set(pipeline.layout.image_labels()[image_id])
        assert set(np.unique(label)) <= allowed, image_id
        pairs.append((label, gt))
    assert pipeline.seeds["method_miou"] == pytest.approx(numpy_miou(pairs, len(pipeline.classes)), abs=1e-12)

    figures = sorted((pipeline.results / "demo" / "figures").glob("*.png"))
    assert len(figures) == min(2 * pipeline.params.pseudo_labels.figures, len(ids))  # random and worst picks
    assert all(f.stat().st_size > 0 for f in figures)


def test_cam_figures_get_each_image_s_regions_and_sgc_targets(pipeline, tmp_path, monkeypatch):
    """The pseudo_labels stage hands every CAM figure the image's region map (the superpixels
    file's, at the image's size) and, per class of the image, its SGC target regions."""
    import ssr.pseudo_labels

    path, params = like_pipeline(pipeline, tmp_path)
    shutil.copytree(pipeline.results / "demo" / "method", Path(params.results_root) / "demo" / "method")
    drawn, real = [], ssr.pseudo_labels.cam_figure

    def recorded(*args, **kwargs):
        drawn.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(ssr.pseudo_labels, "cam_figure", recorded)
    torch.set_num_threads(1)
    assert ssr_main(["pseudo-labels", "--dataset", "demo", "--params", str(path), "--quiet"]) == 0
    data = WholeImages(params.dataset_root("demo"), "train", long_side=32, patch_size=8,
                       superpixels=params.dataset_root("demo") / "superpixels.h5")
    assert len(drawn) == len(list((Path(params.results_root) / "demo" / "figures").glob("*.png"))) > 0
    for (image, gt, _label, _cams, classes, _names), kwargs in drawn:
        image_id = kwargs["title"].split("\n")[0]
        assert np.array_equal(kwargs["regions"], data.region_map(image_id, image.shape[:2])), image_id
        assert kwargs["targets"].shape == (len(classes), params.superpixels.n_clusters)
        assert kwargs["targets"].dtype == bool and kwargs["targets"].any()
        assert classes == sorted(set(np.unique(gt).tolist()) - {0, 255})  # the demo's image labels are its true classes


def test_miou_json_reports_plain_and_crf_scores(pipeline):
    metrics = pipeline.miou
    for key in ("miou", "precision", "recall", "pixel_accuracy", "confusion_ratio", "class_swap_ratio"):
        for name in (key, f"crf_{key}"):
            assert all(k in metrics for k in (name, f"{name}_std", f"{name}_min", f"{name}_max")), name
    for name in pipeline.classes:
        assert f"iou_{name}" in metrics and f"crf_iou_{name}" in metrics
    assert in_unit_interval(metrics) == []
    assert metrics["miou"] is not None and metrics["crf_miou"] is not None
    # the saved predictions are the CRF ones (infer.crf is on): they score as crf_miou
    assert pipeline.params.infer.crf
    val = pipeline.layout.split(pipeline.params.dataset("demo").val_split)
    pred_dir = pipeline.results / "demo" / "predictions"
    assert sorted(p.stem for p in pred_dir.glob("*.png")) == sorted(val)
    pairs = [(read_label_png(pred_dir / f"{i}.png"), read_label_png(pipeline.layout.label_path(i))) for i in val]
    assert metrics["crf_miou"] == pytest.approx(numpy_miou(pairs, len(pipeline.classes)), abs=1e-12)

    train = json.loads((pipeline.results / "demo_train.json").read_text())
    assert train["iterations"] == pipeline.params.preset("demo").iterations
    assert not any(k.startswith(("train_seconds", "images_per_second")) for k in train), "timings are not metrics"
    assert (pipeline.results / "demo" / "method" / "seed0" / "model.safetensors").is_file()
    assert "train_seconds" in json.loads((pipeline.results / "demo" / "timings" / "train.json").read_text())["method"][0]


# ---------------------------------------------------------------- ssr evaluate on label folders


def test_evaluate_label_folders_matches_numpy_and_ignores_255(tmp_path):
    rng = np.random.default_rng(0)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    pairs = []
    for k in range(3):
        gt = rng.integers(0, 3, (12, 10)).astype(np.uint8)
        gt[rng.random(gt.shape) < 0.2] = 255                 # ignored pixels
        pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, 3, gt.shape)).astype(np.uint8)
        pred[gt == 255] = 1
        pred[0, 0] = 255 if gt[0, 0] != 255 else pred[0, 0]  # a "no decision" prediction counts as wrong
        write_label_png(gt_dir / f"im{k}.png", gt)
        write_label_png(pred_dir / f"im{k}.png", pred)
        pairs.append((pred, gt))

    out = tmp_path / "scores.json"
    # run from the project root, as a user would (the CLI reads ./params.yaml before any stage)
    proc = ssr_cli("evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--num-classes", "3", "--out", str(out), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(out.read_text())
    assert scores["miou"] == pytest.approx(numpy_miou(pairs, 3), abs=1e-12)
    # per-class IoU and the printed table
    for c in range(3):
        p, g = pairs_mask(pairs, c)
        assert scores[f"iou_{c}"] == pytest.approx(p, abs=1e-12)
        assert g
    lines = proc.stdout.splitlines()
    assert any(line.split()[:1] == ["class"] and "IoU" in line for line in lines), proc.stdout
    for c in range(3):
        row = next(line for line in lines if line.split()[:1] == [str(c)])
        assert float(row.split()[1]) == pytest.approx(100 * scores[f"iou_{c}"], abs=0.006)
    assert any(line.startswith("mIoU") for line in lines)

    # predictions under ignored ground truth do not count: change them all, same scores
    for k in range(3):
        gt, pred = read_label_png(gt_dir / f"im{k}.png"), read_label_png(pred_dir / f"im{k}.png")
        write_label_png(pred_dir / f"im{k}.png", np.where(gt == 255, 2, pred).astype(np.uint8))
    out2 = tmp_path / "scores2.json"
    proc = ssr_cli("evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--num-classes", "3", "--out", str(out2), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out2.read_text()) == scores


def pairs_mask(pairs, c: int) -> tuple[float, bool]:
    """IoU of class c over the pairs (ignore 255), and whether the class occurs at all."""
    inter = union = 0
    for pred, gt in pairs:
        keep = gt != 255
        inter += np.sum((pred == c) & (gt == c) & keep)
        union += np.sum(((pred == c) | (gt == c)) & keep)
    return inter / union, union > 0


def test_evaluate_label_folders_needs_all_its_arguments(tmp_path):
    proc = ssr_cli("evaluate", "--pred", str(tmp_path), "--out", str(tmp_path / "x.json"), cwd=REPO)
    assert proc.returncode != 0
    assert "--pred and --gt go together" in proc.stderr
    write_label_png(tmp_path / "gt" / "a.png", np.zeros((2, 2), np.uint8))
    proc = ssr_cli("evaluate", "--pred", str(tmp_path), "--gt", str(tmp_path / "gt"), cwd=REPO)
    assert proc.returncode == 2
    assert "give --num-classes, --classes FILE or --model RUN_DIR" in proc.stderr


def test_evaluate_label_folders_runs_without_a_params_file(tmp_path):
    write_label_png(tmp_path / "gt" / "a.png", np.array([[0, 1], [1, 255]], np.uint8))
    write_label_png(tmp_path / "pred" / "a.png", np.array([[0, 1], [0, 0]], np.uint8))
    out = tmp_path / "scores.json"
    proc = ssr_cli("evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--num-classes", "2",
                   "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["miou"] == pytest.approx((1 / 2 + 1 / 2) / 2)


# ---------------------------------------------------------------- ablation switches


@pytest.mark.parametrize("switches, row", [
    ({"affinity.use_sgc": False}, "dino"),
    ({"affinity.use_sgc": False, "affinity.use_dino": False}, "clip"),
    ({"affinity.use_clip": False, "affinity.use_dino": False, "affinity.use_sgc": False}, "cam"),
], ids=["no-sgc-is-dino-row", "no-sgc-no-dino-is-clip-row", "all-off-is-cam-row"])
def test_ablation_switches_choose_the_method_row(pipeline, switches, row):
    """The method (exported labels, method_* scores) follows affinity.use_*: without the SGC
    mask it is the "+ DINO attention" row, without DINO too the "+ CLIP attention" row, with
    every switch off the plain CAM."""
    path, params = like_pipeline(pipeline, pipeline.base / f"ablation_{row}", **switches)
    for stage in ("train", "pseudo-labels"):
        assert ssr_main([stage, "--dataset", "demo", "--params", str(path), "--quiet"]) == 0, stage
    seeds = json.loads((Path(params.results_root) / "demo_seeds.json").read_text())
    # the method row and the Table 3 row are computed by the same calls: equal, to the metrics' rounding
    for key in SCORES:
        assert seeds[f"method_{key}"] == pytest.approx(seeds[f"{row}_{key}"], abs=1e-4), key
    assert seeds["method_miou"] != pytest.approx(seeds["sgc_miou"], abs=1e-9), "the switch changed nothing"


def test_a_model_under_other_params_is_refused_naming_the_keys(pipeline, capsys):
    """A stage loading a trained model under params that changed what it was trained with stops,
    naming each changed key with both values, and writes nothing."""
    path, _ = like_pipeline(pipeline, pipeline.base / "changed", **{"cmpa.tau_init": 0.1, "sgc.t_hi": 0.4})
    path.write_text(path.read_text().replace(f"results_root: {path.parent / 'results'}", f"results_root: {pipeline.results}"))
    seeds_file = pipeline.results / "demo_seeds.json"
    before = seeds_file.read_bytes()
    assert ssr_main(["pseudo-labels", "--dataset", "demo", "--params", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.json: trained under other params" in err
    assert "cmpa.tau_init (recorded 0.05, now 0.1)" in err and "sgc.t_hi (recorded 0.5, now 0.4)" in err
    assert seeds_file.read_bytes() == before


def test_load_model_and_predict_from_the_run_folder_alone(pipeline):
    """ssr.load_model rebuilds backbones and model from model.json; ssr.predict segments an image at its size."""
    import ssr

    run = pipeline.results / "demo" / "method" / "seed0"
    trained = ssr.load_model(run, demo_clip_dir=pipeline.clip_dir, demo_dino_dir=pipeline.dino_dir)
    assert trained.classes == pipeline.classes
    image_id = pipeline.layout.split("val")[0]
    from ssr.data.layout import read_image

    image = read_image(pipeline.layout.image_path(image_id))
    label = ssr.predict(trained, image, crf=False)
    assert label.shape == image.shape[:2] and label.dtype == np.uint8
    assert set(np.unique(label)) <= set(range(len(pipeline.classes)))
    # the same decoder probabilities as the evaluate stage: equal labels with CRF, as saved in predictions/
    saved = read_label_png(pipeline.results / "demo" / "predictions" / f"{image_id}.png")
    assert np.array_equal(ssr.predict(trained, image), saved)
    with pytest.raises(ValueError, match=r"float images must lie within \[0, 1\]"):
        ssr.predict(trained, image.astype(np.float32))


def test_variants_and_seeds_give_table4_rows_the_bound_and_a_spread(pipeline):
    """Two seeds and two variants: the seeds file holds Table 4's rows (plain-CLIP CAM, each CMPA
    loss's CAM), the metrics file the fully supervised bound and the method's ratio to it, each
    as the mean over seeds with std, min and max."""
    variants = {"cmpa_feature": {"cmpa.loss": "feature"}, "gt_bound": {"train.supervision": "gt"}}
    path, params = like_pipeline(pipeline, pipeline.base / "variants",
                                 **{"datasets.demo.seeds": [0, 1], "datasets.demo.variants": variants})
    for stage in ("train", "pseudo-labels", "evaluate"):
        assert ssr_main([stage, "--dataset", "demo", "--params", str(path), "--quiet"]) == 0, stage
    results = Path(params.results_root)
    for run in ("method", "cmpa_feature", "gt_bound"):
        for seed in (0, 1):
            assert (results / "demo" / run / f"seed{seed}" / "model.safetensors").is_file(), (run, seed)
    seeds = json.loads((results / "demo_seeds.json").read_text())
    assert seeds["seeds"] == 2
    for key in ("cam_miou", "cam_without_cmpa_miou", "cmpa_feature_cam_miou", "cmpa_feature_method_miou"):
        assert seeds[key] is not None and f"{key}_std" in seeds, key
        assert seeds[f"{key}_min"] <= seeds[key] <= seeds[f"{key}_max"]
    assert seeds["cam_miou_std"] > 0, "two seeds, one spread: the seeds did not change training"
    miou = json.loads((results / "demo_miou.json").read_text())
    assert miou["gt_bound_miou"] is not None and miou["cmpa_feature_miou"] is not None
    per_seed = [miou[f"ratio_to_gt_bound_{k}"] for k in ("min", "max")]
    assert per_seed[0] <= miou["ratio_to_gt_bound"] <= per_seed[1]


# ---------------------------------------------------------------- corrupt input


def test_corrupt_image_stops_superpixels_naming_the_file(pipeline, tmp_path):
    data_root = tmp_path / "data"
    shutil.copytree(Path(pipeline.params.data_root) / "demo", data_root / "demo", ignore=shutil.ignore_patterns("superpixels*"))
    path, params = like_pipeline(pipeline, tmp_path, data_root)
    layout = DatasetLayout(params.dataset_root("demo"))
    victim = layout.image_path("train_00003")
    victim.write_bytes(victim.read_bytes()[:60])  # a truncated PNG
    proc = ssr_cli("superpixels", "--dataset", "demo", "--params", str(path), "--quiet", cwd=tmp_path)
    assert proc.returncode != 0
    assert victim.name in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not layout.superpixels_path.exists()
