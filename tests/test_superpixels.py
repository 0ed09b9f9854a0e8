import dataclasses

import h5py
import numpy as np
import pytest
import skimage
from skimage.segmentation import slic

import ssr.superpixels as sp
from ssr.config import SuperpixelParams
from ssr.data.layout import DatasetError, read_image, write_image
from ssr.superpixels import (
    RegionMaps,
    build_superpixels,
    kmeans,
    partial_path,
    read_region_map,
    region_map,
    slic_labels,
)

PARAMS = SuperpixelParams(n_segments=20, compactness=10.0, n_clusters=4, seed=0, workers=1)
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


def test_different_colours_split_and_a_uniform_patch_stays_whole():
    rng = np.random.default_rng(0)
    image = np.zeros((30, 40, 3), dtype=np.int64)
    image[:, :20] = (220, 20, 20)
    image[:, 20:] = (20, 20, 220)
    image = np.clip(image + rng.integers(-4, 5, image.shape), 0, 255).astype(np.uint8)
    two = region_map(image, 30, 10.0, 2, 0)
    assert len(np.unique(two[:, :20])) == 1 and len(np.unique(two[:, 20:])) == 1
    assert two[0, 0] != two[0, -1]
    # with more clusters than colours, k-means may split a patch but never mixes the two
    many = region_map(image, 30, 10.0, 8, 0)
    assert not set(np.unique(many[:, :20])) & set(np.unique(many[:, 20:]))

    uniform = np.full((30, 40, 3), 90, dtype=np.uint8)
    assert np.unique(region_map(uniform, 30, 10.0, 8, 0)).tolist() == [0]


def test_region_ids_are_bounded_and_follow_superpixels():
    image = _scene(3, (40, 48))
    for k in (1, 3, 6):
        regions = region_map(image, 30, 10.0, k, 0)
        assert regions.shape == image.shape[:2] and regions.dtype == np.uint8
        ids = np.unique(regions)
        assert ids.max() < k and ids.tolist() == list(range(len(ids)))
    # every superpixel lies inside one region
    labels = slic_labels(image, 30, 10.0)
    regions = region_map(image, 30, 10.0, 3, 0)
    for s in np.unique(labels):
        assert len(np.unique(regions[labels == s])) == 1
    with pytest.raises(ValueError, match="n_clusters"):
        region_map(image, 30, 10.0, 300, 0)
    with pytest.raises(ValueError, match="RGB"):
        region_map(image[..., 0], 30, 10.0, 3, 0)


def test_kmeans_is_deterministic_and_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = rng.integers(0, 3, 60)
    x = centres[truth] + rng.normal(scale=0.3, size=(60, 2))
    labels = kmeans(x, 3, seed=5)
    np.testing.assert_array_equal(labels, kmeans(x, 3, seed=5))
    # same partition as the truth, ids numbered by first appearance
    _, first = np.unique(truth, return_index=True)
    order = truth[np.sort(first)]
    np.testing.assert_array_equal(labels, np.argsort(order)[truth])
    # fewer distinct points than clusters: no empty clusters
    assert np.unique(kmeans(np.ones((5, 3)), 4, seed=0)).tolist() == [0]


def test_hdf5_round_trip_and_attributes(tmp_path):
    images = _images(tmp_path, 3)
    out = tmp_path / "superpixels.h5"
    build_superpixels(images, out, PARAMS, progress=False)
    assert _leftovers(tmp_path) == ["superpixels.h5"]
    with RegionMaps(out) as maps:
        assert sorted(maps.ids()) == ["im0", "im1", "im2"] and len(maps) == 3
        for image_id, path in images:
            expected = region_map(read_image(path), 20, 10.0, 4, 0)
            np.testing.assert_array_equal(maps[image_id], expected)
            assert maps[image_id].dtype == np.uint8
        assert maps.params == {"n_segments": 20, "compactness": 10.0, "n_clusters": 4, "seed": 0,
                               "method": "slic+kmeans-lab", "skimage_version": skimage.__version__}
        with pytest.raises(KeyError, match=r"superpixels\.h5.*'missing'"):
            maps["missing"]
    np.testing.assert_array_equal(read_region_map(out, "im1"), region_map(read_image(images[1][1]), 20, 10.0, 4, 0))
    with h5py.File(out, "r") as f:
        dataset = f["im0"]
        assert dataset.compression == "gzip" and dataset.chunks is not None
        assert "complete" not in dataset.attrs
    with pytest.raises(DatasetError, match="nothing.h5"):
        RegionMaps(tmp_path / "nothing.h5")


def test_ids_with_a_slash_are_escaped(tmp_path):
    (image_id, path), = _images(tmp_path, 1)
    out = tmp_path / "sp.h5"
    build_superpixels([("2008/000_1%", path)], out, PARAMS, progress=False)
    with RegionMaps(out) as maps:
        assert maps.ids() == ["2008/000_1%"] and "2008/000_1%" in maps
        np.testing.assert_array_equal(maps["2008/000_1%"], region_map(read_image(path), 20, 10.0, 4, 0))


def test_parallel_equals_serial(tmp_path):
    images = _images(tmp_path, 5)
    build_superpixels(images, tmp_path / "serial.h5", PARAMS, progress=False)
    build_superpixels(images, tmp_path / "parallel.h5", dataclasses.replace(PARAMS, workers=2), progress=False)
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
        build_superpixels(images, out, dataclasses.replace(PARAMS, workers=workers), progress=False)
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
    other = dataclasses.replace(PARAMS, n_clusters=3)
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
    np.testing.assert_array_equal(read_region_map(out, "im2"), region_map(read_image(images[2][1]), 20, 10.0, 4, 0))


def test_region_maps_survive_pickling_for_dataloader_workers(tmp_path):
    import pickle

    images = _images(tmp_path, 2)
    out = tmp_path / "superpixels.h5"
    build_superpixels(images, out, PARAMS, progress=False)
    with RegionMaps(out) as maps:
        clone = pickle.loads(pickle.dumps(maps))
        np.testing.assert_array_equal(clone["im1"], maps["im1"])
        clone.close()
