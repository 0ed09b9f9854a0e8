"""superpixels.h5 is the same file wherever its maps are the same.

DVC hashes the file's bytes, so anything in it besides the maps and the params (a library
version, a timestamp) makes every downstream stage look changed on another machine. The
reference run's file and one written with OpenCV 5.1 differed in one byte: the minor
version in the `backend_version` attribute ("5.0.0" against "5.1.0"), with identical maps.
"""

from __future__ import annotations

import hashlib
import time

import h5py
import numpy as np
import pytest

import ssr.superpixels as sp
from ssr.config import SuperpixelParams
from ssr.data.layout import write_image
from ssr.data.regions import RegionMaps

PARAMS = SuperpixelParams(n_segments=20, compactness=10.0, n_clusters=4, seed=0, workers=1, backend="opencv")


def _images(tmp_path, n: int) -> list[tuple[str, object]]:
    rng = np.random.default_rng(0)
    items = []
    for k in range(n):
        path = tmp_path / "images" / f"im{k}.png"
        image = np.repeat(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), 6, axis=0).repeat(6, axis=1)
        write_image(path, image)
        items.append((f"im{k}", path))
    return items


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_the_file_does_not_record_the_library_version(tmp_path, monkeypatch):
    images = _images(tmp_path, 3)
    digests = []
    for version in ("5.0.0", "5.1.0"):
        monkeypatch.setattr(sp, "backend_version", lambda backend, v=version: v)
        out = tmp_path / version / "superpixels.h5"
        sp.build_superpixels(images, out, PARAMS, progress=False)
        digests.append(_md5(out))
        with RegionMaps(out) as maps:
            assert "backend_version" not in maps.params
    assert digests[0] == digests[1]


def test_a_rerun_writes_the_same_bytes(tmp_path):
    """No modification times in the objects' headers (HDF5's own default would store them)."""
    images = _images(tmp_path, 2)
    sp.build_superpixels(images, tmp_path / "a.h5", PARAMS, progress=False)
    time.sleep(1.1)  # HDF5 times have a resolution of one second
    sp.build_superpixels(images, tmp_path / "b.h5", PARAMS, progress=False)
    assert _md5(tmp_path / "a.h5") == _md5(tmp_path / "b.h5")


def test_a_checkpoint_of_another_library_version_is_not_resumed(tmp_path, monkeypatch):
    """The checkpoint keeps the version: one file never mixes maps of two versions."""
    images = _images(tmp_path, 4)
    out = tmp_path / "superpixels.h5"
    real = sp._compute_one
    calls = []

    def compute(image_id, *args):
        if len(calls) == 2 and sp.backend_version("opencv") == "5.0.0":
            raise KeyboardInterrupt
        calls.append(image_id)
        return real(image_id, *args)

    monkeypatch.setattr(sp, "_compute_one", compute)
    monkeypatch.setattr(sp, "backend_version", lambda backend: "5.0.0")
    with pytest.raises(KeyboardInterrupt):
        sp.build_superpixels(images, out, PARAMS, progress=False)
    with h5py.File(sp.partial_path(out), "r") as f:
        assert f.attrs["backend_version"] == "5.0.0" and len(f) == 2
    calls.clear()
    monkeypatch.setattr(sp, "backend_version", lambda backend: "5.1.0")
    sp.build_superpixels(images, out, PARAMS, progress=False)
    assert calls == ["im0", "im1", "im2", "im3"]  # started over
