"""Shared fixtures: a tiny random-init open_clip model and timm DINO written to disk, and a
params.yaml shrunk for tests. Nothing here downloads or mocks a library."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from ssr import demo_clip, demo_dino
from ssr.config import DemoDinoParams, load_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_site_paths(monkeypatch):
    # A machine's per-site paths (ssr/site.py) must not move the tests' data and results.
    for var in ("SSR_DATA_ROOT", "SSR_RESULTS_ROOT", "SSR_WEIGHTS_ROOT", "DVC_STAGE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tests are tiny; one thread keeps them deterministic and leaves CI's other core free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_clip_config(image_size: int = 32, patch_size: int = 8) -> dict:
    """open_clip CLIP config small enough to run a forward pass in milliseconds."""
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": image_size, "layers": 3, "width": 24, "head_width": 8, "patch_size": patch_size},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """An open_clip `local-dir:` folder holding a random-init tiny CLIP for 32 px images."""
    out = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    cfg = tiny_clip_config()
    model = open_clip.CLIP(**cfg)
    demo_clip.save(out, model, cfg, {"note": "random init, for tests"})
    return out


@pytest.fixture(scope="session")
def tiny_dino_dir(tmp_path_factory) -> Path:
    """A timm folder holding a random-init tiny demo DINO on the tiny CLIP's 4x4 patch grid (32 px, patch 8)."""
    out = tmp_path_factory.mktemp("tiny_dino")
    torch.manual_seed(0)
    tiny = DemoDinoParams(width=24, depth=2, heads=2, patch_size=8, head_hidden=32, head_bottleneck=16, prototypes=64)
    demo_dino.save(out, demo_dino.build(tiny, 32).backbone, demo_dino.export_config(tiny, 32))
    return out


def tiny_params(raw: dict, clip_dir: Path, *, data_root: Path | None = None, results_root: Path | None = None,
                dino_dir: Path | None = None, **overrides) -> dict:
    """Shrink a params dict for a seconds-long demo run on the tiny CLIP, and the tiny DINO where
    `dino_dir` is given (else no DINO: the committed one's grid is not the tiny CLIP's); dotted-key
    overrides last."""
    if data_root is not None:
        raw["data_root"] = str(data_root)
    if results_root is not None:
        raw["results_root"] = str(results_root)
    raw["demo"].update(image_size=32, num_train=12, num_val=6)
    raw["demo_clip"]["checkpoint"] = str(clip_dir / "open_clip_model.safetensors")
    raw["datasets"]["demo"]["dino_model"] = "" if dino_dir is None else "demo"
    if dino_dir is not None:
        raw["demo_dino"]["checkpoint"] = str(dino_dir / "model.safetensors")
    raw["train_presets"]["demo"].update(iterations=4, batch_size=4, crop_size=32, warmup=1, refresh_every=2)
    raw["datasets"]["demo"]["long_side"] = 32
    raw["datasets"]["demo"].update(seeds=[0], variants={})   # one run; tests that need more set them
    raw["superpixels"]["workers"] = 1
    raw["train"]["num_workers"] = 0
    raw["infer"]["scales"] = [1.0]
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return raw


def write_tiny_params(directory: Path, data_root: Path, clip_dir: Path, dino_dir: Path | None = None, **overrides):
    """params.yaml in `directory` (results in directory/results) from the repo's, shrunk; -> (path, Params)."""
    raw = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()), clip_dir, data_root=data_root,
                      results_root=directory / "results", dino_dir=dino_dir, **overrides)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, load_params(path)


@pytest.fixture
def tiny_params_file(tmp_path, tiny_clip_dir):
    """make(**dotted_overrides) -> (path, Params): a shrunk params.yaml with data and results under tmp_path."""

    def make(**overrides):
        return write_tiny_params(tmp_path, tmp_path / "data", tiny_clip_dir, **overrides)

    return make


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory, tiny_clip_dir):
    """The tiny demo DAG through evaluate with two seeds, once a session: (params path, Params).

    prepare -> superpixels -> train -> evaluate under results/ of a session folder, on one
    thread as in the tests (so that re-scoring sums in the same order).
    """
    from ssr.cli import main

    base = tmp_path_factory.mktemp("trained_demo")
    path, params = write_tiny_params(base, base / "data", tiny_clip_dir, **{"datasets.demo.seeds": [0, 1]})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for stage in ("prepare", "superpixels", "train", "evaluate"):
            # DenseCRF in this process: the reference that tests with worker processes compare against
            workers = ["--workers", "0"] if stage == "evaluate" else []
            assert main([stage, "--dataset", "demo", "--params", str(path), "--quiet", *workers]) == 0, stage
    finally:
        torch.set_num_threads(threads)
    return path, params
