import re
import shutil

import archives as A
import numpy as np
import pytest
import scipy.io
from PIL import Image

from ssr.data.layout import DatasetError, DatasetLayout, voc_palette
from ssr.data.voc import VOC_CLASSES, prepare_voc, read_sbd_mat


@pytest.fixture(scope="module")
def tarballs(tmp_path_factory):
    """The tiny VOC tar and SBD tgz, built once for the module."""
    root = tmp_path_factory.mktemp("voc_archives")
    return A.build_voc_archives(root / "server", root / "work")


def _params(voc_tar, sbd_tgz, missing_dir=None):
    return A.download_params(voc=A.source(voc_tar, missing_dir=missing_dir),
                             sbd=A.source(sbd_tgz, missing_dir=missing_dir))


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _check_layout(root, source_jpegs=None):
    layout = DatasetLayout(root)
    assert layout.split("train_aug") == A.TRAIN_AUG
    assert layout.split("train") == sorted(A.VOC_TRAIN)
    assert layout.split("val") == sorted(A.VOC_VAL)
    assert len(A.TRAIN_AUG) == 5  # (3 SBD train + 2 SBD val + 3 VOC train) minus overlaps and VOC val
    ids = sorted(set(A.TRAIN_AUG) | set(A.VOC_VAL))
    assert sorted(p.stem for p in layout.images_dir.iterdir()) == ids
    assert sorted(p.stem for p in layout.labels_dir.iterdir()) == ids
    assert layout.classes() == VOC_CLASSES and len(VOC_CLASSES) == 21
    image_labels = layout.image_labels()
    assert sorted(image_labels) == ids
    for image_id in ids:
        with Image.open(layout.label_path(image_id)) as png:
            assert png.mode == "P"
            assert png.getpalette()[:768] == voc_palette()
            label = np.array(png)
        # VOC SegmentationClass wins over SBD (2008_000002 has both); SBD fills the rest.
        expected = A.voc_label(image_id) if image_id in A.VOC_TRAIN + A.VOC_VAL else A.sbd_label(image_id)
        np.testing.assert_array_equal(label, expected)
        assert image_labels[image_id] == sorted(int(c) for c in np.unique(expected) if 0 < c < 255)
        with Image.open(layout.image_path(image_id)) as jpg:
            assert (jpg.height, jpg.width) == label.shape
        if source_jpegs is not None:
            assert layout.image_path(image_id).read_bytes() == (source_jpegs / f"{image_id}.jpg").read_bytes()
    # VOC labels keep their 255 object borders; SBD ones have none.
    assert (np.array(Image.open(layout.label_path(A.VOC_VAL[0]))) == 255).any()
    assert not (np.array(Image.open(layout.label_path(A.SBD_TRAIN[0]))) == 255).any()


def test_prepare_from_downloads(tmp_path, tarballs):
    voc_tar, sbd_tgz = tarballs
    root = tmp_path / "data" / "voc"
    prepare_voc(root, _params(voc_tar, sbd_tgz), progress=False)
    downloads = tmp_path / "data" / "downloads"  # the default cache_dir: root.parent / downloads
    assert (downloads / A.VOC_TARBALL).read_bytes() == voc_tar.read_bytes()
    assert (downloads / A.SBD_TARBALL).is_file()
    _check_layout(root, downloads / "VOCtrainval_11-May-2012" / "VOCdevkit" / "VOC2012" / "JPEGImages")
    assert _leftovers(root.parent) == []


def test_prepare_from_archive_tarballs_never_downloads(tmp_path, tarballs):
    voc_tar, sbd_tgz = tarballs
    archives = tmp_path / "archives"
    archives.mkdir()
    shutil.copy(voc_tar, archives)
    shutil.copy(sbd_tgz, archives)
    params = _params(voc_tar, sbd_tgz, missing_dir=tmp_path / "no-server")
    cache = tmp_path / "cache"
    prepare_voc(tmp_path / "voc", params, archives=archives, cache_dir=cache, progress=False)
    _check_layout(tmp_path / "voc")
    assert sorted(p.name for p in cache.iterdir()) == ["VOCtrainval_11-May-2012", "benchmark"]


def test_prepare_from_existing_tree_with_aug_labels(tmp_path):
    archives = tmp_path / "archives"
    voc = A.build_voc_tree(archives)
    A.build_aug_tree(archives)
    params = A.download_params()  # every URL points to a missing file
    cache = tmp_path / "cache"
    prepare_voc(tmp_path / "voc", params, archives=archives, cache_dir=cache, progress=False)
    _check_layout(tmp_path / "voc", voc / "JPEGImages")
    assert not cache.exists()


def test_prepare_from_existing_trees_with_sbd(tmp_path):
    archives = tmp_path / "archives"
    A.build_voc_tree(archives)
    A.build_sbd_tree(archives)
    prepare_voc(tmp_path / "voc", A.download_params(), archives=archives, cache_dir=tmp_path / "cache",
                progress=False)
    _check_layout(tmp_path / "voc")


def test_read_sbd_mat(tmp_path):
    dataset = A.build_sbd_tree(tmp_path)
    image_id = A.SBD_TRAIN[0]
    label = read_sbd_mat(dataset / "cls" / f"{image_id}.mat")
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, A.sbd_label(image_id))
    bad = tmp_path / "bad.mat"
    scipy.io.savemat(bad, {"other": np.zeros((3, 3))})
    with pytest.raises(DatasetError, match=f"{re.escape(str(bad))}: not an SBD class label file"):
        read_sbd_mat(bad)
    scipy.io.savemat(bad, {"GTcls": {"Segmentation": np.full((3, 3), 40, np.uint8)}})
    with pytest.raises(DatasetError, match=r"label values \[40\] outside"):
        read_sbd_mat(bad)


def test_bad_checksum_leaves_no_output(tmp_path, tarballs):
    voc_tar, sbd_tgz = tarballs
    params = A.download_params(voc=(A.file_url(voc_tar), "0" * 32), sbd=A.source(sbd_tgz))
    root = tmp_path / "data" / "voc"
    with pytest.raises(DatasetError) as err:
        prepare_voc(root, params, progress=False)
    message = str(err.value)
    assert A.VOC_TARBALL in message and "0" * 32 in message and A.md5_of(voc_tar) in message
    assert not root.exists()
    assert _leftovers(root.parent) == []


def test_truncated_archive_leaves_no_output(tmp_path, tarballs):
    voc_tar, sbd_tgz = tarballs
    archives = tmp_path / "archives"
    archives.mkdir()
    truncated = archives / A.VOC_TARBALL
    truncated.write_bytes(voc_tar.read_bytes()[: voc_tar.stat().st_size // 2])
    shutil.copy(sbd_tgz, archives)
    root, cache = tmp_path / "data" / "voc", tmp_path / "cache"
    missing = tmp_path / "no-server"
    # With the official checksum the truncation is caught before extraction ...
    with pytest.raises(DatasetError, match=f"{re.escape(str(truncated))}: checksum mismatch"):
        prepare_voc(root, _params(voc_tar, sbd_tgz, missing), archives=archives, cache_dir=cache, progress=False)
    # ... and with a checksum that matches the cut file, by the extraction itself.
    params = A.download_params(voc=(A.file_url(missing / A.VOC_TARBALL), A.md5_of(truncated)),
                               sbd=A.source(sbd_tgz, missing_dir=missing))
    with pytest.raises(DatasetError, match=f"{re.escape(str(truncated))}: cannot extract"):
        prepare_voc(root, params, archives=archives, cache_dir=cache, progress=False)
    assert not root.exists() and not root.parent.exists()
    assert not cache.exists() or (list(cache.iterdir()) == [] and _leftovers(cache) == [])


def test_missing_sbd_label_fails_and_keeps_previous_output(tmp_path):
    archives = tmp_path / "archives"
    A.build_voc_tree(archives)
    dataset = A.build_sbd_tree(archives)
    missing = dataset / "cls" / f"{A.SBD_TRAIN[1]}.mat"
    missing.unlink()
    root = tmp_path / "voc"
    root.mkdir()
    (root / "previous.txt").write_text("kept")
    with pytest.raises(DatasetError, match=f"{re.escape(str(missing))}: SBD label file not found"):
        prepare_voc(root, A.download_params(), archives=archives, cache_dir=tmp_path / "cache", progress=False)
    assert [p.name for p in root.iterdir()] == ["previous.txt"]
    assert _leftovers(tmp_path) == []


def test_label_size_mismatch_is_reported(tmp_path):
    archives = tmp_path / "archives"
    voc = A.build_voc_tree(archives)
    A.build_aug_tree(archives)
    image_id = A.VOC_VAL[1]
    Image.fromarray(np.zeros((5, 5), np.uint8), mode="P").save(voc / "SegmentationClass" / f"{image_id}.png")
    with pytest.raises(DatasetError, match=f"{image_id}: label shape \\(5, 5\\) does not match"):
        prepare_voc(tmp_path / "voc", A.download_params(), archives=archives, progress=False)
    assert not (tmp_path / "voc").exists()


def test_rerun_replaces_previous_output(tmp_path):
    archives = tmp_path / "archives"
    A.build_voc_tree(archives)
    A.build_aug_tree(archives)
    root = tmp_path / "voc"
    root.mkdir()
    (root / "stale.txt").write_text("old")
    prepare_voc(root, A.download_params(), archives=archives, progress=False)
    assert not (root / "stale.txt").exists()
    _check_layout(root)
