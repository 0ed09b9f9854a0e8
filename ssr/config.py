"""Typed, validated view of params.yaml.

Each section of params.yaml is a frozen dataclass. Bounds live next to the
field (`_f(default, lo, hi)`), so a wrong value stops the run at start with a
message naming the key (`train_presets.demo.lr: must be > 0, got -1.0`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """params.yaml has an unknown key, a wrong type or an out-of-range value."""


def _f(default=dataclasses.MISSING, lo=None, hi=None, *, lo_open=False, choices=None):
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# ssr.cam.gradcam's ways of weighting activations by gradients.
CAM_WEIGHTINGS = ("gradcam", "hirescam")
# ssr.cmpa.prototype_loss's readings of Table 4.
CMPA_LOSSES = ("cross_modal", "in_modal", "feature")


@dataclass(frozen=True)
class DemoParams:
    seed: int = _f(0, 0)
    image_size: int = _f(64, 16, 1024)
    num_train: int = _f(400, 1)
    num_val: int = _f(100, 1)
    classes: list[str] = _f(["circle", "square", "triangle", "cross"])
    min_objects: int = _f(1, 1, 8)
    max_objects: int = _f(3, 1, 8)
    min_object_size: float = _f(0.28, 0.05, 1.0)
    max_object_size: float = _f(0.45, 0.05, 1.0)
    max_overlap: float = _f(0.25, 0.0, 1.0)
    texture_contrast: float = _f(60.0, 0.0, 255.0)
    max_rotation: float = _f(0.0, 0.0, 180.0)


@dataclass(frozen=True)
class DemoClipParams:
    checkpoint: str = "ssr/assets/demo_clip/open_clip_model.safetensors"
    seed: int = _f(0, 0)
    embed_dim: int = _f(64, 8)
    vision_width: int = _f(96, 8)
    vision_layers: int = _f(3, 1)
    vision_heads: int = _f(3, 1)
    patch_size: int = _f(8, 2)
    text_width: int = _f(64, 8)
    text_layers: int = _f(2, 1)
    text_heads: int = _f(2, 1)
    context_length: int = _f(16, 4)
    steps: int = _f(5000, 1)
    batch_size: int = _f(64, 2)
    single_object_fraction: float = _f(0.5, 0.0, 1.0)
    lr: float = _f(1e-3, 0.0, lo_open=True)
    weight_decay: float = _f(0.05, 0.0)
    warmup: int = _f(300, 0)
    eval_images: int = _f(400, 8)
    threads: int = _f(2, 1)


@dataclass(frozen=True)
class DemoDinoParams:
    checkpoint: str = "ssr/assets/demo_dino/model.safetensors"
    seed: int = _f(0, 0)
    width: int = _f(128, 8)
    depth: int = _f(4, 1)
    heads: int = _f(4, 1)
    patch_size: int = _f(8, 2)
    head_hidden: int = _f(512, 8)
    head_bottleneck: int = _f(128, 8)
    prototypes: int = _f(1024, 2)
    steps: int = _f(1000, 1)
    batch_size: int = _f(64, 2)
    local_crops: int = _f(6, 0)
    local_size: int = _f(32, 8)
    global_scale_min: float = _f(0.4, 0.0, 1.0, lo_open=True)
    local_scale_min: float = _f(0.05, 0.0, 1.0, lo_open=True)
    local_scale_max: float = _f(0.4, 0.0, 1.0, lo_open=True)
    colour_jitter: float = _f(1.0, 0.0)
    blur_sigma: float = _f(0.57, 0.0, lo_open=True)
    student_temp: float = _f(0.1, 0.0, lo_open=True)
    teacher_temp: float = _f(0.04, 0.0, lo_open=True)
    teacher_temp_start: float = _f(0.04, 0.0, lo_open=True)
    teacher_temp_warmup: int = _f(0, 0)
    centre_momentum: float = _f(0.9, 0.0, 1.0)
    teacher_momentum: float = _f(0.996, 0.0, 1.0)
    lr: float = _f(5e-4, 0.0, lo_open=True)
    min_lr: float = _f(1e-6, 0.0)
    warmup: int = _f(100, 0)
    weight_decay: float = _f(0.04, 0.0)
    weight_decay_end: float = _f(0.4, 0.0)
    clip_grad: float = _f(3.0, 0.0)
    freeze_last_layer: int = _f(100, 0)
    attention_mass: float = _f(0.6, 0.0, 1.0, lo_open=True)
    eval_images: int = _f(400, 8)
    threads: int = _f(1, 1)


@dataclass(frozen=True)
class DatasetParams:
    train_split: str
    val_split: str
    preset: str
    prompt_template: str
    background_prompts: list[str]
    clip_model: str
    clip_pretrained: str
    dino_model: str
    dino_weights: str = ""
    prompt_names: list[str] = _f([])
    long_side: int = _f(512, 16)
    cam_weighting: str = _f("gradcam", choices=CAM_WEIGHTINGS)
    par: bool = False
    seed_split: str = "train"
    seeds: list[int] = _f([0])
    gpus: int = _f(1, 1)
    variants: dict[str, dict[str, object]] = field(default_factory=dict)
    overrides: dict[str, object] = field(default_factory=dict)

    def prompt_name_list(self, class_names: list[str]) -> list[str]:
        """The text each foreground class is prompted with: its synonyms, else its name."""
        if not self.prompt_names:
            return list(class_names)
        if len(self.prompt_names) != len(class_names):
            raise ConfigError(f"prompt_names: {len(self.prompt_names)} names for {len(class_names)} foreground classes")
        return list(self.prompt_names)


@dataclass(frozen=True)
class DownloadParams:
    voc_url: str
    voc_md5: str
    sbd_url: str
    sbd_md5: str
    coco_train_url: str
    coco_train_md5: str
    coco_val_url: str
    coco_val_md5: str
    coco_annotations_url: str
    coco_annotations_md5: str


@dataclass(frozen=True)
class SuperpixelParams:
    n_segments: int = _f(100, 2)
    compactness: float = _f(10.0, 0.0, lo_open=True)
    n_clusters: int = _f(8, 1)
    seed: int = _f(0, 0)
    workers: int = _f(2, 1)
    backend: str = _f("opencv", choices=("skimage", "opencv"))


@dataclass(frozen=True)
class AffinityParams:
    use_clip: bool = True
    use_dino: bool = True
    use_sgc: bool = True
    clip_weight: float = _f(0.4, 0.0)
    dino_weight: float = _f(0.6, 0.0)
    clip_blocks: int = _f(8, 1)
    sinkhorn_rounds: int = _f(3, 0)
    power: int = _f(2, 1)
    fusion: str = _f("transform_then_fuse", choices=("transform_then_fuse", "fuse_then_transform"))


@dataclass(frozen=True)
class SgcParams:
    t_hi: float = _f(0.5, 0.0, 1.0)
    rho: float = _f(0.5, 0.0, 1.0)
    patch_area: float = _f(0.5, 0.0, 1.0)
    keep_best: bool = True
    denominator: str = _f("region", choices=("region", "image"))


@dataclass(frozen=True)
class CmpaParams:
    enabled: bool = True
    head: str = _f("projection", choices=("projection", "residual"))
    proj_dim: int = _f(256, 1)
    hidden_dim: int = _f(512, 1)
    num_layers: int = _f(2, 1)
    tau_init: float = _f(0.05, 0.0, lo_open=True)
    loss: str = _f("cross_modal", choices=CMPA_LOSSES)
    text_prototype_term: bool = True
    bank_size: int = _f(4096, 1)
    warmup_per_class: int = _f(8, 1)
    kmeans_iters: int = _f(20, 1)


@dataclass(frozen=True)
class PseudoLabelParams:
    bg_power: float = _f(1.0, 0.0, lo_open=True)
    ignore_low: float = _f(0.0, 0.0, 1.0)
    ignore_high: float = _f(0.0, 0.0, 1.0)
    par_iterations: int = _f(20, 1)
    par_dilations: list[int] = _f([1, 2, 4, 8, 12, 24])
    par_w_colour: float = _f(0.3, 0.0, lo_open=True)
    par_w_position: float = _f(0.01, 0.0)
    figures: int = _f(4, 0)


@dataclass(frozen=True)
class TrainParams:
    amp_bf16: bool = True
    checkpoint_every: int = _f(500, 1)
    log_every: int = _f(10, 1)
    affinity_loss: bool = True
    num_workers: int = _f(2, 0)
    supervision: str = _f("pseudo", choices=("pseudo", "gt"))


@dataclass(frozen=True)
class PresetParams:
    batch_size: int = _f(16, 1)
    accumulation: int = _f(1, 1)
    iterations: int = _f(300, 1)
    lr: float = _f(1e-3, 0.0, lo_open=True)
    weight_decay: float = _f(0.002, 0.0)
    decoder_lr_mult: float = _f(1.0, 0.0, lo_open=True)
    warmup: int = _f(0, 0)
    gamma: float = _f(0.1, 0.0)
    affinity_weight: float = _f(0.1, 0.0)
    crop_size: int = _f(320, 16)
    scale_min: float = _f(0.5, 0.0, lo_open=True)
    scale_max: float = _f(2.0, 0.0, lo_open=True)
    refresh_every: int = _f(5000, 1)


@dataclass(frozen=True)
class InferParams:
    scales: list[float] = _f([1.0, 0.75])
    flip: bool = True
    crf: bool = True
    crf_iterations: int = _f(10, 1)
    crf_pos_xy_std: float = _f(3.0, 0.0, lo_open=True)
    crf_pos_w: float = _f(3.0, 0.0)
    crf_bi_xy_std: float = _f(64.0, 0.0, lo_open=True)
    crf_bi_rgb_std: float = _f(5.0, 0.0, lo_open=True)
    crf_bi_w: float = _f(4.0, 0.0)
    crf_reference_size: int = _f(500, 0)


@dataclass(frozen=True)
class RetrainParams:
    enabled: bool = False
    model: str = _f("deeplabv3_resnet50", choices=("deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "lraspp_mobilenet_v3_large"))
    iterations: int = _f(20000, 1)
    batch_size: int = _f(16, 1)
    lr: float = _f(0.01, 0.0, lo_open=True)
    crop_size: int = _f(512, 16)
    scale_min: float = _f(0.5, 0.0, lo_open=True)
    scale_max: float = _f(2.0, 0.0, lo_open=True)
    momentum: float = _f(0.9, 0.0, 1.0)
    weight_decay: float = _f(1e-4, 0.0)
    weights_backbone: str = ""


@dataclass(frozen=True)
class Params:
    data_root: str
    results_root: str
    demo: DemoParams
    demo_clip: DemoClipParams
    demo_dino: DemoDinoParams
    datasets: dict[str, DatasetParams]
    download: DownloadParams
    superpixels: SuperpixelParams
    affinity: AffinityParams
    sgc: SgcParams
    cmpa: CmpaParams
    pseudo_labels: PseudoLabelParams
    train: TrainParams
    train_presets: dict[str, PresetParams]
    infer: InferParams
    retrain: RetrainParams

    def dataset(self, name: str) -> DatasetParams:
        if name not in self.datasets:
            raise ConfigError(f"datasets.{name}: unknown dataset (known: {', '.join(self.datasets)})")
        return self.datasets[name]

    def preset(self, dataset: str) -> PresetParams:
        name = self.dataset(dataset).preset
        if name not in self.train_presets:
            raise ConfigError(f"datasets.{dataset}.preset: unknown preset {name!r} (known: {', '.join(self.train_presets)})")
        return self.train_presets[name]

    def dataset_root(self, name: str) -> Path:
        self.dataset(name)
        return Path(self.data_root) / name

    def for_dataset(self, dataset: str) -> Params:
        """These params with the dataset's own `overrides` applied (every stage of that dataset reads these)."""
        overrides = self.dataset(dataset).overrides
        if not overrides:
            return self
        return _validate(_build(Params, _override(dataclasses.asdict(self), overrides, f"datasets.{dataset}.overrides"), ""))

    def runs(self, dataset: str) -> list[str]:
        """The training runs of a dataset: the method, then its variants in params order."""
        return [METHOD_RUN, *self.dataset(dataset).variants]

    def for_run(self, dataset: str, run: str) -> Params:
        """These params with the overrides of one of the dataset's variants applied."""
        if run == METHOD_RUN:
            return self
        variants = self.dataset(dataset).variants
        if run not in variants:
            raise ConfigError(f"datasets.{dataset}.variants: no variant {run!r} (known: {', '.join(variants) or 'none'})")
        return _validate(_build(Params, _override(dataclasses.asdict(self), variants[run], f"datasets.{dataset}.variants.{run}"), ""))


# The run that trains the configured method; variants are named in datasets.{ds}.variants.
METHOD_RUN = "method"


def _override(raw: dict, overrides: dict, where: str) -> dict:
    """A copy of `raw` with dotted-key `overrides` set; an unknown key names `where`."""
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node, parts = raw, dotted.split(".")
        for key in parts[:-1]:
            if not isinstance(node, dict) or key not in node:
                raise ConfigError(f"{where}: {dotted}: unknown key")
            node = node[key]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"{where}: {dotted}: unknown key")
        node[parts[-1]] = value
    return raw


def training_identity(params: Params, dataset: str) -> dict:
    """Every setting that shapes a trained model, as flat dotted keys.

    A checkpoint records it; resuming or loading under params whose identity differs is an
    error naming the keys, since the weights would silently belong to another configuration.
    Run-time choices (seeds list, workers, logging, inference, retraining) are not part of it.
    """
    ds = dataclasses.asdict(params.dataset(dataset))
    for key in ("seeds", "gpus", "variants", "overrides", "long_side", "seed_split", "train_split", "val_split"):
        ds.pop(key)
    train = dataclasses.asdict(params.train)
    for key in ("checkpoint_every", "log_every", "num_workers"):
        train.pop(key)
    sections = {
        f"datasets.{dataset}": ds, f"train_presets.{params.dataset(dataset).preset}": dataclasses.asdict(params.preset(dataset)),
        "train": train, "superpixels": {k: v for k, v in dataclasses.asdict(params.superpixels).items() if k != "workers"},
        "affinity": dataclasses.asdict(params.affinity), "sgc": dataclasses.asdict(params.sgc), "cmpa": dataclasses.asdict(params.cmpa),
        "pseudo_labels": {k: v for k, v in dataclasses.asdict(params.pseudo_labels).items() if k != "figures"},
    }
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}


def identity_differences(recorded: dict, current: dict) -> list[str]:
    """'key (recorded X, now Y)' for every key whose value differs between two identities."""
    keys = sorted(set(recorded) | set(current))
    missing = object()
    return [f"{k} (recorded {recorded.get(k, 'absent')!r}, now {current.get(k, 'absent')!r})"
            for k in keys if _jsonable(recorded.get(k, missing)) != _jsonable(current.get(k, missing))]


def _jsonable(value):
    """Lists and tuples compare equal once they have been through JSON."""
    return list(map(_jsonable, value)) if isinstance(value, (list, tuple)) else value


def _check_value(key: str, value, hint, meta):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is dict:
        _, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {k: _check_value(f"{key}.{k}", v, value_hint, {}) for k, v in value.items()}
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_check_value(f"{key}[{i}]", v, item_hint, {}) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        raise ConfigError(f"{key}: must be {'>' if meta.get('lo_open') else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: must be <= {hi}, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    return value


def _build(cls, raw, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (known: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: missing")
            continue
        values[name] = _check_value(key, raw[name], hints[name], f.metadata)
    return cls(**values)


def _validate(params: Params) -> Params:
    d = params.demo
    if d.min_objects > d.max_objects:
        raise ConfigError(f"demo.min_objects: {d.min_objects} exceeds demo.max_objects {d.max_objects}")
    if d.min_object_size > d.max_object_size:
        raise ConfigError("demo.min_object_size: exceeds demo.max_object_size")
    for name, preset in params.train_presets.items():
        if preset.scale_min > preset.scale_max:
            raise ConfigError(f"train_presets.{name}.scale_min: exceeds scale_max")
        if preset.batch_size % preset.accumulation:
            raise ConfigError(f"train_presets.{name}.accumulation: must divide batch_size {preset.batch_size}")
    for name, ds in params.datasets.items():
        if ds.preset not in params.train_presets:
            raise ConfigError(f"datasets.{name}.preset: unknown preset {ds.preset!r}")
        if "{}" not in ds.prompt_template:
            raise ConfigError(f"datasets.{name}.prompt_template: must contain '{{}}'")
        if not ds.seeds or len(set(ds.seeds)) != len(ds.seeds) or any(s < 0 for s in ds.seeds):
            raise ConfigError(f"datasets.{name}.seeds: must be a non-empty list of distinct non-negative ints, got {ds.seeds}")
        if any(key.startswith("datasets.") for key in ds.overrides):
            raise ConfigError(f"datasets.{name}.overrides: may not change datasets.* (set them in datasets.{name} itself)")
        if ds.overrides:
            _build(Params, _override(dataclasses.asdict(params), ds.overrides, f"datasets.{name}.overrides"), "")
        for run, overrides in ds.variants.items():
            where = f"datasets.{name}.variants.{run}"
            if run == METHOD_RUN or not re.fullmatch(r"[a-z0-9_]+", run):
                raise ConfigError(f"{where}: a variant name is lower-case letters, digits and '_', and not {METHOD_RUN!r}")
            if not isinstance(overrides, dict) or not overrides:
                raise ConfigError(f"{where}: expected a non-empty mapping of dotted params keys to values")
            if any(key.startswith("datasets.") for key in overrides):
                raise ConfigError(f"{where}: a variant may not change datasets.*")
            _build(Params, _override(dataclasses.asdict(params), overrides, where), "")
    if params.retrain.scale_min > params.retrain.scale_max:
        raise ConfigError("retrain.scale_min: exceeds retrain.scale_max")
    pl = params.pseudo_labels
    if pl.ignore_low > pl.ignore_high:
        raise ConfigError("pseudo_labels.ignore_low: exceeds pseudo_labels.ignore_high")
    if not params.infer.scales or any(s <= 0 for s in params.infer.scales):
        raise ConfigError("infer.scales: must be a non-empty list of positive numbers")
    return params


def params_from_dict(raw: dict) -> Params:
    return _validate(_build(Params, raw, ""))


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    try:
        return params_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
