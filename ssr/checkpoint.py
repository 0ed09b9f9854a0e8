"""Trained SSR models on disk: safetensors weights beside a JSON of their architecture and config.

    {run_dir}/model.safetensors   the SSR module's state dict (heads, tau, prototype bank, decoder)
    {run_dir}/model.json          format, ModelDims, the CMPA params, the dataset params and
                                  classes (enough to rebuild the frozen backbones), the training
                                  identity (`ssr.config.training_identity`), seed, run, summary

`read_model` rebuilds the trainable model from these two files alone; `load_model` also
rebuilds the frozen backbones, for inference from a user script. Nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ssr.config import CmpaParams, ConfigError, DatasetParams, InferParams, Params, identity_differences, training_identity
from ssr.data.layout import DatasetError, atomic_path, read_json, write_json
from ssr.model import SSR, FrozenBackbones, ModelDims, build_backbones

FORMAT = "ssr-model/1"
WEIGHTS, CONFIG = "model.safetensors", "model.json"


def save_model(run_dir: str | Path, model: SSR, params: Params, dataset: str, *, classes: list[str], seed: int, run: str,
               summary: dict) -> None:
    """Write run_dir/model.safetensors and run_dir/model.json (each atomically, the JSON last)."""
    run_dir = Path(run_dir)
    config = {
        "format": FORMAT,
        "dataset": dataset,
        "run": run,
        "seed": seed,
        "classes": list(classes),
        "dims": dataclasses.asdict(model.dims),
        "cmpa": params.cmpa.model_dump(),
        "dataset_params": params.dataset(dataset).model_dump(),
        "infer": params.infer.model_dump(),
        "identity": training_identity(params, dataset),
        "summary": summary,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # A failure between the two writes must not leave an older model.json describing new weights.
    (run_dir / CONFIG).unlink(missing_ok=True)
    with atomic_path(run_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    write_json(run_dir / CONFIG, config)


class DeviceError(ValueError):
    """A device that does not exist here (cuda without a GPU) or is not a torch device at all."""


def resolve_device(device=None) -> torch.device:
    """A torch device that exists on this machine: None picks cuda when a GPU is there, else cpu.

    "cuda" (or "cuda:N") without a usable GPU, and names torch does not know ("gpu"), are a
    `DeviceError` saying so, before anything is loaded onto them.
    """
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError) as err:
        hint = " (for a GPU: cuda)" if str(device).lower().startswith("gpu") else ""
        raise DeviceError(f"device {device!r} is not a torch device{hint}; use cpu, cuda or cuda:N") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r}: no CUDA GPU is usable here (torch {torch.__version__} finds none); "
                              f"use cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"numbered from 0")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(device)!r}: no Apple GPU (MPS) is usable here; use cpu")
    return resolved


def _missing(path: Path) -> str:
    """What to say about a run folder that does not exist: the nearest folder that does, and the runs in it."""
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    runs = sorted((p.name for p in parent.iterdir() if p.is_dir()), key=lambda n: (len(n), n)) if parent.is_dir() else []
    seeds = [n for n in runs if n.startswith("seed")]
    shown = seeds or runs
    holds = f"{parent} holds {', '.join(shown)}" if shown else f"{parent} holds no run folders"
    hint = ""
    if path.name[4:].isdigit() and path.name.startswith("seed") and len(path.parents) > 2 \
            and path.parents[1].name in ("demo", "voc", "coco"):
        hint = f"; `ssr train --dataset {path.parents[1].name} --seeds {path.name[4:]}` trains it"
    return f"{path}: no such run folder ({holds}{hint})"


def model_files(path: str | Path) -> tuple[Path, Path]:
    """A run folder, or either of its two files -> (weights, config); FileNotFoundError naming a folder that is not there."""
    path = Path(path)
    if path.is_dir():
        return path / WEIGHTS, path / CONFIG
    if path.name in (WEIGHTS, CONFIG) and path.parent.is_dir():
        return path.parent / WEIGHTS, path.parent / CONFIG
    raise FileNotFoundError(_missing(path.parent if path.name in (WEIGHTS, CONFIG) else path))


def read_config(path: str | Path) -> dict:
    """The model.json of a saved model; DatasetError if it is missing or not an ssr model."""
    _, config_path = model_files(path)
    if not config_path.is_file():
        # results/{ds}/{run}/seed{S}/model.json names its dataset
        dataset = config_path.parents[2].name if config_path.parent.name.startswith("seed") else "DATASET"
        raise FileNotFoundError(f"{config_path}: trained model not found (run `ssr train --dataset {dataset}` first)")
    config = read_json(config_path)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise DatasetError(f"{config_path}: not an ssr model description (format {found!r}, {FORMAT!r} expected); "
                           f"retrain with this version of ssr (`ssr train`)")
    missing = [key for key in ("dims", "cmpa", "classes", "dataset_params", "infer", "identity") if key not in config]
    if missing:
        raise DatasetError(f"{config_path}: incomplete model description, no {', '.join(missing)}; retrain (`ssr train`)")
    return config


def check_identity(config: dict, params: Params, dataset: str, where: str | Path) -> None:
    """ConfigError naming every setting in which `params` differ from those the model was trained with."""
    differences = identity_differences(config["identity"], training_identity(params, dataset))
    if differences:
        raise ConfigError(f"{where}: trained under other params than the current ones: {'; '.join(differences)}. "
                          f"Retrain (the DAG does so when params change) or restore the params it was trained with")


def read_model(path: str | Path, device="cpu") -> tuple[SSR, dict]:
    """Rebuild the trainable SSR model from model.json and load model.safetensors into it -> (model in eval mode, config)."""
    device = resolve_device(device)
    weights_path, config_path = model_files(path)
    config = read_config(path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: weights missing beside {config_path}")
    model = SSR(ModelDims(**config["dims"]), CmpaParams(**config["cmpa"]))
    try:
        state = load_file(str(weights_path), device=str(device))
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise DatasetError(f"{weights_path}: not a readable safetensors file ({err})") from err
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if non_finite:
        more = f" and {len(non_finite) - 3} more tensors" if len(non_finite) > 3 else ""
        raise DatasetError(f"{weights_path}: NaN or inf in {', '.join(non_finite[:3])}{more}; the run diverged or the file "
                           f"is damaged: retrain")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        reason = " ".join(str(err).split())
        raise DatasetError(f"{weights_path}: weights do not fit the architecture in {config_path} ({reason})") from err
    return model.to(device).eval(), config


@dataclass
class TrainedModel:
    """Everything inference needs: the frozen backbones, the trained model and its config."""
    backbones: FrozenBackbones
    model: SSR
    config: dict

    @property
    def classes(self) -> list[str]:
        return self.config["classes"]

    @property
    def infer(self) -> InferParams:
        return InferParams(**self.config["infer"])


def load_model(path: str | Path, *, device="cpu", demo_clip_dir: str | Path | None = None,
               demo_dino_dir: str | Path | None = None, weights_root: str | Path | None = None) -> TrainedModel:
    """A saved model ready for `ssr.predict`, rebuilt from its folder alone.

    The frozen CLIP (and DINO) are those recorded in model.json. With `weights_root` they come
    from the weights cache `ssr weights` fills, as in the DAG's stages, and nothing touches the
    network (a missing folder is a `WeightsMissing` naming the command); without it, through
    their libraries' loaders, which download what their own caches lack. The demo's committed
    tiny models default to the copies installed with ssr.
    """
    from ssr.backbones import demo_asset_dir
    from ssr.weights import cached_models

    device = resolve_device(device)
    model, config = read_model(path, device)
    ds = DatasetParams(**config["dataset_params"])
    cached = cached_models(ds, weights_root, config["dataset"], device) if weights_root is not None else {}
    backbones = build_backbones(ds, config["classes"][1:], device=device,
                                demo_clip_dir=demo_clip_dir or demo_asset_dir("demo_clip"),
                                demo_dino_dir=demo_dino_dir or demo_asset_dir("demo_dino"), **cached)
    if ModelDims.of(backbones) != model.dims:
        raise DatasetError(f"{model_files(path)[1]}: recorded dims {model.dims} do not match the backbones "
                           f"{ModelDims.of(backbones)}")
    return TrainedModel(backbones, model, config)

