"""Using a trained run: `ssr predict`, `ssr.predict`, `ssr evaluate --model / --split / --pred --gt`, and the
errors that name the real cause. One tiny demo DAG with two seeds (conftest's `trained_demo`) serves them all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ssr
from ssr.cli import main as ssr_main
from ssr.crf import CrfJob, CrfPool, crf_size, dense_crf_from_params, run_crf_job
from ssr.data.layout import DatasetLayout, read_image, read_label_png, write_label_png
from ssr.images import ImageError
from ssr.infer import VOC_SUBMISSION


@pytest.fixture(scope="module")
def demo(trained_demo):
    path, params = trained_demo
    run = type("Demo", (), {})()
    run.path, run.params = path, params
    run.results = Path(params.results_root)
    run.layout = DatasetLayout(params.dataset_root("demo"))
    run.model_dir = run.results / "demo" / "method" / "seed0"
    run.trained = ssr.load_model(run.model_dir, demo_clip_dir=Path(params.demo_clip.checkpoint).parent)
    run.val = run.layout.split("val")
    return run


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = ssr_main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- ssr predict


def make_inputs(demo, folder: Path) -> dict[str, tuple[int, int]]:
    """Demo images as every kind of file, and a truncated one -> {file name: (H, W) a viewer shows}."""
    folder.mkdir(parents=True)
    image = read_image(demo.layout.image_path(demo.val[0]))
    h, w = image.shape[:2]
    Image.fromarray(image).save(folder / "plain.png")
    Image.fromarray(read_image(demo.layout.image_path(demo.val[1]))).save(folder / "photo.jpg", quality=90)
    Image.fromarray(image).convert("L").save(folder / "grey.png")
    Image.fromarray(np.dstack([image, np.full((h, w), 255, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(image).quantize(32).save(folder / "palette.png")
    Image.fromarray(image[..., 1].astype(np.uint16) * 257).save(folder / "sixteen.png")
    wide = np.ascontiguousarray(image[: h // 2])                  # stored h/2 x w, shown w x h/2 turned upright
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(wide).save(folder / "sideways.jpg", exif=exif)
    data = (folder / "plain.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    return {"plain": (h, w), "photo": (h, w), "grey": (h, w), "rgba": (h, w), "palette": (h, w), "sixteen": (h, w),
            "sideways": (w, h // 2)}


def test_predict_a_folder_of_every_kind_of_image_then_resume(demo, tmp_path, capsys):
    """A mask and an overlay per readable image at its shown size; the truncated file named; exit non-zero;
    the masks are ssr.predict's; a rerun skips what exists, --overwrite redoes it."""
    sizes = make_inputs(demo, tmp_path / "in")
    out = tmp_path / "out"
    argv = ["predict", "--model", str(demo.model_dir), "--out", str(out), "--params", str(demo.path), str(tmp_path / "in"),
            "--workers", "2"]
    rc, stdout, err = run_cli(capsys, *argv)
    assert rc == 2, err
    assert f"{tmp_path / 'in' / 'truncated.png'}: cannot read image" in err, err
    assert "1 of 8 inputs could not be segmented" in err.splitlines()[-1], err
    assert "Traceback" not in err
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([f"{stem}.png" for stem in sizes] + [f"{stem}_overlay.jpg" for stem in sizes])
    classes = set(range(len(demo.trained.classes)))
    for stem, (h, w) in sizes.items():
        with Image.open(out / f"{stem}.png") as mask:
            assert mask.mode == "P" and (mask.height, mask.width) == (h, w), stem
            assert mask.getpalette()[:6] == [0, 0, 0, 128, 0, 0]      # the VOC palette: background black, class 1 maroon
        labels = read_label_png(out / f"{stem}.png")
        assert set(np.unique(labels)) <= classes
        np.testing.assert_array_equal(labels, ssr.predict(demo.trained, tmp_path / "in" / f"{stem}.jpg"
                                                          if stem in ("photo", "sideways") else tmp_path / "in" / f"{stem}.png"))
        with Image.open(out / f"{stem}_overlay.jpg") as overlay:
            assert (overlay.height, overlay.width) == (h, w) and overlay.mode == "RGB"
    # an opaque RGBA image is the RGB image; a 16-bit one its 8-bit copy
    np.testing.assert_array_equal(read_label_png(out / "rgba.png"), read_label_png(out / "plain.png"))

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and "7 of 8 images already segmented" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (out / "grey_overlay.jpg").unlink()                             # an interrupted image: done again
    rc, stdout, err = run_cli(capsys, *argv[:-3], str(tmp_path / "in" / "grey.png"))
    assert rc == 0 and stdout.startswith("1 images segmented"), err
    rc, stdout, err = run_cli(capsys, *argv[:-3], str(tmp_path / "in" / "plain.png"), "--overwrite", "--probabilities")
    assert rc == 0, err
    assert (out / "plain.png").stat().st_mtime_ns != before["plain.png"]
    with np.load(out / "plain.npz") as saved:
        probs, names = saved["probabilities"], list(saved["classes"])
    assert names == demo.trained.classes and probs.dtype == np.float16 and probs.shape == (len(names), *sizes["plain"])
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1, atol=len(names) * 2 ** -11)  # float16 rounding
    assert not list(out.glob(".*.tmp"))                            # written atomically: no temporary file left


def test_predict_options_reach_the_inference(demo, tmp_path, capsys):
    """--no-crf, --scales, --no-flip and --long-side give what ssr.predict gives with those settings: the same labels
    and the same probabilities (--probabilities; the tiny model's labels alone hardly tell settings apart)."""
    image = tmp_path / "x.png"
    Image.fromarray(read_image(demo.layout.image_path(demo.val[2]))).save(image)
    base = ["predict", "--model", str(demo.model_dir), "--params", str(demo.path), str(image), "--workers", "0",
            "--probabilities"]
    options = {"recorded": ([], {}), "no_crf": (["--no-crf"], {"crf": False}),
               "other": (["--scales", "1.0", "0.5", "--no-flip", "--long-side", "48"], {"scales": [1.0, 0.5], "flip": False,
                                                                                       "long_side": 48})}
    probabilities = {}
    for name, (flags, kwargs) in options.items():
        assert run_cli(capsys, *base, "--out", str(tmp_path / name), *flags)[0] == 0
        labels, probs = ssr.predict(demo.trained, image, probabilities=True, **kwargs)
        np.testing.assert_array_equal(read_label_png(tmp_path / name / "x.png"), labels, err_msg=name)
        with np.load(tmp_path / name / "x.npz") as saved:
            probabilities[name] = saved["probabilities"]
        np.testing.assert_array_equal(probabilities[name], probs.astype(np.float16), err_msg=name)
    assert not np.array_equal(probabilities["recorded"], probabilities["no_crf"])
    assert not np.array_equal(probabilities["no_crf"], probabilities["other"])


def test_predict_takes_what_users_pass(demo):
    """np.asarray of a PIL image (read-only), the PIL image, the path: the same labels, DenseCRF on."""
    path = demo.layout.image_path(demo.val[0])
    assert demo.trained.infer.crf
    frozen = np.asarray(Image.open(path).convert("RGB"))
    assert not frozen.flags.writeable
    labels = ssr.predict(demo.trained, frozen)
    assert labels.shape == frozen.shape[:2] and labels.dtype == np.uint8
    np.testing.assert_array_equal(ssr.predict(demo.trained, Image.open(path)), labels)
    np.testing.assert_array_equal(ssr.predict(demo.trained, str(path)), labels)
    np.testing.assert_array_equal(ssr.predict(demo.trained, np.moveaxis(frozen, -1, 0) / 255.0), labels)
    with pytest.raises(ImageError, match=r"empty image \(0x0 pixels\)"):
        ssr.predict(demo.trained, np.zeros((0, 0, 3), np.uint8))


def test_densecrf_runs_at_most_at_its_max_side(demo, monkeypatch):
    """crf_max_side caps the size DenseCRF runs at (what it costs), and the labels come back at the image's size."""
    import ssr.crf

    seen = []
    real = ssr.crf.dense_crf
    monkeypatch.setattr(ssr.crf, "dense_crf", lambda image, probs, **kw: seen.append(image.shape[:2]) or real(image, probs, **kw))
    image = np.repeat(np.repeat(read_image(demo.layout.image_path(demo.val[0])), 3, axis=0), 2, axis=1)   # 96 x 64
    labels = ssr.predict(demo.trained, image, crf_max_side=40)
    assert seen == [crf_size(96, 64, 40)] == [(40, 27)]
    assert labels.shape == (96, 64)
    seen.clear()
    ssr.predict(demo.trained, image, crf_max_side=96)
    assert seen == [(96, 64)]
    assert crf_size(96, 64, 0) == (96, 64)


def test_densecrf_in_worker_processes_equals_densecrf_here(demo):
    """The pool returns what run_crf_job gives in this process, in the order of the stream, full size and capped."""
    rng = np.random.default_rng(0)
    jobs = []
    for k in range(5):
        h, w = 24 + 8 * k, 40 - 4 * k
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        probs = rng.dirichlet(np.ones(4), size=(h, w)).transpose(2, 0, 1).astype(np.float32)
        size = (h, w) if k % 2 else (2 * h, 2 * w)                 # odd: full size; even: upsampled afterwards
        jobs.append((k, CrfJob(image, probs, size, keep_probs=True) if k != 3 else None))
    infer = demo.trained.infer
    with CrfPool(2) as pool:
        pooled = list(pool.map(iter(jobs), infer))
    assert [k for k, _ in pooled] == list(range(5))
    for (_, job), (_, result) in zip(jobs, pooled, strict=True):
        if job is None:
            assert result is None
            continue
        labels, probs = run_crf_job(job, infer)
        np.testing.assert_array_equal(result[0], labels)
        np.testing.assert_array_equal(result[1], probs)
        assert labels.shape == job.size
        if job.size == job.image.shape[:2]:
            np.testing.assert_array_equal(probs, dense_crf_from_params(job.image, job.probs, infer))


# ---------------------------------------------------------------- ssr evaluate --model


def test_evaluate_a_run_folder_reproduces_the_dag_and_touches_none_of_its_outputs(demo, tmp_path, capsys):
    """Seed 0 and seed 1 on val give exactly the DAG's per-seed mIoU (the metrics file's min and max of two seeds),
    plain and after DenseCRF; results/demo_miou.json, the predictions and the timings stay as they were."""
    dag = json.loads((demo.results / "demo_miou.json").read_text())
    before = snapshot(demo.results)
    found = {}
    for seed in (0, 1):
        run = demo.results / "demo" / "method" / f"seed{seed}"
        out = tmp_path / f"seed{seed}"
        rc, stdout, err = run_cli(capsys, "evaluate", "--model", str(run), "--split", "val", "--params", str(demo.path),
                                  "--out", str(out), "--workers", "2")
        assert rc == 0, err
        found[seed] = json.loads((out / "metrics.json").read_text())
        assert found[seed]["split"] == "val" and "mIoU" in stdout
    for key in ("miou", "crf_miou", "precision", "crf_recall"):
        assert sorted(found[s][key] for s in (0, 1)) == [dag[f"{key}_min"], dag[f"{key}_max"]], key
    assert snapshot(demo.results) == before
    # its default folder is the run's own evaluate/{split}: also outside the DAG's outputs
    rc, _, err = run_cli(capsys, "evaluate", "--model", str(demo.model_dir), "--params", str(demo.path), "-q", "--workers", "0")
    assert rc == 0, err
    assert json.loads((demo.model_dir / "evaluate" / "val" / "metrics.json").read_text())["miou"] == found[0]["miou"]
    assert {k: v for k, v in snapshot(demo.results).items() if not k.startswith("demo/method/seed0/evaluate/")} == before
    shutil.rmtree(demo.model_dir / "evaluate")


def test_evaluate_reuses_the_predictions_of_an_interrupted_run(demo, tmp_path, capsys, monkeypatch):
    """Images whose predictions are stored are not computed again; other inference settings start over."""
    import ssr.infer

    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(demo.model_dir), "--params", str(demo.path), "--out", str(out), "-q", "--workers", "0"]
    assert run_cli(capsys, *argv)[0] == 0
    reference = json.loads((out / "metrics.json").read_text())
    for image_id in demo.val[2:]:                                    # as if stopped after two images
        (out / "predictions_crf" / f"{image_id}.png").unlink()
    (out / "metrics.json").unlink()
    calls = []
    real = ssr.infer.batch_probs
    monkeypatch.setattr(ssr.infer, "batch_probs", lambda *a, **k: calls.append(a[2].shape[0]) or real(*a, **k))
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert sum(calls) == len(demo.val) - 2
    assert json.loads((out / "metrics.json").read_text()) == reference
    calls.clear()
    assert run_cli(capsys, *argv, "--no-flip")[0] == 0               # other settings: every image again
    assert sum(calls) == len(demo.val)


def test_the_dag_evaluation_resumes_and_workers_change_nothing(demo, tmp_path, capsys, monkeypatch):
    """The DAG's evaluate stopped mid-way keeps each model's finished predictions under predictions.partial/; the rerun
    (DenseCRF in 2 worker processes) computes only the rest and writes what the uninterrupted run wrote."""
    import ssr.infer

    work = tmp_path / "w"
    for part in ("data", "results"):
        shutil.copytree(Path(getattr(demo.params, f"{part}_root")), work / part)
    params = work / "params.yaml"
    params.write_text(demo.path.read_text().replace(str(demo.results), str(work / "results"))
                      .replace(demo.params.data_root, str(work / "data")))
    outputs = ("demo_miou.json", "demo/predictions")
    for rel in outputs:
        shutil.rmtree(work / "results" / rel) if (work / "results" / rel).is_dir() else (work / "results" / rel).unlink()
    calls = []
    real = ssr.infer.batch_probs

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 9:                                          # seed 0's 6 images done, seed 1's 3rd under way
            raise KeyboardInterrupt("stopped")
        return real(*a, **k)

    monkeypatch.setattr(ssr.infer, "batch_probs", interrupted)
    argv = ["evaluate", "--dataset", "demo", "--params", str(params), "-q"]
    assert run_cli(capsys, *argv, "--workers", "0")[0] == 130
    assert not (work / "results" / "demo_miou.json").exists()
    partial = work / "results" / "demo" / "predictions.partial" / "method"
    assert len(list((partial / "seed1" / "predictions_crf").glob("*.png"))) == 2
    calls.clear()
    monkeypatch.setattr(ssr.infer, "batch_probs", lambda *a, **k: calls.append(1) or real(*a, **k))
    rc, _, err = run_cli(capsys, *argv, "--workers", "2")
    assert rc == 0, err
    assert len(calls) == len(demo.val) - 2                           # seed 1's other images only
    for rel in outputs:
        assert snapshot(work / "results" / rel) == snapshot(demo.results / rel), rel
    assert not partial.parent.exists(), "the stage's work folder outlived its success"


def test_evaluate_the_test_split_writes_a_voc_submission(demo, tmp_path, capsys):
    """A split without ground truth or weak labels: every image predicted, nothing scored, and the class-indexed PNGs
    in the VOC server's layout, results/VOC2012/Segmentation/comp6_test_cls/{id}.png, ready to tar."""
    work = tmp_path / "w"
    shutil.copytree(Path(demo.params.data_root), work / "data")
    layout = DatasetLayout(work / "data" / "demo")
    test_ids = [f"test_{k:05d}" for k in range(3)]
    for image_id, source in zip(test_ids, demo.val, strict=False):
        shutil.copy(layout.image_path(source), layout.images_dir / f"{image_id}{layout.image_path(source).suffix}")
    layout.write_split("test", test_ids)
    params = work / "params.yaml"
    params.write_text(demo.path.read_text().replace(demo.params.data_root, str(work / "data"))
                      .replace(str(demo.results), str(work / "results")))
    rc, stdout, err = run_cli(capsys, "evaluate", "--model", str(demo.model_dir), "--split", "test", "--params", str(params),
                              "--out", str(tmp_path / "eval"), "--workers", "0")
    assert rc == 0, err
    folder = work / "results" / "demo" / "test_submission" / VOC_SUBMISSION
    assert folder.as_posix().endswith("results/demo/test_submission/results/VOC2012/Segmentation/comp6_test_cls")
    assert sorted(p.name for p in folder.iterdir()) == [f"{i}.png" for i in test_ids]
    for image_id, source in zip(test_ids, demo.val, strict=False):
        with Image.open(folder / f"{image_id}.png") as png:
            assert png.mode == "P"                                   # class indices, VOC colours
        np.testing.assert_array_equal(read_label_png(folder / f"{image_id}.png"),
                                      ssr.predict(demo.trained, layout.image_path(source)))
    assert not (tmp_path / "eval" / "metrics.json").exists()
    assert "no ground truth" in stdout and f"-C {folder.parents[3]} results" in stdout


# ---------------------------------------------------------------- ssr evaluate --pred --gt


def test_folder_scoring_matches_the_predictions_ids_or_a_split(demo, tmp_path, capsys):
    """labels/ holds every split: by default the predictions' ids are scored, with --split exactly the split's ids;
    the classes come from classes.json beside labels/."""
    pred = tmp_path / "pred"
    subset = demo.val[:3]
    for image_id in subset:
        write_label_png(pred / f"{image_id}.png", read_label_png(demo.results / "demo" / "predictions" / f"{image_id}.png"))
    out = tmp_path / "scores.json"
    rc, stdout, err = run_cli(capsys, "evaluate", "--pred", str(pred), "--gt", str(demo.layout.labels_dir), "--out", str(out))
    assert rc == 0, err
    assert "3 predictions scored" in stdout
    from ssr.metrics import evaluate_label_dirs

    expected = evaluate_label_dirs(pred, demo.layout.labels_dir, len(demo.trained.classes), demo.trained.classes, ids=subset)
    assert json.loads(out.read_text()) == expected
    rc, _, err = run_cli(capsys, "evaluate", "--pred", str(pred), "--gt", str(demo.layout.labels_dir), "--split", "val")
    assert rc == 2 and f"{pred / demo.val[3]}.png: prediction missing" in err, err
    rc, stdout, err = run_cli(capsys, "evaluate", "--pred", str(demo.results / "demo" / "predictions"), "--gt",
                              str(demo.layout.labels_dir), "--split", "val", "--model", str(demo.model_dir))
    assert rc == 0 and f"{len(demo.val)} predictions scored (split val)" in stdout, err
    assert "circle" in stdout                                        # class names from the model


# ---------------------------------------------------------------- errors that name the real cause


def test_a_missing_run_folder_names_it_and_the_seeds_there(demo, capsys):
    missing = demo.results / "demo" / "method" / "seed9"
    with pytest.raises(FileNotFoundError) as err:
        ssr.load_model(missing)
    assert str(err.value).startswith(f"{missing}: no such run folder")
    assert "holds seed0, seed1" in str(err.value)
    rc, _, err = run_cli(capsys, "evaluate", "--dataset", "demo", "--params", str(demo.path), "--seeds", "5")
    assert rc == 2
    assert f"{demo.results / 'demo' / 'method' / 'seed5'}: no such run folder" in err and "seed0, seed1" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
@pytest.mark.parametrize("device, message", [
    ("cuda", "device 'cuda': no CUDA GPU is usable here"),
    ("cuda:1", "device 'cuda:1': no CUDA GPU is usable here"),
    ("gpu", "device 'gpu' is not a torch device (for a GPU: cuda); use cpu, cuda or cuda:N"),
])
def test_a_device_that_is_not_there_is_named_with_exit_code_2(demo, tmp_path, capsys, device, message):
    for stage in ("predict", "evaluate"):
        extra = [str(demo.layout.image_path(demo.val[0])), "--out", str(tmp_path)] if stage == "predict" else []
        rc, _, err = run_cli(capsys, stage, "--model", str(demo.model_dir), "--params", str(demo.path), "--device", device,
                             *extra)
        assert rc == 2 and err.strip().splitlines()[-1].startswith(f"ssr {stage}: error: {message}"), err
    with pytest.raises(ValueError, match="no CUDA GPU") if device != "gpu" else pytest.raises(ValueError, match="not a torch"):
        ssr.load_model(demo.model_dir, device=device)


def test_inputs_that_would_overwrite_each_other_or_themselves_are_refused(tmp_path):
    from ssr.predict_files import check_outputs

    a, b = tmp_path / "a" / "x.png", tmp_path / "b" / "x.jpg"
    with pytest.raises(ValueError, match=f"same outputs in {tmp_path / 'out'}: {a} and {b}; predict them into separate"):
        check_outputs([a, b], tmp_path / "out", probabilities=False)
    with pytest.raises(ValueError, match=f"{tmp_path / 'a' / 'x.png'}: an output would replace the input image"):
        check_outputs([a], tmp_path / "a", probabilities=False)
    check_outputs([a, tmp_path / "b" / "y.jpg"], tmp_path / "out", probabilities=True)


def test_inference_options_outside_model_mode_are_refused(demo, capsys):
    rc, _, err = run_cli(capsys, "evaluate", "--dataset", "demo", "--params", str(demo.path), "--scales", "1.0", "--no-crf")
    assert rc == 2 and "--scales, --crf: inference settings go with --model" in err, err


def test_a_killed_densecrf_worker_is_an_error_saying_so(demo):
    """A worker killed mid-job (the kernel's out-of-memory killer) stops the stream with a message, not a hang."""
    import multiprocessing
    import os
    import signal
    import threading
    import time

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)             # seconds of DenseCRF at 21 classes
    probs = rng.dirichlet(np.ones(21), size=(600, 600)).transpose(2, 0, 1).astype(np.float32)

    def kill_the_worker():
        deadline = time.time() + 60
        while not multiprocessing.active_children() and time.time() < deadline:
            time.sleep(0.05)
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)

    with CrfPool(1) as pool:
        killer = threading.Thread(target=kill_the_worker)
        killer.start()
        with pytest.raises(RuntimeError, match="a DenseCRF worker process died"):
            list(pool.map(iter([(0, CrfJob(image, probs, (600, 600)))]), demo.trained.infer))
        killer.join()


PARENT = '''
import multiprocessing, sys, threading, time
from pathlib import Path

import numpy as np

from ssr.crf import CrfJob, CrfPool, CrfSettings

if __name__ == "__main__":
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(21), size=(200, 200)).transpose(2, 0, 1).astype(np.float32)
    jobs = [(k, CrfJob(image, probs, (200, 200))) for k in range(8)]

    def report():
        Path(sys.argv[1] + ".tmp").write_text(" ".join(str(c.pid) for c in multiprocessing.active_children()))
        Path(sys.argv[1] + ".tmp").rename(sys.argv[1])

    def report_when_started():
        while len(multiprocessing.active_children()) < 2:
            time.sleep(0.01)
        report()

    if sys.argv[2] == "starting":
        threading.Thread(target=report_when_started, daemon=True).start()
    with CrfPool(2) as pool:
        for k, _ in pool.map(iter(jobs), CrfSettings(10, 3.0, 3.0, 64.0, 5.0, 4.0, 500)):
            if k == 0 and sys.argv[2] == "working":                 # both workers busy with the next jobs
                report()
'''


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for whoever adopted it to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from Linux's /proc")
@pytest.mark.parametrize("when", ["starting", "working"])
def test_densecrf_workers_die_with_their_parent(tmp_path, when):
    """A parent killed outright (SIGKILL: a scheduler's time limit, the out-of-memory killer), while its workers
    start or while they work, leaves no worker behind: they would wait on their job queue forever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script, pids = tmp_path / "parent.py", tmp_path / "pids"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(pids), when])
    workers: list[int] = []
    try:
        deadline = time.time() + 120
        while not pids.exists() and time.time() < deadline:
            time.sleep(0.01)
        workers = [int(p) for p in pids.read_text().split()]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 60
        while any(_alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if _alive(pid)], "DenseCRF workers outlived their parent"
    finally:
        parent.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
