import os
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import skimage
from skimage.segmentation import slic

import ssr.superpixels as sp
from ssr.config import DemoParams, SuperpixelParams
from ssr.data.demo import render_sample
from ssr.data.layout import DatasetError, read_image, write_image
from ssr.data.regions import RegionMaps
from ssr.superpixels import (
    BACKENDS,
    build_superpixels,
    euclidean_kmeans,
    partial_path,
    region_map,
    slic_labels,
)

REPO = Path(__file__).resolve().parents[1]


def _read(path, image_id: str) -> np.ndarray:
    with RegionMaps(path) as maps:
        return maps[image_id]
PARAMS = SuperpixelParams(n_segments=20, compactness=10.0, n_clusters=4, seed=0, workers=1, backend="opencv")
COLOURS = np.array([[220, 30, 30], [30, 200, 40], [30, 40, 210], [230, 220, 40], [128, 128, 128]])


def _scene(seed: int, size=(28, 36)) -> np.ndarray:
    """Random axis-aligned colour blocks with a little noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    image = np.empty((h, w, 3), dtype=np.int64)
    image[:] = COLOURS[rng.integers(len(COLOURS))]
    for _ in range(3):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        image[y:y + rng.integers(6, 14), x:x + rng.integers(6, 14)] = COLOURS[rng.integers(len(COLOURS))]
    return np.clip(image + rng.integers(-5, 6, image.shape), 0, 255).astype(np.uint8)


def _images(tmp_path, n: int) -> list[tuple[str, object]]:
    items = []
    for k in range(n):
        path = tmp_path / "images" / f"im{k}.{'png' if k % 2 else 'jpg'}"
        write_image(path, _scene(k))
        items.append((f"im{k}", path))
    return items


def _expected(path, params=PARAMS) -> np.ndarray:
    """The map the stage must store for an image file."""
    return region_map(read_image(path), params.n_segments, params.compactness, params.n_clusters, params.seed,
                      params.backend)


def _contents(path) -> tuple[dict, dict]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".h5", ".tmp"))


def test_slic_labels_match_scikit_image():
    image = _scene(0, (40, 48))
    expected = slic(image, n_segments=25, compactness=7.0, start_label=0, channel_axis=-1)
    np.testing.assert_array_equal(slic_labels(image, 25, 7.0), expected)
    assert slic_labels(image, 25, 7.0).min() == 0


def test_backends_match_the_config_choices():
    assert BACKENDS == typing.get_args(SuperpixelParams.model_fields["backend"].annotation)
    with pytest.raises(ValueError, match="backend must be one of skimage, opencv, got 'cuda'"):
        region_map(_scene(0), 20, 10.0, 4, 0, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_different_colours_split_and_a_uniform_patch_stays_whole(backend):
    rng = np.random.default_rng(0)
    image = np.zeros((30, 40, 3), dtype=np.int64)
    image[:, :20] = (220, 20, 20)
    image[:, 20:] = (20, 20, 220)
    image = np.clip(image + rng.integers(-4, 5, image.shape), 0, 255).astype(np.uint8)
    two = region_map(image, 30, 10.0, 2, 0, backend)
    assert len(np.unique(two[:, :20])) == 1 and len(np.unique(two[:, 20:])) == 1
    assert two[0, 0] != two[0, -1]
    # with more clusters than colours, k-means may split a patch but never mixes the two
    many = region_map(image, 30, 10.0, 8, 0, backend)
    assert not set(np.unique(many[:, :20])) & set(np.unique(many[:, 20:]))

    uniform = np.full((30, 40, 3), 90, dtype=np.uint8)
    assert np.unique(region_map(uniform, 30, 10.0, 8, 0, backend)).tolist() == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_region_ids_are_bounded_deterministic_and_follow_superpixels(backend):
    for seed, size in ((3, (40, 48)), (4, (28, 36)), (5, (61, 17))):
        image = _scene(seed, size)
        labels = slic_labels(image, 30, 10.0, backend)
        assert labels.shape == size and labels.min() == 0
        assert (np.bincount(labels.ravel()) > 0).all()  # superpixel ids contiguous
        for k in (1, 3, 6):
            regions = region_map(image, 30, 10.0, k, 0, backend)
            assert regions.shape == size and regions.dtype == np.uint8
            ids = np.unique(regions)
            assert ids.max() < k and ids.tolist() == list(range(len(ids)))
            np.testing.assert_array_equal(regions, region_map(image.copy(), 30, 10.0, k, 0, backend))
        # every superpixel lies inside one region
        regions = region_map(image, 30, 10.0, 3, 0, backend)
        for s in np.unique(labels):
            assert len(np.unique(regions[labels == s])) == 1
    with pytest.raises(ValueError, match="n_clusters"):
        region_map(image, 30, 10.0, 300, 0, backend)
    with pytest.raises(ValueError, match="RGB"):
        region_map(image[..., 0], 30, 10.0, 3, 0, backend)


def test_opencv_maps_do_not_depend_on_opencv_threads():
    # workers > 1 run OpenCV single-threaded, an in-process run with its default threads, and
    # `workers` is not a file attribute: the maps must be the same either way
    image = _scene(6, (150, 200))
    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(1)
        single = region_map(image, 100, 10.0, 8, 0, "opencv")
        cv2.setNumThreads(4)
        np.testing.assert_array_equal(region_map(image, 100, 10.0, 8, 0, "opencv"), single)
    finally:
        cv2.setNumThreads(threads)


def test_opencv_handles_images_smaller_than_a_grid_cell():
    rng = np.random.default_rng(0)
    for size in ((1, 1), (1, 7), (3, 40), (40, 3), (5, 5)):
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        for n_segments in (2, 100):
            regions = region_map(image, n_segments, 10.0, 8, 0, "opencv")
            assert regions.shape == size
            ids = np.unique(regions)
            assert ids.tolist() == list(range(len(ids)))


def _asa(regions: np.ndarray, truth: np.ndarray) -> float:
    """Achievable segmentation accuracy: share of pixels right when each region takes its majority label."""
    table = np.zeros((256, 256), np.int64)
    np.add.at(table, (regions.ravel(), truth.ravel()), 1)
    return table.max(1).sum() / truth.size


def test_opencv_regions_fit_true_masks_no_worse_than_skimage():
    # Demo images (shapes on textures) with their true masks. Per image, d = ASA(opencv) -
    # ASA(skimage); the backends are interchangeable if the mean of d is not significantly
    # negative: a one-sided test at 3 standard errors of the mean (p < 0.0014 under normality).
    demo = DemoParams()
    d = np.array([_asa(region_map(s.image, 100, 10.0, 8, 0, "opencv"), s.label)
                  - _asa(region_map(s.image, 100, 10.0, 8, 0, "skimage"), s.label)
                  for s in (render_sample(demo, "val", i) for i in range(40))])
    assert d.mean() >= -3 * d.std(ddof=1) / np.sqrt(len(d)), (d.mean(), d.std(ddof=1))


def test_kmeans_is_deterministic_and_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = rng.integers(0, 3, 60)
    x = centres[truth] + rng.normal(scale=0.3, size=(60, 2))
    labels = euclidean_kmeans(x, 3, seed=5)
    np.testing.assert_array_equal(labels, euclidean_kmeans(x, 3, seed=5))
    # same partition as the truth, ids numbered by first appearance
    _, first = np.unique(truth, return_index=True)
    order = truth[np.sort(first)]
    np.testing.assert_array_equal(labels, np.argsort(order)[truth])
    # fewer distinct points than clusters: no empty clusters
    assert np.unique(euclidean_kmeans(np.ones((5, 3)), 4, seed=0)).tolist() == [0]


def test_hdf5_round_trip_and_attributes(tmp_path):
    images = _images(tmp_path, 3)
    out = tmp_path / "superpixels.h5"
    build_superpixels(images, out, PARAMS, progress=False)
    assert _leftovers(tmp_path) == ["superpixels.h5"]
    with RegionMaps(out) as maps:
        assert sorted(maps.ids()) == ["im0", "im1", "im2"] and len(maps) == 3
        for image_id, path in images:
            np.testing.assert_array_equal(maps[image_id], _expected(path))
            assert maps[image_id].dtype == np.uint8
        assert maps.params == {"n_segments": 20, "compactness": 10.0, "n_clusters": 4, "seed": 0,
                               "method": "slic+kmeans-lab", "backend": "opencv"}
        with pytest.raises(KeyError, match=r"superpixels\.h5.*'missing'"):
            maps["missing"]
    np.testing.assert_array_equal(_read(out, "im1"), _expected(images[1][1]))
    with h5py.File(out, "r") as f:
        dataset = f["im0"]
        assert dataset.compression == "gzip" and dataset.chunks == dataset.shape  # one chunk, read whole
        assert "complete" not in dataset.attrs
    with pytest.raises(DatasetError, match="nothing.h5"):
        RegionMaps(tmp_path / "nothing.h5")


def test_ids_with_a_slash_are_escaped(tmp_path):
    (image_id, path), = _images(tmp_path, 1)
    out = tmp_path / "sp.h5"
    build_superpixels([("2008/000_1%", path)], out, PARAMS, progress=False)
    with RegionMaps(out) as maps:
        assert maps.ids() == ["2008/000_1%"] and "2008/000_1%" in maps
        np.testing.assert_array_equal(maps["2008/000_1%"], _expected(path))


def test_parallel_equals_serial(tmp_path):
    images = _images(tmp_path, 5)
    build_superpixels(images, tmp_path / "serial.h5", PARAMS, progress=False)
    build_superpixels(images, tmp_path / "parallel.h5", PARAMS.model_copy(update={"workers": 2}), progress=False)
    serial, serial_attrs = _contents(tmp_path / "serial.h5")
    parallel, parallel_attrs = _contents(tmp_path / "parallel.h5")
    assert serial.keys() == parallel.keys() == {f"im{k}" for k in range(5)}
    for key in serial:
        np.testing.assert_array_equal(serial[key], parallel[key])
    assert serial_attrs == parallel_attrs


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_image_stops_the_stage_and_leaves_no_product(tmp_path, workers):
    images = _images(tmp_path, 4)
    bad = images[2][1]
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    out = tmp_path / "superpixels.h5"
    with pytest.raises(DatasetError, match=str(bad)):
        build_superpixels(images, out, PARAMS.model_copy(update={"workers": workers}), progress=False)
    assert not out.exists()
    assert not any(p.suffix == ".tmp" for p in tmp_path.iterdir())
    if workers == 1:
        # the two maps finished before the bad image are kept for the rerun
        with h5py.File(partial_path(out), "r") as f:
            assert sorted(f) == ["im0", "im1"]


def test_corrupt_first_image_leaves_no_hdf5_at_all(tmp_path):
    images = _images(tmp_path, 2)
    images[0][1].write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match="im0"):
        build_superpixels(images, tmp_path / "superpixels.h5", PARAMS, progress=False)
    assert _leftovers(tmp_path) == []


def _interrupt_after(monkeypatch, n):
    real = sp._compute_one
    calls = []

    def compute(image_id, *args):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(image_id)
        return real(image_id, *args)

    monkeypatch.setattr(sp, "_compute_one", compute)
    return real


def _count_calls(monkeypatch, real):
    calls = []

    def compute(image_id, *args):
        calls.append(image_id)
        return real(image_id, *args)

    monkeypatch.setattr(sp, "_compute_one", compute)
    return calls


def test_interrupted_run_resumes_with_the_remaining_ids(tmp_path, monkeypatch):
    images = _images(tmp_path, 6)
    build_superpixels(images, tmp_path / "straight.h5", PARAMS, progress=False)

    out = tmp_path / "superpixels.h5"
    real = _interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        build_superpixels(images, out, PARAMS, progress=False)
    assert not out.exists() and partial_path(out).exists()

    calls = _count_calls(monkeypatch, real)
    build_superpixels(images, out, PARAMS, progress=False)
    assert calls == ["im4", "im5"]
    assert not partial_path(out).exists()
    resumed, resumed_attrs = _contents(out)
    straight, straight_attrs = _contents(tmp_path / "straight.h5")
    assert resumed.keys() == straight.keys()
    for key in straight:
        np.testing.assert_array_equal(resumed[key], straight[key])
    assert resumed_attrs == straight_attrs


def test_checkpoint_with_other_params_or_unreadable_is_discarded(tmp_path, monkeypatch):
    images = _images(tmp_path, 4)
    out = tmp_path / "superpixels.h5"
    real = _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        build_superpixels(images, out, PARAMS, progress=False)

    calls = _count_calls(monkeypatch, real)
    other = PARAMS.model_copy(update={"n_clusters": 3})
    build_superpixels(images, out, other, progress=False)
    assert calls == ["im0", "im1", "im2", "im3"]
    with RegionMaps(out) as maps:
        assert maps.params["n_clusters"] == 3

    partial_path(out).write_bytes(b"not hdf5")
    calls.clear()
    build_superpixels(images[:2], out, PARAMS, progress=False)
    assert calls == ["im0", "im1"]
    with RegionMaps(out) as maps:
        assert sorted(maps.ids()) == ["im0", "im1"]


def test_backend_is_recorded_and_a_checkpoint_of_the_other_backend_is_not_reused(tmp_path, monkeypatch):
    images = _images(tmp_path, 4)
    out = tmp_path / "superpixels.h5"
    skimage_params = PARAMS.model_copy(update={"backend": "skimage"})
    real = _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        build_superpixels(images, out, skimage_params, progress=False)
    with h5py.File(partial_path(out), "r") as f:
        assert f.attrs["backend"] == "skimage" and f.attrs["backend_version"] == skimage.__version__

    calls = _count_calls(monkeypatch, real)
    build_superpixels(images, out, PARAMS, progress=False)
    assert calls == ["im0", "im1", "im2", "im3"]
    with RegionMaps(out) as maps:
        assert maps.params["backend"] == "opencv" and "backend_version" not in maps.params
        for image_id, path in images:
            np.testing.assert_array_equal(maps[image_id], _expected(path))
    # and back: the finished opencv run leaves no checkpoint, so skimage recomputes everything too
    calls.clear()
    build_superpixels(images, out, skimage_params, progress=False)
    assert calls == ["im0", "im1", "im2", "im3"]
    np.testing.assert_array_equal(_read(out, "im3"), _expected(images[3][1], skimage_params))


def test_workers_in_a_script_without_main_guard_fail_with_what_to_do(tmp_path):
    _images(tmp_path, 4)
    script = tmp_path / "no_guard.py"
    script.write_text(textwrap.dedent(f"""
        from pathlib import Path
        from ssr.config import SuperpixelParams
        from ssr.superpixels import build_superpixels

        images = [(p.stem, p) for p in sorted(Path({str(tmp_path / "images")!r}).iterdir())]
        build_superpixels(images, Path("out.h5"), SuperpixelParams(n_segments=20, workers=2), progress=False)
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    # the worker says what happened, the parent what to do
    assert "build_superpixels ran while a worker process was importing the main script" in proc.stderr
    assert "RuntimeError: superpixels: a worker process exited before returning its maps" in proc.stderr
    assert 'under `if __name__ == "__main__":`' in proc.stderr and "workers=1" in proc.stderr
    assert not list(tmp_path.glob("out.h5*"))


def test_unfinished_datasets_in_a_checkpoint_are_recomputed(tmp_path, monkeypatch):
    images = _images(tmp_path, 3)
    out = tmp_path / "superpixels.h5"
    real = _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        build_superpixels(images, out, PARAMS, progress=False)
    # a map written but never marked complete (killed before its flush) must not be trusted
    with h5py.File(partial_path(out), "a") as f:
        f.create_dataset("im2", data=np.full((28, 36), 9, np.uint8))
        del f["im1"].attrs["complete"]
    calls = _count_calls(monkeypatch, real)
    build_superpixels(images, out, PARAMS, progress=False)
    assert sorted(calls) == ["im1", "im2"]
    np.testing.assert_array_equal(_read(out, "im2"), _expected(images[2][1]))


def test_region_maps_survive_pickling_for_dataloader_workers(tmp_path):
    import pickle

    images = _images(tmp_path, 2)
    out = tmp_path / "superpixels.h5"
    build_superpixels(images, out, PARAMS, progress=False)
    with RegionMaps(out) as maps:
        clone = pickle.loads(pickle.dumps(maps))
        np.testing.assert_array_equal(clone["im1"], maps["im1"])
        clone.close()
