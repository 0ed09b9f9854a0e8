"""The weights cache: `ssr weights` fetches CLIP and DINO through open_clip and timm before the
jobs, which then load them from weights_root with the network off.

Tiny configs of the real classes (open_clip's CLIP, timm's VisionTransformer) stand in for
ViT-B/16 and DINO ViT-S/16. Nothing here reaches the network: the loading tests block every
socket, and the download test serves the libraries a local Hugging Face cache in offline mode.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
import yaml
from conftest import tiny_clip_config
from safetensors.torch import save_file

from ssr.backbones import load_clip
from ssr.cli import main as ssr_main
from ssr.config import load_params
from ssr.weights import (
    WeightsMissing,
    cached_models,
    clip_dir,
    dino_dir,
    manifest_path,
    write_clip_folder,
    write_dino_folder,
)

REPO = Path(__file__).resolve().parents[1]
TINY_DINO = {"embed_dim": 32, "depth": 2, "num_heads": 2}
OPENAI = {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection fails, as on a compute node without internet."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _params(tmp_path: Path, **datasets_voc) -> tuple[Path, object]:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw.update(data_root=str(tmp_path / "data"), results_root=str(tmp_path / "results"), weights_root=str(tmp_path / "w"))
    raw["datasets"]["voc"].update(datasets_voc)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, load_params(path)


def _tiny_clip() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    cfg = {**tiny_clip_config(), "quick_gelu": True}
    return open_clip.CLIP(**cfg), cfg


def _tiny_dino() -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY_DINO)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_clip_and_dino_load_from_the_cache_with_the_network_off(tmp_path, no_network):
    path, params = _params(tmp_path)
    ds = params.dataset("voc")
    clip, cfg = _tiny_clip()
    dino = _tiny_dino()
    write_clip_folder(clip_dir(params.weights_root, ds.clip_model, ds.clip_pretrained), clip, cfg, OPENAI)
    write_dino_folder(dino_dir(params.weights_root, ds.dino_model), dino)

    models = cached_models(ds, params.weights_root, "voc")
    assert _same_weights(models["clip"], clip) and _same_weights(models["dino"], dino)
    # open_clip rebuilt the model the folder describes: QuickGELU, frozen; the tokenizer is open_clip's own
    assert isinstance(models["clip"].visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert not any(p.requires_grad for p in models["clip"].parameters())
    assert models["tokenizer"](["a photo"]).shape == (1, cfg["text_cfg"]["context_length"])
    # DINO accepts any size (the crops are 320 px, not 224) and has no classifier
    assert models["dino"](torch.zeros(1, 3, 64, 48)).shape == (1, TINY_DINO["embed_dim"])


def test_an_empty_cache_names_the_command_that_fills_it(tmp_path, no_network, capsys):
    path, params = _params(tmp_path)
    with pytest.raises(WeightsMissing, match=r"open_clip/ViT-B-16/openai/open_clip_config.json: not found: CLIP ViT-B-16 "
                                             r"\(openai\) is not in the weights cache .*`ssr weights --dataset voc`"):
        cached_models(params.dataset("voc"), params.weights_root, "voc")
    # the same through the command line: train stops before anything else, naming the command
    (tmp_path / "data" / "voc").mkdir(parents=True)
    (tmp_path / "data" / "voc" / "classes.json").write_text(json.dumps(["background", "aeroplane"]))
    assert ssr_main(["train", "--dataset", "voc", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert "ssr train: error: " in err and "`ssr weights --dataset voc`" in err
    assert not (tmp_path / "results" / "voc").exists()


def test_files_named_in_the_params_bypass_the_cache_and_the_manifest_records_them(tmp_path, no_network):
    clip, cfg = _tiny_clip()
    dino = _tiny_dino()
    dino_file = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, str(dino_file))
    path, params = _params(tmp_path, dino_weights=str(dino_file))
    write_clip_folder(clip_dir(params.weights_root, "ViT-B-16", "openai"), clip, cfg, OPENAI)
    assert set(cached_models(params.dataset("voc"), params.weights_root, "voc")) == {"clip", "tokenizer"}

    assert ssr_main(["weights", "--dataset", "voc", "--params", str(path)]) == 0
    manifest_file = manifest_path(params.weights_root, "voc")
    manifest = json.loads(manifest_file.read_text())
    assert manifest["clip"]["source"] == "cache" and manifest["clip"]["folder"] == "open_clip/ViT-B-16/openai"
    assert manifest["dino"]["source"] == "file" and manifest["dino"]["file"] == str(dino_file)
    assert len(manifest["clip"]["sha256"]["open_clip_model.safetensors"]) == 64
    # a rerun with nothing changed leaves the manifest untouched: the DAG's later stages stay up to date
    mtime = manifest_file.stat().st_mtime_ns
    assert ssr_main(["weights", "--dataset", "voc", "--params", str(path)]) == 0
    assert manifest_file.stat().st_mtime_ns == mtime


def test_the_demo_uses_its_committed_clip(tmp_path):
    path, params = _params(tmp_path)
    assert cached_models(params.dataset("demo"), params.weights_root, "demo") == {}
    assert ssr_main(["weights", "--dataset", "demo", "--params", str(path)]) == 0
    manifest = json.loads(manifest_path(params.weights_root, "demo").read_text())
    assert manifest["clip"] == {"model": "demo", "source": "committed", "folder": "ssr/assets/demo_clip",
                                "sha256": manifest["clip"]["sha256"]}
    assert manifest["dino"] is None and not (Path(params.weights_root) / "open_clip").exists()


# The weights stage in a process of its own, as the DAG runs it: open_clip learns a tiny config
# and a pretrained tag pointing at a Hugging Face repository, like ViT-B-16's "openai"
# (timm/vit_base_patch16_clip_224.openai), sockets refuse to connect, and the hub library is offline,
# so the libraries' downloads can only be served by the local cache the test prepared.
LAUNCH = """
import json, socket, sys
import open_clip
from open_clip.pretrained import _PRETRAINED, _pcfg

def refuse(*args, **kwargs):
    raise OSError("network disabled in this test")

socket.socket.connect = refuse
socket.create_connection = refuse
open_clip.add_model_config(sys.argv[1])
_PRETRAINED["tiny-clip-test"] = {"tiny": _pcfg(hf_hub="ssr-test/tiny-clip/", quick_gelu=True)}
from ssr.cli import main
sys.exit(main(sys.argv[2:]))
"""
DINO = "vit_tiny_patch16_224.augreg_in21k"  # a real timm tag with a hub repository, small enough for a test
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _hub_file(cache: Path, repo: str, filename: str, tensors: dict) -> None:
    """One file in the Hugging Face cache layout that huggingface_hub serves offline."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(REVISION)
    (folder / "snapshots" / REVISION).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "snapshots" / REVISION / filename))


def _weights_stage(tmp_path: Path, path: Path) -> subprocess.CompletedProcess:
    configs = tmp_path / "configs"
    configs.mkdir(exist_ok=True)
    (configs / "tiny-clip-test.json").write_text(json.dumps(tiny_clip_config()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", LAUNCH, str(configs), "weights", "--dataset", "voc", "--params", str(path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def test_the_weights_stage_fetches_through_the_libraries_and_writes_loadable_folders(tmp_path, no_network):
    path, params = _params(tmp_path, clip_model="tiny-clip-test", clip_pretrained="tiny", dino_model=DINO)
    downloads = Path(params.weights_root) / "downloads"
    torch.manual_seed(0)
    hub_clip = open_clip.CLIP(**tiny_clip_config())   # the checkpoint, as trained: the tag adds QuickGELU
    _hub_file(downloads, "ssr-test/tiny-clip", "open_clip_model.safetensors", hub_clip.state_dict())
    torch.manual_seed(1)
    hub_dino = timm.create_model(DINO.split(".")[0], pretrained=False)  # with its 21k-class head, as published
    _hub_file(downloads, f"timm/{DINO}", "model.safetensors", hub_dino.state_dict())

    proc = _weights_stage(tmp_path, path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not downloads.exists()  # the folders are written: the download caches are gone
    manifest = json.loads(manifest_path(params.weights_root, "voc").read_text())
    assert manifest["clip"]["folder"] == "open_clip/tiny-clip-test/tiny" and manifest["dino"]["folder"] == f"timm/{DINO}"
    config = json.loads((clip_dir(params.weights_root, "tiny-clip-test", "tiny") / "open_clip_config.json").read_text())
    assert config["model_cfg"]["quick_gelu"] is True and config["model_cfg"]["embed_dim"] == 16

    # the folders load offline through the jobs' loaders (no registered config needed), with the published
    # weights; this process does not know the test's tag, so the CLIP folder is named here, not looked up
    clip, _ = load_clip("tiny-clip-test", "tiny", cache_dir=clip_dir(params.weights_root, "tiny-clip-test", "tiny"))
    assert _same_weights(clip, hub_clip)
    assert isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    dino = cached_models(params.dataset("voc"), params.weights_root, "voc")["dino"]
    published = {k: v for k, v in hub_dino.state_dict().items() if not k.startswith("head.")}  # num_classes=0
    assert dino.state_dict().keys() == published.keys()
    assert all(torch.equal(dino.state_dict()[k], published[k]) for k in published)


def test_the_weights_stage_without_network_fails_clearly_and_leaves_no_folder(tmp_path):
    path, params = _params(tmp_path, clip_model="tiny-clip-test", clip_pretrained="tiny")
    proc = _weights_stage(tmp_path, path)
    assert proc.returncode == 1
    assert "ssr weights: error: CLIP tiny-clip-test (tiny): download failed" in proc.stderr
    assert "`ssr weights` needs the network" in proc.stderr
    assert not clip_dir(params.weights_root, "tiny-clip-test", "tiny").exists()
    assert not manifest_path(params.weights_root, "voc").exists()


def test_a_saved_model_loads_its_backbones_from_the_cache_with_the_network_off(tmp_path, trained_demo, tiny_clip_dir,
                                                                                 no_network, capsys):
    """`ssr predict` / `evaluate --model` / `export` on a compute node: a run recorded with a CLIP tag
    (here the tiny CLIP, filed in the cache as ViT-B-16 `openai`) loads it from the params'
    weights_root, not through open_clip's download, and segments as the same model from its
    own folder; an empty cache is named with the command that fills it."""
    import shutil

    import ssr
    from ssr.data.layout import DatasetLayout, read_image, write_image

    _, demo = trained_demo
    run = tmp_path / "run"
    shutil.copytree(Path(demo.results_root) / "demo" / "method" / "seed0", run)
    config = json.loads((run / "model.json").read_text())
    config["dataset_params"].update(clip_model="ViT-B-16", clip_pretrained="openai")
    (run / "model.json").write_text(json.dumps(config))
    path, params = _params(tmp_path)
    image = read_image(DatasetLayout(demo.dataset_root("demo")).image_path("val_00000"))
    write_image(tmp_path / "photo.png", image)

    assert ssr_main(["predict", str(tmp_path / "photo.png"), "--model", str(run), "--out", str(tmp_path / "out"),
                     "--params", str(path), "--quiet"]) == 2
    assert "`ssr weights --dataset demo`" in capsys.readouterr().err

    clip = load_clip("demo", demo_dir=tiny_clip_dir)[0]
    write_clip_folder(clip_dir(params.weights_root, "ViT-B-16", "openai"), clip, tiny_clip_config(), OPENAI)
    cached = ssr.load_model(run, weights_root=params.weights_root)
    original = ssr.load_model(Path(demo.results_root) / "demo" / "method" / "seed0", demo_clip_dir=tiny_clip_dir)
    assert _same_weights(cached.backbones.clip, original.backbones.clip)
    assert np.array_equal(ssr.predict(cached, image, crf=False), ssr.predict(original, image, crf=False))
    assert ssr_main(["predict", str(tmp_path / "photo.png"), "--model", str(run), "--out", str(tmp_path / "out"),
                     "--params", str(path), "--quiet", "--no-crf"]) == 0
    assert (tmp_path / "out" / "photo.png").is_file()
