"""Reading the region maps of `ssr superpixels` (data/{ds}/superpixels.h5; its layout is in ssr/superpixels.py)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from ssr.data.layout import DatasetError


def region_key(image_id: str) -> str:
    """HDF5 name for an image id: '/' would make a group path, so escape it (and '%')."""
    if not image_id or image_id == ".":
        raise ValueError(f"invalid image id {image_id!r}")
    return image_id.replace("%", "%25").replace("/", "%2F")


def image_id_of(key: str) -> str:
    """The image id an HDF5 name stands for (the inverse of `region_key`)."""
    return key.replace("%2F", "/").replace("%25", "%")


class RegionMaps:
    """Read-only access to a superpixels HDF5 file, kept open between lookups.

    Safe to hand to DataLoader workers: the file is reopened after pickling or
    in a forked child, since an HDF5 handle must not cross processes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None
        self._pid = None
        self._open()

    def _open(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            if not self.path.is_file():
                raise DatasetError(f"{self.path}: superpixels file not found "
                                   f"(run `ssr superpixels --dataset {self.path.parent.name}` first)")
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as err:
                raise DatasetError(f"{self.path}: not a readable HDF5 file ({err})") from err
            self._pid = os.getpid()
        return self._file

    @property
    def params(self) -> dict:
        """The file attributes: n_segments, compactness, n_clusters, seed, method, backend (older files: backend_version)."""
        return {k: (v.decode() if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v)
                for k, v in self._open().attrs.items()}

    def ids(self) -> list[str]:
        return [image_id_of(k) for k in self._open().keys()]

    def __len__(self) -> int:
        return len(self._open())

    def __contains__(self, image_id: str) -> bool:
        return region_key(image_id) in self._open()

    def __getitem__(self, image_id: str) -> np.ndarray:
        """(H, W) uint8 region map of one image."""
        file = self._open()
        key = region_key(image_id)
        if key not in file:
            raise KeyError(f"{self.path}: no region map for image id {image_id!r} (computed for other images: "
                           f"run `ssr superpixels --dataset {self.path.parent.name}` again)")
        return file[key][()]

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __enter__(self) -> RegionMaps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._file = None
        self._pid = None
