"""The bad-input sweep (docs/bad_inputs.md): every stage meets a broken input, a signal or a
full disk and stops with one line on stderr, `ssr <stage>: error: <file or key>: <problem>`,
a non-zero exit and nothing half-written under the name of any of its outputs.

A tiny demo run (the random-init CLIP of conftest, 12 + 6 images) goes through all five stages
once per module: the reference. Each test works in a copy of it, without the outputs of the
stage it breaks. Stages run in-process through `ssr.cli.main` where no signal or resource
limit is involved; a signal or a file size limit goes to a forked child running
`ssr.cli.main`, its long loop slowed down by wrapping one `ssr` function (as SLOW_TRAIN does
in test_train.py), so that the signal lands mid-loop. Nothing from a library is mocked.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import archives as A
import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_params, write_tiny_params
from PIL import Image
from safetensors.torch import load_file, save_file
from test_dag import _env, _tool, copy_workflow
from test_seed_split import VOC_TINY

from ssr.cli import main as ssr_main
from ssr.config import load_params
from ssr.crf import dense_crf
from ssr.data.layout import DatasetLayout, read_image, read_label_png, write_label_png
from ssr.superpixels import RegionMaps, build_superpixels, partial_path, region_map

STAGES = ("prepare", "superpixels", "train", "pseudo-labels", "evaluate")
# Six iterations with a checkpoint every two: a resumed run has checkpoints to resume from.
REFERENCE = {"train_presets.demo.iterations": 6, "train.checkpoint_every": 2, "train.log_every": 1}
RUN = Path("results/demo/method/seed0")
# What each stage writes; none of it may exist under these names after a failed run.
OUTPUTS = {
    "prepare": ["data/demo"],
    "superpixels": ["data/demo/superpixels.h5"],
    "train": [RUN / "model.safetensors", RUN / "model.json", "results/demo_train.json"],
    "pseudo-labels": [RUN / "pseudo_labels", "results/demo/figures", "results/demo_seeds.json"],
    "evaluate": ["results/demo/predictions", "results/demo_miou.json"],
}
# Run state that a stage keeps between attempts (not an output): removed where the stage starts afresh.
STATE = {"superpixels": ["data/demo/superpixels.h5.partial.h5"], "train": [RUN / "checkpoint.pt", RUN / "dvclive"]}


def _one_thread_now() -> int:
    """Module fixtures run before conftest's per-test `_one_thread`: set one thread here too, so the
    reference sums in the order the tests' reruns do (bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


@pytest.fixture(scope="module")
def ref(tmp_path_factory, tiny_clip_dir):
    """prepare -> superpixels -> train -> pseudo-labels -> evaluate on the tiny demo, uninterrupted."""
    base = tmp_path_factory.mktemp("reference")
    path, _ = write_tiny_params(base, base / "data", tiny_clip_dir, **REFERENCE)
    threads = _one_thread_now()
    try:
        for stage in STAGES:
            assert ssr_main([stage, "--dataset", "demo", "--params", str(path), "--quiet"]) == 0, stage
    finally:
        torch.set_num_threads(threads)
    ref = type("Reference", (), {})()
    ref.base, ref.path, ref.clip_dir = base, path, tiny_clip_dir
    return ref


def workspace(ref, dest: Path, stage: str, *, keep_state: bool = False, **overrides) -> Path:
    """A copy of the reference run in `dest` without `stage`'s outputs (nor its run state, unless
    `keep_state`); params.yaml there has `overrides` on top of the reference's. Returns the params path."""
    for part in ("data", "results"):
        shutil.copytree(ref.base / part, dest / part)
    for rel in OUTPUTS[stage] + ([] if keep_state else STATE.get(stage, [])):
        target = dest / rel
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    path, _ = write_tiny_params(dest, dest / "data", ref.clip_dir, **{**REFERENCE, **overrides})
    return path


def args(stage: str, path: Path, *extra: str) -> list[str]:
    return [stage, "--dataset", "demo", "--params", str(path), "--quiet", *extra]


def run_stage(capsys, argv: list[str]) -> tuple[int, str]:
    """`ssr.cli.main(argv)` in this process -> (exit status, stderr)."""
    capsys.readouterr()
    try:
        rc = ssr_main(argv)
    except SystemExit as exit_:  # argparse's own errors
        rc = exit_.code
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, stage: str, *names: str) -> str:
    """Non-zero exit; stderr ends with `ssr <stage>: error: ...` naming every one of `names`; no traceback."""
    assert rc != 0, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"ssr {stage}: error: "), err
    for name in names:
        assert str(name) in last, f"{name!r} not in: {last}"
    return last


def assert_no_outputs(work: Path, stage: str) -> None:
    present = [str(rel) for rel in OUTPUTS[stage] if (work / rel).exists()]
    assert not present, f"{stage} left outputs under their final names: {present}"


def files_under(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file below `root` (or `root` itself), by relative path, with its bytes."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def assert_outputs_equal(work: Path, ref, stage: str) -> None:
    """The stage's outputs in `work` are the reference's: the same files with the same bytes
    (model.json too: it holds no wall times)."""
    skip = ("superpixels.h5", "superpixels.h5.partial.h5") if stage == "prepare" else ()
    for rel in OUTPUTS[stage]:
        got, expected = files_under(work / rel, skip), files_under(ref.base / rel, skip)
        assert sorted(got) == sorted(expected), rel
        differing = [name for name in expected if got[name] != expected[name]]
        assert not differing, f"{rel}: {differing} differ from the uninterrupted run's"


# ---------------------------------------------------------------- broken files, stage by stage

VOC_TRUNCATED = (A.TRAIN_AUG[1], A.VOC_VAL[1])  # a train_aug image (superpixels, train, pseudo-labels) and a val one (evaluate)
VOC_OUTPUTS = {"superpixels": ["data/voc/superpixels.h5"],
               "train": ["results/voc/method/seed0/model.safetensors", "results/voc/method/seed0/model.json",
                         "results/voc_train.json"],
               "pseudo-labels": ["results/voc/method/seed0/pseudo_labels", "results/voc_seeds.json"],
               "evaluate": ["results/voc/predictions", "results/voc_miou.json"]}


@pytest.fixture(scope="module")
def voc(tmp_path_factory, tiny_clip_dir):
    """A tiny VOC 2012 + SBD in the official layout (JPEG images), prepared, with superpixels and a trained model."""
    base = tmp_path_factory.mktemp("voc")
    A.build_voc_tree(base / "trees")
    A.build_sbd_tree(base / "trees")
    path, _ = write_tiny_params(base, base / "data", tiny_clip_dir, **VOC_TINY)
    threads = _one_thread_now()
    try:
        assert ssr_main(["prepare", "--dataset", "voc", "--params", str(path), "--archives", str(base / "trees"), "--quiet"]) == 0
        for stage in ("superpixels", "train"):
            assert ssr_main([stage, "--dataset", "voc", "--params", str(path), "--quiet"]) == 0, stage
    finally:
        torch.set_num_threads(threads)
    return base


@pytest.mark.parametrize("stage", ["superpixels", "train", "pseudo-labels", "evaluate"])
def test_truncated_jpeg_stops_the_stage_naming_the_file(voc, tiny_clip_dir, tmp_path, capsys, stage):
    """Half of a JPEG of the VOC layout: every stage that decodes images names it and writes nothing.
    train runs with a DataLoader worker, as params.yaml does (train.num_workers: 2): the worker's
    error reaches the main process with the worker's traceback in its message."""
    for part in ("data", "results"):
        shutil.copytree(voc / part, tmp_path / part)
    for rel in VOC_OUTPUTS[stage] + (["results/voc/method/seed0/checkpoint.pt"] if stage == "train" else []):
        if (tmp_path / rel).exists():
            (tmp_path / rel).unlink()
    path, params = write_tiny_params(tmp_path, tmp_path / "data", tiny_clip_dir, **VOC_TINY, **{"train.num_workers": 1})
    layout = DatasetLayout(params.dataset_root("voc"))
    victims = [layout.image_path(i) for i in VOC_TRUNCATED]
    for victim in victims:
        assert victim.suffix == ".jpg"
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    rc, err = run_stage(capsys, [stage, "--dataset", "voc", "--params", str(path), "--quiet"])
    victim = victims[1] if stage == "evaluate" else victims[0]
    assert_one_line_error(rc, err, stage, victim, "cannot read image", "truncated")
    assert not [rel for rel in VOC_OUTPUTS[stage] if (tmp_path / rel).exists()]


LABEL_STAGES = ["train-gt", "pseudo-labels", "evaluate", "evaluate-folders"]


def _run_on_broken_label(ref, tmp_path, capsys, case: str, damage) -> tuple[int, str, Path, Path]:
    """Damage a ground-truth label with `damage(label) -> new label array`, then run the stage of `case`:
    train with `train.supervision: gt` (a train label), pseudo-labels' scoring (a train label),
    evaluate (a val label), `ssr evaluate --pred/--gt` (a val label in a copied folder)."""
    stage = case.removesuffix("-gt").removesuffix("-folders")
    path = workspace(ref, tmp_path, stage, **({"train.supervision": "gt"} if case == "train-gt" else {}))
    layout = DatasetLayout(tmp_path / "data" / "demo")
    image_id = "val_00001" if stage == "evaluate" else "train_00001"
    victim = layout.label_path(image_id)
    out = tmp_path / "scores.json"
    if case == "evaluate-folders":
        gt_dir = tmp_path / "gt"
        gt_dir.mkdir()
        for val_id in layout.split("val"):
            shutil.copy(layout.label_path(val_id), gt_dir)
        victim = gt_dir / f"{image_id}.png"
        argv = ["evaluate", "--pred", str(ref.base / "results/demo/predictions"), "--gt", str(gt_dir), "--num-classes",
                str(len(layout.classes())), "--out", str(out)]
    else:
        argv = args(stage, path)
    damaged = damage(read_label_png(victim))
    if isinstance(damaged, Image.Image):
        damaged.save(victim)
    else:
        write_label_png(victim, damaged)
    rc, err = run_stage(capsys, argv)
    assert not out.exists()
    assert_no_outputs(tmp_path, stage)
    return rc, err, victim, path


@pytest.mark.parametrize("case", LABEL_STAGES)
def test_label_png_of_the_wrong_size_is_refused(ref, tmp_path, capsys, case):
    rc, err, victim, _ = _run_on_broken_label(ref, tmp_path, capsys, case, lambda label: label[:, :20])
    last = assert_one_line_error(rc, err, case.removesuffix("-gt").removesuffix("-folders"), victim)
    assert "20x32" in last or "(32, 20)" in last, last


@pytest.mark.parametrize("case", LABEL_STAGES)
def test_label_values_outside_the_classes_are_refused(ref, tmp_path, capsys, case):
    """Value 7 with 5 classes (0..4) and not 255: refused, never counted as a class or ignored."""

    def damage(label):
        label = label.copy()
        label[3, 3] = 7
        return label

    rc, err, victim, _ = _run_on_broken_label(ref, tmp_path, capsys, case, damage)
    last = assert_one_line_error(rc, err, case.removesuffix("-gt").removesuffix("-folders"), victim)
    assert "7" in last and "255" in last, last


@pytest.mark.parametrize("case", ["train-gt", "evaluate-folders"])
def test_label_png_in_rgb_colour_mode_is_refused(ref, tmp_path, capsys, case):
    """An RGB label PNG (colours, not class indices: e.g. a VOC label re-saved by an image editor)."""
    rc, err, victim, _ = _run_on_broken_label(ref, tmp_path, capsys, case,
                                              lambda label: Image.fromarray(np.stack([label * 40] * 3, -1).astype(np.uint8)))
    assert_one_line_error(rc, err, case.removesuffix("-gt").removesuffix("-folders"), victim, "mode RGB")


@pytest.mark.parametrize("stage", ["superpixels", "train", "pseudo-labels", "evaluate"])
def test_a_split_that_lists_a_missing_image_is_refused(ref, tmp_path, capsys, stage):
    path = workspace(ref, tmp_path, stage)
    layout = DatasetLayout(tmp_path / "data" / "demo")
    gone = "val_00002" if stage == "evaluate" else "train_00004"
    layout.image_path(gone).unlink()
    rc, err = run_stage(capsys, args(stage, path))
    assert_one_line_error(rc, err, stage, layout.images_dir, repr(gone))
    assert_no_outputs(tmp_path, stage)


@pytest.mark.parametrize("stage", ["superpixels", "train", "pseudo-labels"])
def test_an_empty_split_is_refused(ref, tmp_path, capsys, stage):
    """Before the guard superpixels wrote a file without the train images and pseudo-labels scored nothing, both exiting 0."""
    path = workspace(ref, tmp_path, stage)
    split = tmp_path / "data/demo/splits/train.txt"
    split.write_text("\n")
    rc, err = run_stage(capsys, args(stage, path))
    assert_one_line_error(rc, err, stage, split, "empty")
    assert_no_outputs(tmp_path, stage)


@pytest.mark.parametrize("stage", ["superpixels", "train"])
def test_duplicate_ids_in_a_split_are_refused(ref, tmp_path, capsys, stage):
    """An id listed twice (a merge of two lists, say) would weigh the image twice: refused, naming the id."""
    path = workspace(ref, tmp_path, stage)
    split = tmp_path / "data/demo/splits/train.txt"
    split.write_text(split.read_text() + "train_00003\n")
    rc, err = run_stage(capsys, args(stage, path))
    assert_one_line_error(rc, err, stage, split, "'train_00003'", "twice")
    assert_no_outputs(tmp_path, stage)


def test_image_labels_missing_an_id_of_the_split_is_refused(ref, tmp_path, capsys):
    path = workspace(ref, tmp_path, "train")
    file = tmp_path / "data/demo/image_labels.json"
    labels = json.loads(file.read_text())
    del labels["train_00005"]
    file.write_text(json.dumps(labels))
    rc, err = run_stage(capsys, args("train", path))
    assert_one_line_error(rc, err, "train", file, "'train_00005'")
    assert_no_outputs(tmp_path, "train")


def test_image_labels_naming_a_class_outside_classes_json_is_refused(ref, tmp_path, capsys):
    """Class 9 of 5: before the guard, an IndexError traceback from the CAM pass."""
    path = workspace(ref, tmp_path, "train")
    file = tmp_path / "data/demo/image_labels.json"
    labels = json.loads(file.read_text())
    labels["train_00005"] = [9]
    file.write_text(json.dumps(labels))
    rc, err = run_stage(capsys, args("train", path))
    assert_one_line_error(rc, err, "train", file, "'train_00005'", "class 9")
    assert_no_outputs(tmp_path, "train")


def test_a_missing_classes_json_says_to_run_prepare(ref, tmp_path, capsys):
    path = workspace(ref, tmp_path, "train")
    (tmp_path / "data/demo/classes.json").unlink()
    rc, err = run_stage(capsys, args("train", path))
    assert_one_line_error(rc, err, "train", tmp_path / "data/demo/classes.json", "ssr prepare")
    assert_no_outputs(tmp_path, "train")


# ---------------------------------------------------------------- superpixels.h5


@pytest.mark.parametrize("stage", ["train", "pseudo-labels"])
def test_a_corrupt_superpixels_file_is_refused(ref, tmp_path, capsys, stage):
    path = workspace(ref, tmp_path, stage)
    file = tmp_path / "data/demo/superpixels.h5"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    rc, err = run_stage(capsys, args(stage, path))
    assert_one_line_error(rc, err, stage, file, "not a readable HDF5 file")
    assert_no_outputs(tmp_path, stage)


@pytest.mark.parametrize("stage", ["train", "pseudo-labels"])
def test_superpixels_built_with_other_params_are_refused(ref, tmp_path, capsys, stage):
    """A superpixels.h5 built under other `superpixels.*` params than the current ones (e.g. left from
    before an edit, or copied from another run): its attributes say so, and the readers refuse it,
    naming each differing param. Before the guard both stages used it silently."""
    path = workspace(ref, tmp_path, stage)
    params = load_params(path)
    layout = DatasetLayout(params.dataset_root("demo"))
    ids = layout.split("train") + layout.split("val")
    other = params.superpixels.model_copy(update={"n_segments": params.superpixels.n_segments + 20,
                                                  "seed": params.superpixels.seed + 1})
    file = layout.superpixels_path
    file.unlink()
    build_superpixels([(i, layout.image_path(i)) for i in ids], file, other, progress=False)
    rc, err = run_stage(capsys, args(stage, path))
    last = assert_one_line_error(rc, err, stage, file, "ssr superpixels")
    assert f"superpixels.n_segments (file {other.n_segments}, params {params.superpixels.n_segments})" in last
    assert f"superpixels.seed (file {other.seed}, params {params.superpixels.seed})" in last
    assert "n_clusters" not in last and "compactness" not in last
    assert_no_outputs(tmp_path, stage)


@pytest.mark.parametrize("stage", ["train", "pseudo-labels"])
def test_superpixels_without_an_image_of_the_split_are_refused(ref, tmp_path, capsys, stage):
    """A map missing (a file built before the split grew): before the guard, a KeyError traceback."""
    path = workspace(ref, tmp_path, stage)
    file = tmp_path / "data/demo/superpixels.h5"
    with h5py.File(file, "a") as f:
        del f["train_00007"]
    rc, err = run_stage(capsys, args(stage, path))
    assert_one_line_error(rc, err, stage, file, "'train_00007'", "ssr superpixels")
    assert_no_outputs(tmp_path, stage)


# ---------------------------------------------------------------- checkpoints and models


def test_a_checkpoint_from_another_config_is_refused_naming_the_keys(ref, tmp_path, capsys):
    path = workspace(ref, tmp_path, "train", keep_state=True, **{"cmpa.tau_init": 0.1, "sgc.t_hi": 0.4})
    checkpoint = tmp_path / RUN / "checkpoint.pt"
    before = checkpoint.read_bytes()
    rc, err = run_stage(capsys, args("train", path, "--resume"))
    last = assert_one_line_error(rc, err, "train", checkpoint, "written under other params")
    assert "cmpa.tau_init (recorded 0.05, now 0.1)" in last and "sgc.t_hi (recorded 0.5, now 0.4)" in last
    assert checkpoint.read_bytes() == before
    assert_no_outputs(tmp_path, "train")


@pytest.mark.parametrize("stage", ["pseudo-labels", "evaluate"])
def test_a_model_from_another_config_is_refused_naming_the_keys(ref, tmp_path, capsys, stage):
    path = workspace(ref, tmp_path, stage, **{"cmpa.tau_init": 0.1, "train_presets.demo.lr": 0.5})
    rc, err = run_stage(capsys, args(stage, path))
    last = assert_one_line_error(rc, err, stage, tmp_path / RUN / "model.json", "trained under other params")
    assert "cmpa.tau_init (recorded 0.05, now 0.1)" in last and "train_presets.demo.lr" in last
    assert_no_outputs(tmp_path, stage)


@pytest.mark.parametrize("stage", ["pseudo-labels", "evaluate"])
def test_a_corrupt_model_safetensors_is_refused(ref, tmp_path, capsys, stage):
    path = workspace(ref, tmp_path, stage)
    weights = tmp_path / RUN / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rc, err = run_stage(capsys, args(stage, path))
    assert_one_line_error(rc, err, stage, weights, "not a readable safetensors file")
    assert_no_outputs(tmp_path, stage)


@pytest.mark.parametrize("change", ["format", "no-identity", "other-dims"])
def test_a_model_json_of_another_format_is_refused(ref, tmp_path, capsys, change):
    """Another format tag; the right tag without a training identity (before the guard: a KeyError
    traceback); the description of another architecture than the weights beside it (before: torch's
    message over several lines)."""
    path = workspace(ref, tmp_path, "evaluate")
    file = tmp_path / RUN / "model.json"
    config = json.loads(file.read_text())
    if change == "format":
        config["format"] = "ssr-model/0"
    elif change == "no-identity":
        del config["identity"]
    else:
        config["dims"]["decoder_width"] *= 2
    file.write_text(json.dumps(config))
    rc, err = run_stage(capsys, args("evaluate", path))
    last = assert_one_line_error(rc, err, "evaluate", file)
    expected = {"format": "'ssr-model/0'", "no-identity": "identity", "other-dims": "do not fit the architecture"}[change]
    assert expected in last, last
    assert_no_outputs(tmp_path, "evaluate")


def test_a_model_with_nan_weights_is_refused_before_densecrf(ref, tmp_path, capsys):
    """NaN weights (a diverged run saved by other code, a damaged file) would hand DenseCRF NaN
    probabilities; the model is refused at load, naming the file and the tensors."""
    path = workspace(ref, tmp_path, "evaluate")
    weights = tmp_path / RUN / "model.safetensors"
    state = load_file(str(weights))
    state["decoder.classify.bias"] = torch.full_like(state["decoder.classify.bias"], float("nan"))
    save_file(state, str(weights), metadata={"format": "ssr-model/1"})
    rc, err = run_stage(capsys, args("evaluate", path))
    assert_one_line_error(rc, err, "evaluate", weights, "decoder.classify.bias", "NaN")
    assert_no_outputs(tmp_path, "evaluate")


def test_densecrf_refuses_nan_probabilities():
    image = np.zeros((8, 8, 3), np.uint8)
    probs = np.full((3, 8, 8), 1 / 3, np.float32)
    probs[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        dense_crf(image, probs)


# ---------------------------------------------------------------- the command line


def test_a_params_file_with_a_yaml_syntax_error_is_refused(ref, tmp_path, capsys):
    """PyYAML's message spans several lines (it quotes the line); the first names the file and the problem."""
    path = workspace(ref, tmp_path, "train")
    path.write_text(path.read_text() + "extra: [1, 2\n")
    rc, err = run_stage(capsys, args("train", path))
    assert rc == 2 and "Traceback" not in err
    assert err.startswith(f"ssr train: error: {path}: not valid YAML"), err
    assert "line " in err
    assert_no_outputs(tmp_path, "train")


def test_threads_zero_is_refused(ref, tmp_path, capsys):
    path = workspace(ref, tmp_path, "superpixels")
    rc, err = run_stage(capsys, args("superpixels", path, "--threads", "0"))
    assert_one_line_error(rc, err, "superpixels", "--threads", "got 0")
    assert_no_outputs(tmp_path, "superpixels")


def test_an_unknown_dataset_is_refused(ref, capsys):
    rc, err = run_stage(capsys, ["train", "--dataset", "vocc", "--params", str(ref.path)])
    assert_one_line_error(rc, err, "train", "--dataset", "'vocc'", "demo")


def test_a_coco_annotation_file_that_is_not_json_is_refused(tmp_path, tiny_clip_dir, capsys):
    trees = A.build_coco_tree(tmp_path / "trees")
    annotations = trees / "annotations" / "instances_val2014.json"
    annotations.write_text('{"images": [')
    path, params = write_tiny_params(tmp_path, tmp_path / "data", tiny_clip_dir)
    rc, err = run_stage(capsys, ["prepare", "--dataset", "coco", "--params", str(path), "--archives", str(trees), "--quiet"])
    assert_one_line_error(rc, err, "prepare", annotations, "not a COCO instances annotation file")
    assert not params.dataset_root("coco").exists()


def test_greyscale_and_rgba_images_are_read_as_rgb(ref, tmp_path, capsys):
    """A greyscale JPEG (COCO has some) or an RGBA PNG is accepted: read as RGB (grey repeated,
    alpha dropped), exactly as the same pixels stored as RGB."""
    path = workspace(ref, tmp_path, "superpixels")
    layout = DatasetLayout(tmp_path / "data" / "demo")
    converted = {"train_00001": "RGBA", "val_00001": "L"}
    for image_id, mode in converted.items():
        file = layout.image_path(image_id)
        Image.open(file).convert(mode).save(file)
    assert ssr_main(args("superpixels", path)) == 0
    sp = load_params(path).superpixels
    with RegionMaps(layout.superpixels_path) as maps:
        for image_id, mode in converted.items():
            with Image.open(layout.image_path(image_id)) as image:
                assert image.mode == mode
                rgb = np.array(image.convert("RGB"))
            assert read_image(layout.image_path(image_id)).shape == rgb.shape
            expected = region_map(rgb, sp.n_segments, sp.compactness, sp.n_clusters, sp.seed, sp.backend)
            np.testing.assert_array_equal(maps[image_id], expected)
    shutil.rmtree(tmp_path / "results/demo/predictions")
    (tmp_path / "results/demo_miou.json").unlink()
    assert ssr_main(args("evaluate", path)) == 0
    prediction = read_label_png(tmp_path / "results/demo/predictions/val_00001.png")
    assert prediction.shape == read_image(layout.image_path("val_00001")).shape[:2]


# ---------------------------------------------------------------- signals and a full disk: a forked `ssr` process


def fork_stage(argv: list[str], log: Path, *, setup=None, fsize: int | None = None) -> int:
    """Run `ssr.cli.main(argv)` in a forked child, stdout and stderr to `log`; returns its pid.

    `setup()` runs in the child first (to slow a loop down); `fsize` limits the size of every
    file the child writes (RLIMIT_FSIZE, with SIGXFSZ ignored, so that a write past it fails
    with EFBIG as a write to a full disk fails with ENOSPC). A fork rather than a new
    interpreter: the child starts with torch and open_clip imported, in milliseconds.
    """
    pid = os.fork()
    if pid:
        return pid
    rc = 70
    try:  # the child: never returns into pytest
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        if setup is not None:
            setup()
        rc = ssr_main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(rc)


def wait_for(pid: int, timeout: float = 120) -> int:
    """The child's exit status (-N if killed by signal N)."""
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} still running after {timeout} s")
        time.sleep(0.01)


def slow_down(module: str, name: str, after: int, seconds: float, marker: Path):
    """A setup for fork_stage: from its `after`-th call on, `module.name` sleeps `seconds` first;
    the `after`-th call creates `marker`, telling the test that the loop is under way."""

    def setup():
        mod = importlib.import_module(module)
        real, calls = getattr(mod, name), [0]

        def slow(*a, **k):
            calls[0] += 1
            if calls[0] == after:
                marker.touch()
            if calls[0] >= after:
                time.sleep(seconds)
            return real(*a, **k)

        setattr(mod, name, slow)

    return setup


# The function each stage calls once per item of its long loop, and the call at which the signal is sent.
SLOW = {
    "prepare": ("ssr.data.demo", "render_sample", 5),              # of 18 images
    "superpixels": ("ssr.superpixels", "_compute_one", 10),        # of 18; committed every 4 (below): 8 kept
    "train": ("ssr.train", "prepare_micro_batch", 4),              # iteration 4 of 6; checkpoint at 2
    "pseudo-labels": ("ssr.pseudo_labels", "refined_cams", 2),     # batch 2 of 2; batch 1's labels written
    "evaluate": ("ssr.infer", "batch_probs", 3),                   # of 6 val images
}


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_signal_mid_stage_leaves_no_output_and_the_rerun_equals_an_uninterrupted_run(ref, tmp_path, capsys, stage, signame):
    """SIGTERM (a scheduler's time limit, Ctrl-C's cousin) or SIGKILL (out of memory, a node lost) in the
    middle of the stage's loop: no output exists under its final name, and the rerun completes with
    outputs equal to the uninterrupted reference's; train resumes from its checkpoint, bit for bit."""
    path = workspace(ref, tmp_path, stage)
    marker = tmp_path / "under_way"
    module, name, after = SLOW[stage]
    setup = slow_down(module, name, after, 1.0 if stage == "train" else 60.0, marker)
    if stage == "superpixels":
        def setup(slow=setup):
            import ssr.superpixels

            ssr.superpixels._COMMIT_EVERY = 4
            slow()
    log = tmp_path / "stage.log"
    pid = fork_stage(args(stage, path), log, setup=setup)
    deadline = time.time() + 120
    while not marker.exists():
        done, status = os.waitpid(pid, os.WNOHANG)
        assert not done, f"{stage} ended before the signal:\n{log.read_text()}"
        assert time.time() < deadline, f"{stage} did not get under way in 120 s:\n{log.read_text()}"
        time.sleep(0.01)
    os.kill(pid, getattr(signal, signame))
    status = wait_for(pid)
    err = log.read_text()
    assert "Traceback" not in err, err
    if stage == "train" and signame == "SIGTERM":  # train's handler: a checkpoint at the end of the iteration, exit 130
        assert status == 130 and "ssr train: interrupted: SIGTERM: checkpoint written at iteration 4" in err, err
    else:
        assert status == -getattr(signal, signame), (status, err)
    assert_no_outputs(tmp_path, stage)
    if stage == "superpixels":  # the resume file holds the committed maps
        with h5py.File(partial_path(tmp_path / OUTPUTS[stage][0])) as partial:
            assert sum(bool(partial[k].attrs.get("complete")) for k in partial) == 8
    if stage == "train":
        resumed_at = 4 if signame == "SIGTERM" else 2
        assert torch.load(tmp_path / RUN / "checkpoint.pt", weights_only=True)["state"]["iteration"] == resumed_at

    rc, err = run_stage(capsys, args(stage, path, *(["--resume"] if stage == "train" else [])))
    assert rc == 0, err
    if stage == "train":
        assert f"from {tmp_path / RUN / 'checkpoint.pt'} at iteration {resumed_at}" in err
        # the training curves too (DVC tracks the method's): one row per step, no step logged twice
        curves = RUN / "dvclive" / "plots" / "metrics"
        assert files_under(tmp_path / curves) == files_under(ref.base / curves)
    assert_outputs_equal(tmp_path, ref, stage)


def test_a_full_disk_during_the_superpixels_hdf5_write(ref, tmp_path, capsys):
    """The HDF5 write fails part way (here: a 20 kB file size limit; the file is 65 kB): one clear
    error naming the file, no superpixels.h5, no partial file to resume from (a partly written HDF5
    file cannot be trusted), and the rerun with space writes the reference's file."""
    path = workspace(ref, tmp_path, "superpixels")
    target = tmp_path / OUTPUTS["superpixels"][0]
    log = tmp_path / "stage.log"
    status = wait_for(fork_stage(args("superpixels", path), log, fsize=20_000))
    err = log.read_text()
    last = assert_one_line_error(status, err, "superpixels", partial_path(target), "cannot write", "File too large",
                                 "rerun `ssr superpixels`")
    assert err.strip() == last, "h5py's own reports of the failed writes reached stderr"
    assert not target.exists() and not partial_path(target).exists()
    assert sorted(p.name for p in target.parent.iterdir() if "superpixels" in p.name) == []
    rc, err = run_stage(capsys, args("superpixels", path))
    assert rc == 0, err
    assert_outputs_equal(tmp_path, ref, "superpixels")


def test_a_full_disk_during_the_checkpoint_write(ref, tmp_path, capsys):
    """checkpoint.pt (1.5 MB) cannot be written under a 1 MB file size limit: one clear error naming
    it (torch's own says "unexpected pos"), no checkpoint and no model under their names, and the
    rerun with space trains the reference's model bit for bit."""
    path = workspace(ref, tmp_path, "train")
    log = tmp_path / "stage.log"
    status = wait_for(fork_stage(args("train", path), log, fsize=1_000_000))
    err = log.read_text()
    assert_one_line_error(status, err, "train", tmp_path / RUN / "checkpoint.pt", "File too large", "ssr train --resume")
    assert not (tmp_path / RUN / "checkpoint.pt").exists()
    assert not [p.name for p in (tmp_path / RUN).iterdir() if p.name.startswith(".checkpoint.pt")], "temporary file left"
    assert_no_outputs(tmp_path, "train")
    rc, err = run_stage(capsys, args("train", path, "--resume"))
    assert rc == 0, err
    assert_outputs_equal(tmp_path, ref, "train")


# ---------------------------------------------------------------- two Snakemake runs at once


SLOW_SSR = """#!/bin/sh
# `ssr` that waits, once started, until the test lets it go (at most 60 s)
touch "{marker}"
n=0
while [ ! -e "{release}" ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n + 1)); done
exec "{ssr}" "$@"
"""


def test_a_second_snakemake_on_the_same_workflow_refuses(ref, tmp_path):
    """While one `snakemake prepare-demo` runs, a second one in the same folder stops at once on
    Snakemake's lock, writing nothing; the first completes and its dataset is the reference's."""
    work = copy_workflow(tmp_path / "work")
    shutil.copytree(ref.clip_dir, work / "clip")
    raw = tiny_params(yaml.safe_load((work / "params.yaml").read_text()), Path("clip"), **REFERENCE)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    marker, release, bin_dir = tmp_path / "started", tmp_path / "release", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssr").write_text(SLOW_SSR.format(marker=marker, release=release, ssr=_tool("ssr")))
    (bin_dir / "ssr").chmod(0o755)
    env = _env()
    first = subprocess.Popen([_tool("snakemake"), "--cores", "1", "prepare-demo"], cwd=work, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"})
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert first.poll() is None, first.communicate()[0]
            assert time.time() < deadline, "the first snakemake never started its job"
            time.sleep(0.05)
        second = subprocess.run([_tool("snakemake"), "--cores", "1", "prepare-demo"], cwd=work, capture_output=True, text=True,
                                env=env, timeout=120)
        assert not (work / "data" / "demo" / "images").exists(), "the second run wrote the first one's outputs"
    finally:
        release.touch()
        out, _ = first.communicate(timeout=180)
    assert second.returncode != 0, second.stdout + second.stderr
    assert "Directory cannot be locked" in second.stderr + second.stdout, second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, out
    locks = work / ".snakemake" / "locks"
    assert not (locks.exists() and list(locks.iterdir())), "the first run left its lock"
    got = files_under(work / "data/demo", (".snakemake_timestamp",))
    expected = files_under(ref.base / "data/demo", ("superpixels.h5",))
    assert got.keys() == expected.keys() and all(got[k] == expected[k] for k in expected)
