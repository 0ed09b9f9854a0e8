"""Pretrained CLIP and DINO weights in a per-site cache, fetched before the jobs that read them.

The compute nodes of a cluster often have no internet. `ssr weights --dataset {ds}` (the DAG's
`weights-{ds}` stage, a local job that Snakemake runs on the submitting host, the login node)
downloads the dataset's CLIP (open_clip name and pretrained tag, `datasets.{ds}.clip_model` and
`clip_pretrained`) and DINO (timm name, `dino_model`) through the libraries' own loaders, and
stores each as a folder that the libraries' local loaders read back:

    {weights_root}/
        open_clip/{model}/{tag}/   open_clip_config.json, open_clip_model.safetensors  (open_clip `local-dir:`)
        timm/{model}/              config.json, model.safetensors                        (timm `local-dir:`)
        downloads/                 the libraries' download caches while fetching; removed once a folder is written
        {ds}.json                  the manifest: each model's folder and the SHA-256 of its files

A folder holds the model as its library built it (open_clip with the tag's QuickGELU and
preprocessing, timm with the checkpoint already converted), so loading it needs no network and
no knowledge of where it came from. `ssr train`, `ssr pseudo-labels` and `ssr evaluate` load
the folders only (`cached_models`), and a missing one stops them with the command that
fetches it. Left alone: the demo's committed CLIP, a CLIP checkpoint file given as
`clip_pretrained`, and a DINO file given as `dino_weights`; the manifest records them too.
`weights_root` is a per-site path (params.local.yaml, SSR_WEIGHTS_ROOT; ssr/site.py): point
it at storage that the login and compute nodes share.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ssr.data.download import atomic_dir, md5_file
from ssr.data.layout import atomic_path

if TYPE_CHECKING:
    from ssr.config import DatasetParams, Params

logger = logging.getLogger(__name__)

CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
DINO_FILES = ("config.json", "model.safetensors")
# The demo's committed backbones (params sections) and the files their folders hold, config first.
DEMO_FILES = {"demo_clip": CLIP_FILES, "demo_dino": DINO_FILES}
DOWNLOADS = "downloads"


class WeightsMissing(FileNotFoundError):
    """A model's folder is not in the weights cache; the message names the command that fetches it."""


class WeightsDownloadError(RuntimeError):
    """A library could not download a model (no network, unknown name, a failed transfer)."""


def clip_dir(root: str | os.PathLike, model: str, tag: str) -> Path:
    """The cache folder of an open_clip model and pretrained tag."""
    return Path(root) / "open_clip" / model / tag


def dino_dir(root: str | os.PathLike, model: str) -> Path:
    """The cache folder of a timm model (name with its pretrained tag, e.g. vit_small_patch16_224.dino)."""
    return Path(root) / "timm" / model


def manifest_path(root: str | os.PathLike, dataset: str) -> Path:
    """What the weights stage writes for a dataset, and the DAG's handle on it."""
    return Path(root) / f"{dataset}.json"


def is_clip_tag(model: str, tag: str) -> bool:
    """True when open_clip knows `tag` as a pretrained tag of `model` (else `tag` is a checkpoint file)."""
    import open_clip

    return model != "demo" and bool(tag) and bool(open_clip.get_pretrained_cfg(model, tag))


def _complete(folder: Path, files: tuple[str, ...]) -> bool:
    return all((folder / name).is_file() for name in files)


def _require(root: str | os.PathLike, folder: Path, files: tuple[str, ...], what: str, dataset: str) -> Path:
    """`folder` if it holds `files`, else WeightsMissing naming the first missing file and the fetching command."""
    for name in files:
        if not (folder / name).is_file():
            raise WeightsMissing(
                f"{folder / name}: not found: {what} is not in the weights cache (weights_root {root}). Fetch it with "
                f"`ssr weights --dataset {dataset}` on a machine with internet (on a cluster, the login node: Snakemake "
                f"runs the rule weights-{dataset} there), or set weights_root (params.local.yaml or SSR_WEIGHTS_ROOT) "
                f"to the shared cache that holds it")
    return folder


# ---------------------------------------------------------------- loading (no network)

def cached_models(ds: DatasetParams, root: str | os.PathLike, dataset: str, device="cpu") -> dict:
    """The dataset's CLIP (and tokenizer) and DINO from the cache, as `ssr.model.build_backbones` takes them.

    Only the models the cache serves: {} for the demo's committed CLIP and for checkpoint files
    given in the params (build_backbones loads those itself). WeightsMissing names the command
    that fetches a missing one.
    """
    from ssr.backbones import load_clip, load_dino

    out = {}
    if is_clip_tag(ds.clip_model, ds.clip_pretrained):
        folder = _require(root, clip_dir(root, ds.clip_model, ds.clip_pretrained), CLIP_FILES,
                          f"CLIP {ds.clip_model} ({ds.clip_pretrained})", dataset)
        out["clip"], out["tokenizer"] = load_clip(ds.clip_model, ds.clip_pretrained, cache_dir=folder, device=device)
    if ds.dino_model and ds.dino_model != "demo" and not ds.dino_weights:
        folder = _require(root, dino_dir(root, ds.dino_model), DINO_FILES, f"DINO {ds.dino_model}", dataset)
        out["dino"] = load_dino(ds.dino_model, cache_dir=folder, device=device)
    return out


# ---------------------------------------------------------------- fetching (the weights stage)

def fetch_clip(root: str | os.PathLike, model: str, tag: str) -> Path:
    """The cache folder of an open_clip model and tag, downloaded and written first if it is not complete.

    open_clip downloads the tag's checkpoint into {root}/downloads and builds the model as the tag
    asks (QuickGELU, preprocessing); the folder then holds that model's state dict and config.
    """
    import open_clip

    folder = clip_dir(root, model, tag)
    if _complete(folder, CLIP_FILES):
        logger.info("CLIP %s (%s): in the cache, %s", model, tag, folder)
        return folder
    tag_cfg = open_clip.get_pretrained_cfg(model, tag)
    if not tag_cfg:
        raise WeightsDownloadError(f"CLIP {model} ({tag}): open_clip knows no such model and pretrained tag "
                                   f"(open_clip.list_pretrained() lists them)")
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    logger.info("CLIP %s (%s): downloading through open_clip into %s", model, tag, Path(root) / DOWNLOADS)
    try:
        clip = open_clip.create_model(model, pretrained=tag, force_quick_gelu=quick_gelu,
                                      cache_dir=str(Path(root) / DOWNLOADS))
    except Exception as err:  # open_clip wraps every download failure in a RuntimeError
        raise WeightsDownloadError(_download_failed(f"CLIP {model} ({tag})", err, folder)) from err
    write_clip_folder(folder, clip, {**open_clip.get_model_config(model), **({"quick_gelu": True} if quick_gelu else {})},
                      {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg})
    return folder


def write_clip_folder(folder: Path, clip, model_cfg: dict, preprocess_cfg: dict) -> None:
    """An open_clip `local-dir:` folder holding `clip`, written atomically: its weights, and the
    open_clip_config.json (model and preprocessing config) that open_clip's hub uploads carry."""
    from safetensors.torch import save_file

    with atomic_dir(folder) as tmp:
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp / CLIP_FILES[1]))
        config = {"model_cfg": model_cfg, "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v
                                                             for k, v in preprocess_cfg.items()}}
        (tmp / CLIP_FILES[0]).write_text(json.dumps(config, indent=2) + "\n")


def fetch_dino(root: str | os.PathLike, model: str) -> Path:
    """The cache folder of a timm model, downloaded and written first if it is not complete.

    timm downloads the checkpoint into {root}/downloads and converts it into its model (no
    classifier); timm's own `save_for_hf` writes that model's weights and config.
    """
    import timm

    folder = dino_dir(root, model)
    if _complete(folder, DINO_FILES):
        logger.info("DINO %s: in the cache, %s", model, folder)
        return folder
    logger.info("DINO %s: downloading through timm into %s", model, Path(root) / DOWNLOADS)
    try:
        dino = timm.create_model(model, pretrained=True, num_classes=0, cache_dir=Path(root) / DOWNLOADS)
    except Exception as err:  # timm passes on the hub's and urllib's own errors
        raise WeightsDownloadError(_download_failed(f"DINO {model}", err, folder)) from err
    write_dino_folder(folder, dino)
    return folder


def write_dino_folder(folder: Path, dino) -> None:
    """A timm `local-dir:` folder holding `dino` (timm's config.json and model.safetensors), written atomically."""
    from timm.models import save_for_hf

    with atomic_dir(folder) as tmp:
        save_for_hf(dino, tmp, safe_serialization=True)


def _download_failed(what: str, err: Exception, folder: Path) -> str:
    reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    reason = reason if len(reason) <= 300 else reason[:300].rsplit(" ", 1)[0] + " ..."
    return (f"{what}: download failed ({type(err).__name__}: {reason}). `ssr weights` needs the network: run it "
            f"where there is internet (a cluster's login node), or copy a cache that holds {folder} from such a machine")


def fetch(params: Params, dataset: str, demo_clip_dir: str | os.PathLike, demo_dino_dir: str | os.PathLike) -> dict:
    """Fetch what `dataset` needs into weights_root and write its manifest; returns the manifest.

    `demo_clip_dir`, `demo_dino_dir`: the folders the demo's CLIP and DINO are read from (`ssr.cli.demo_dir`).

    The manifest is rewritten only when its content changes, so that a rerun leaves the DAG's
    downstream stages up to date. Paths in it are relative (to weights_root for cached folders),
    so that it reads the same on every site.
    """
    root = Path(params.weights_root)
    ds = params.dataset(dataset)
    entries: dict = {}
    if ds.clip_model == "demo":
        entries["clip"] = {"model": "demo", "source": "committed", "folder": str(Path(params.demo_clip.checkpoint).parent),
                           "sha256": _digests(Path(demo_clip_dir), CLIP_FILES)}
    elif is_clip_tag(ds.clip_model, ds.clip_pretrained):
        folder = fetch_clip(root, ds.clip_model, ds.clip_pretrained)
        entries["clip"] = {"model": ds.clip_model, "pretrained": ds.clip_pretrained, "source": "cache",
                           "folder": folder.relative_to(root).as_posix(), "sha256": _digests(folder, CLIP_FILES)}
    else:
        entries["clip"] = _file_entry(ds.clip_model, ds.clip_pretrained,
                                      f"datasets.{dataset}.clip_pretrained, neither a pretrained tag open_clip knows "
                                      f"for {ds.clip_model} nor an existing checkpoint file")
    if not ds.dino_model:
        entries["dino"] = None
    elif ds.dino_weights:
        entries["dino"] = _file_entry(ds.dino_model, ds.dino_weights,
                                      f"datasets.{dataset}.dino_weights names a weights file for {ds.dino_model}")
    elif ds.dino_model == "demo":
        entries["dino"] = {"model": "demo", "source": "committed", "folder": str(Path(params.demo_dino.checkpoint).parent),
                           "sha256": _digests(Path(demo_dino_dir), DINO_FILES)}
    else:
        folder = fetch_dino(root, ds.dino_model)
        entries["dino"] = {"model": ds.dino_model, "source": "cache", "folder": folder.relative_to(root).as_posix(),
                           "sha256": _digests(folder, DINO_FILES)}
    shutil.rmtree(root / DOWNLOADS, ignore_errors=True)  # every folder is written: the downloads have served
    manifest = {"dataset": dataset, **entries}
    path = manifest_path(root, dataset)
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    if not path.is_file() or path.read_text() != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return manifest


def _file_entry(model: str, file: str, why: str) -> dict:
    path = Path(file)
    if not path.is_file():
        raise WeightsMissing(f"{file}: not found ({why})")
    return {"model": model, "source": "file", "file": file, "sha256": {path.name: _sha256(path)}}


def _digests(folder: Path, files: tuple[str, ...]) -> dict:
    return {name: _sha256(folder / name) for name in files}


def _sha256(path: Path) -> str:
    return md5_file(path, algorithm="sha256")
