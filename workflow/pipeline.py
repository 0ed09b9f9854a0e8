"""The SSR workflow, described once for both runners.

Every stage of the DAG is one `ssr` command. This module says, per dataset, what
each stage runs, reads, writes, which params.yaml keys it depends on and what a
job asks a scheduler for. The Snakefile turns every `Stage` into a rule, and
`python workflow/pipeline.py dvc` writes the same stages into dvc.yaml files, so
the two DAGs agree by construction (tests/test_dag.py checks them through the
tools themselves).

Why the dvc.yaml files are generated rather than written with `foreach`: the
train stage writes one model per run and seed (`datasets.{ds}.seeds` x
[method, *variants]), a different number of files per dataset, and DVC's
templating can neither interpolate a list into `outs` nor declare the run
folders themselves as outputs (they also hold the resume checkpoint and the
exported pseudo-labels, which would overlap). The one list of datasets is
`DATASETS` below.

    python workflow/pipeline.py dvc            # rewrite dvc.yaml (+ any workflow/dvc/{ds}/dvc.yaml present)
    python workflow/pipeline.py dvc voc        # also write workflow/dvc/voc/dvc.yaml (VOC through DVC)
    python workflow/pipeline.py dvc --check    # exit 1 if a DVC file is out of date

Only PyYAML and the standard library are used, so the Snakefile can import this
without the `ssr` package's dependencies (the per-site paths come from ssr/site.py,
loaded as a file, which needs nothing else either).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# The one list of datasets. `demo` is generated offline; voc and coco download.
DATASETS = ("demo", "voc", "coco")
# The dataset of the root dvc.yaml: plain `dvc repro` reproduces it and nothing else.
DVC_DEFAULT = "demo"
# The stages every dataset runs, in DAG order. retrain always runs (DVC has no
# conditional stages, so Snakemake runs it too): with retrain.enabled false it
# only writes {"retrain_enabled": 0} and a note, as a local job.
STAGE_RULES = ("prepare", "weights", "superpixels", "train", "pseudo_labels", "retrain", "evaluate", "headline")
METHOD = "method"  # the run that trains the configured method (ssr.config.METHOD_RUN)
PARAMS = "params.yaml"
RESOURCES = "workflow/resources.yaml"
# params.yaml's JSON Schema, written by `ssr schema` from ssr/config.py; the Snakefile validates against it.
SCHEMA = "workflow/schemas/params.schema.json"
LOGS = "logs"

# params.yaml keys that do not change what a stage computes (worker counts,
# logging and checkpoint intervals, the inference size for training...). Leaving
# them out of a stage's tracked params keeps an edit to them from re-running a
# two-day training job. fast_path changes results by float rounding only, decode_cache not at all.
TRAIN_RUNTIME_KEYS = ("checkpoint_every", "log_every", "num_workers", "fast_path", "decode_cache")
NOT_TRAINING_DATASET_KEYS = ("long_side", "seed_split", "val_split")


@dataclass
class Stage:
    """One DAG stage for one dataset (`dataset` None for demo_clip and demo_dino)."""

    rule: str
    dataset: str | None
    command: str  # the `ssr` command; "{threads}" marks where the job's thread count goes
    inputs: dict[str, list[str]]
    outputs: dict[str, list[str]]  # every declared product, the metrics file included
    directories: frozenset = frozenset()  # which outputs are folders
    metric: str | None = None  # the DVC metrics file (flat JSON, git-tracked, cache: false)
    curves: tuple = ()  # dvclive folders: git-tracked run state, DVC plots, never deleted before a run
    params: tuple = ()  # params.yaml keys the stage depends on (DVC params, Snakemake params trigger)
    threads: int = 1
    resources: dict = field(default_factory=dict)
    local: bool = False  # runs on the submitting host (downloads, no-ops)
    processes: int = 1  # torchrun processes (train with datasets.{ds}.gpus > 1)
    frozen: bool = False  # DVC never re-runs it (its products are committed)

    @property
    def name(self) -> str:
        return self.rule if self.dataset is None else f"{self.rule}-{self.dataset}"

    @property
    def log(self) -> str:
        return f"{LOGS}/{self.name}.log"

    @property
    def output_paths(self) -> list[str]:
        return [p for paths in self.outputs.values() for p in paths]

    @property
    def input_paths(self) -> list[str]:
        return [p for paths in self.inputs.values() for p in paths]

    @property
    def products(self) -> list[str]:
        """The outputs only a run creates: everything but the committed metrics file."""
        return [p for p in self.output_paths if p != self.metric]

    def threads_per_process(self, threads: int) -> int:
        return max(1, threads // self.processes)

    def cmd(self, threads: int | str | None = None) -> str:
        """The command with a thread count (default: the stage's own), as DVC runs it."""
        if threads is None:
            threads = self.threads_per_process(self.threads)
        return self.command.replace("{threads}", str(threads))


# ------------------------------------------------------------------ loading

def _ssr_module(name: str):
    """ssr/{name}.py of this checkout, loaded as a file (stdlib + PyYAML only: the package's other
    dependencies need not be installed); the installed `ssr.{name}` where the workflow was copied alone."""
    path = Path(__file__).resolve().parents[1] / "ssr" / f"{name}.py"
    if not path.is_file():
        return importlib.import_module(f"ssr.{name}")
    spec = importlib.util.spec_from_file_location(f"_ssr_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _site_module():
    return _ssr_module("site")


def with_site(params: dict, params_path: str | os.PathLike = PARAMS) -> dict:
    """params with the per-site data_root / results_root / weights_root (params.local.yaml, SSR_* variables)."""
    return _site_module().apply_site(params, params_path)


def load(params_path: str | os.PathLike = PARAMS, resources_path: str | os.PathLike | None = None, *,
         site: bool = False) -> tuple[dict, dict]:
    """(params, resources) as plain dicts; resources from workflow/resources.yaml next to this file by default.

    params are the tracked file's, which is what the dvc.yaml files are written from; with
    `site`, data_root, results_root and weights_root as this machine sets them (ssr/site.py), which is what
    the Snakefile's rules and the `ssr` commands use.
    """
    with open(params_path) as f:
        params = yaml.safe_load(f)
    with open(resources_path or Path(__file__).with_name("resources.yaml")) as f:
        resources = yaml.safe_load(f)
    return (with_site(params, params_path) if site else params), resources


def _keys(params: dict, section: str, exclude=()) -> list[str]:
    """`section`'s keys as dotted params, less `exclude`."""
    node = params
    for part in section.split("."):
        node = node[part]
    return [f"{section}.{k}" for k in node if k not in exclude]


def runs(params: dict, ds: str) -> list[str]:
    return [METHOD, *(params["datasets"][ds].get("variants") or {})]


def seeds(params: dict, ds: str) -> list[int]:
    return list(params["datasets"][ds]["seeds"])


def run_dir(params: dict, ds: str, run: str, seed: int) -> str:
    return f"{params['results_root']}/{ds}/{run}/seed{seed}"


# The demo's committed backbones: the datasets.{ds} key that selects one ("demo"), its `ssr` command,
# and the config file its folder holds beside the weights.
DEMO_BACKBONES = {"demo_clip": ("clip_model", "demo-clip", "open_clip_config.json"),
                  "demo_dino": ("dino_model", "demo-dino", "config.json")}


def demo_backbone_files(params: dict, name: str) -> list[str]:
    """The weights and config a demo backbone's loader reads (`name`: demo_clip or demo_dino)."""
    folder = os.path.dirname(params[name]["checkpoint"])
    return [params[name]["checkpoint"], f"{folder}/{DEMO_BACKBONES[name][2]}"]


def demo_backbones_used(conf: dict) -> list[str]:
    """The demo backbones a `datasets.{ds}` entry selects."""
    return [name for name, (key, *_) in DEMO_BACKBONES.items() if conf[key] == "demo"]


# ------------------------------------------------------------------ the stages

def demo_backbone(params: dict, resources: dict, name: str) -> Stage:
    """The demo's tiny CLIP or DINO; committed, so neither runner re-trains it unless asked."""
    res = dict(resources["demo"][name])
    res.pop("threads", None)
    weights, config = demo_backbone_files(params, name)
    return Stage(
        rule=name, dataset=None,
        command=f"ssr {DEMO_BACKBONES[name][1]} --params {PARAMS} --threads {{threads}}",
        inputs={},
        outputs={"checkpoint": [weights], "config": [config],
                 "provenance": [f"{os.path.dirname(weights)}/provenance.json"]},
        params=("demo", name),
        threads=int(params[name]["threads"]),
        resources={**res, "gpu": 0},
        frozen=True,
    )


def dataset_stages(params: dict, resources: dict, ds: str) -> list[Stage]:
    """prepare, weights -> superpixels -> train -> pseudo_labels -> retrain -> evaluate for one dataset."""
    data, results = f"{params['data_root']}/{ds}", params["results_root"]
    conf = params["datasets"][ds]
    res = resources[ds]
    dataset = {"images": [f"{data}/images"], "splits": [f"{data}/splits"], "classes": [f"{data}/classes.json"],
               "image_labels": [f"{data}/image_labels.json"]}
    labels = {"labels": [f"{data}/labels"]}
    demo_models = {name: demo_backbone_files(params, name) for name in demo_backbones_used(conf)}
    superpixels = {"superpixels": [f"{data}/superpixels.h5"]}
    # What `ssr weights` fetched (its manifest): the stages that load CLIP and DINO read them from the cache.
    weights = {"weights": [f"{params['weights_root']}/{ds}.json"]}
    run_dirs = [run_dir(params, ds, r, s) for r in runs(params, ds) for s in seeds(params, ds)]
    models = {"models": [f"{d}/model.safetensors" for d in run_dirs], "model_configs": [f"{d}/model.json" for d in run_dirs]}
    method_dirs = [run_dir(params, ds, METHOD, s) for s in seeds(params, ds)]
    pseudo = [f"{d}/pseudo_labels" for d in method_dirs]
    gpu = 0 if ds == "demo" else 1  # the demo runs on CPU
    processes = int(conf.get("gpus", 1))
    superpixel_keys = _keys(params, "superpixels", exclude=("workers",))

    def ssr(stage: str, extra: str = "") -> str:
        return f"ssr {stage} --dataset {ds} --params {PARAMS}{extra} --threads {{threads}}"

    def job(name: str, **extra) -> dict:
        r = dict(res[name])
        threads = r.pop("threads")
        return {"threads": int(threads), "resources": {**r, **extra}}

    if processes > 1:
        train_cmd = (f"torchrun --standalone --nproc_per_node {processes} -m ssr train --dataset {ds} --params {PARAMS}"
                     f" --resume --threads {{threads}}")
    else:
        train_cmd = ssr("train", " --resume")
    if ds == "demo":
        prepare_keys = ["demo"]
    else:
        prefixes = ("voc_", "sbd_") if ds == "voc" else (f"{ds}_",)
        prepare_keys = [f"download.{k}" for k in params["download"] if k.startswith(prefixes)]
    split_keys = [f"datasets.{ds}.train_split", f"datasets.{ds}.val_split"]
    retrain_local = not params["retrain"]["enabled"]

    stages = [
        Stage("prepare", ds, f"ssr prepare --dataset {ds} --params {PARAMS} --threads {{threads}}", inputs={},
              outputs={"images": [f"{data}/images"], "labels": [f"{data}/labels"], "splits": [f"{data}/splits"],
                       "classes": [f"{data}/classes.json"], "image_labels": [f"{data}/image_labels.json"]},
              directories=frozenset({f"{data}/images", f"{data}/labels", f"{data}/splits"}),
              params=tuple(prepare_keys), local=True, **job("prepare", gpu=0)),
        # A local job: on a cluster the downloads need the login node's network, which compute nodes may lack.
        Stage("weights", ds, ssr("weights"), inputs={**demo_models}, outputs=weights,
              params=tuple(f"datasets.{ds}.{k}" for k in ("clip_model", "clip_pretrained", "dino_model", "dino_weights")),
              local=True, **job("weights", gpu=0)),
        Stage("superpixels", ds, ssr("superpixels"),
              inputs={"images": dataset["images"], "splits": dataset["splits"], "image_labels": dataset["image_labels"]},
              outputs=superpixels, params=tuple(superpixel_keys + split_keys),
              threads=int(params["superpixels"]["workers"]),  # the processes the stage starts
              resources={k: v for k, v in res["superpixels"].items() if k != "threads"} | {"gpu": 0}),
        Stage("train", ds,
              # Set aside checkpoints written from other params or inputs, so that
              # --resume only ever continues the interrupted run of this very job.
              f"python workflow/scripts/checkpoints.py --dataset {ds} --params {PARAMS} && {train_cmd}",
              inputs={**dataset, **superpixels, **demo_models, **weights},
              outputs={**models, "metrics": [f"{results}/{ds}_train.json"]},
              metric=f"{results}/{ds}_train.json",
              curves=tuple(f"{d}/dvclive" for d in method_dirs),
              params=tuple(_keys(params, f"datasets.{ds}", exclude=NOT_TRAINING_DATASET_KEYS)
                           + _keys(params, "train", exclude=TRAIN_RUNTIME_KEYS)
                           + [f"train_presets.{conf['preset']}", *superpixel_keys, "affinity", "sgc", "cmpa"]
                           + _keys(params, "pseudo_labels", exclude=("figures",))),
              processes=processes,
              **job("train", gpu=0 if ds == "demo" else processes, nodes=1)),
        Stage("pseudo_labels", ds, ssr("pseudo-labels"),
              inputs={**dataset, **labels, **superpixels, **models, **demo_models, **weights},
              outputs={"pseudo_labels": pseudo, "figures": [f"{results}/{ds}/figures"],
                       "metrics": [f"{results}/{ds}_seeds.json"]},
              directories=frozenset({*pseudo, f"{results}/{ds}/figures"}),
              metric=f"{results}/{ds}_seeds.json",
              params=(f"datasets.{ds}", *superpixel_keys, "affinity", "sgc", "cmpa", "pseudo_labels"),
              **job("pseudo_labels", gpu=gpu)),
        Stage("retrain", ds, ssr("retrain"),
              inputs={**dataset, **labels, "pseudo_labels": pseudo[:1]},
              outputs={"retrain": [f"{results}/{ds}/retrain"], "metrics": [f"{results}/{ds}_retrain.json"]},
              directories=frozenset({f"{results}/{ds}/retrain"}),
              metric=f"{results}/{ds}_retrain.json",
              params=(f"datasets.{ds}.train_split", f"datasets.{ds}.seeds", "retrain"),
              local=retrain_local,
              **(job("retrain", gpu=gpu) if not retrain_local
                 else {"threads": 1, "resources": {"mem_mb": 1000, "runtime": 5, "gpu": 0}})),
        Stage("evaluate", ds, ssr("evaluate"),
              # The retrained segmenter is read only with retrain.enabled; the edge keeps
              # the two runners' DAGs identical either way.
              inputs={**dataset, **labels, **models, "retrain": [f"{results}/{ds}/retrain"], **demo_models, **weights},
              outputs={"predictions": [f"{results}/{ds}/predictions"], "metrics": [f"{results}/{ds}_miou.json"]},
              directories=frozenset({f"{results}/{ds}/predictions"}),
              metric=f"{results}/{ds}_miou.json",
              params=(f"datasets.{ds}", "infer", "retrain", "pseudo_labels.figures"),
              **job("evaluate", gpu=gpu)),
        # The few numbers a run is judged by, for `dvc metrics diff` (ssr.report.headline_metrics);
        # the variants say which run is the fully supervised bound.
        Stage("headline", ds, ssr("headline"),
              inputs={"seeds": [f"{results}/{ds}_seeds.json"], "miou": [f"{results}/{ds}_miou.json"]},
              outputs={"table": [f"{results}/{ds}/headline.md"], "metrics": [f"{results}/{ds}_headline.json"]},
              metric=f"{results}/{ds}_headline.json",
              params=(f"datasets.{ds}.variants",), local=True,
              resources={"mem_mb": 500, "runtime": 5, "gpu": 0}),
    ]
    assert tuple(s.rule for s in stages) == STAGE_RULES
    return stages


# What `ssr report` writes into results/{ds}/report/ (ssr.report.PAGES and COMPARISON;
# tests/test_report.py checks they agree): the HTML pages, every number in metrics.csv, our figures
# against the paper's, and curves/.
REPORT_PAGES = ("headline", "seeds", "seeds_classes", "val", "val_classes", "train", "params", "gallery")
REPORT_COMPARISON = "paper.png"


def report_stage(params: dict, resources: dict, ds: str) -> Stage:
    """Snakemake's report of one dataset: `ssr report` turns the stages' results into tables and curves.

    A Snakemake rule only, outside the dataset targets and the DVC pipelines: DVC shows the same
    results its own way (`dvc metrics show`, `dvc plots`), and `snakemake {ds}` keeps planning
    exactly the DVC stages. It reads the metrics files (each left out while it is only the
    committed reference, like the targets do, so that its stage runs), the models (the dvclive
    curves lie beside them) and the figure folders, which the report shows as they are.
    """
    by_rule = {s.rule: s for s in dataset_stages(params, resources, ds)}
    out = f"{params['results_root']}/{ds}/report"

    def metric(rule: str) -> list[str]:
        stage = by_rule[rule]
        return [] if reference_only(stage) else [stage.metric]

    return Stage(
        "report", ds, f"ssr report --dataset {ds} --params {PARAMS} --threads {{threads}}",
        inputs={"classes": by_rule["prepare"].outputs["classes"], "models": by_rule["train"].outputs["models"],
                "train": metric("train"), "figures": by_rule["pseudo_labels"].outputs["figures"],
                "seeds": metric("pseudo_labels"),
                "predictions": by_rule["evaluate"].outputs["predictions"], "miou": metric("evaluate"),
                "headline": by_rule["headline"].products + metric("headline")},
        outputs={**{name: [f"{out}/{name}.html"] for name in REPORT_PAGES}, "numbers": [f"{out}/metrics.csv"],
                 "comparison": [f"{out}/{REPORT_COMPARISON}"], "curves": [f"{out}/curves"]},
        directories=frozenset({f"{out}/curves"}),
        params=(f"datasets.{ds}.seeds", f"datasets.{ds}.variants", "cmpa.loss"),
        resources={"mem_mb": 2000, "runtime": 10, "gpu": 0},  # pandas and matplotlib over a few JSON files and TSVs
        local=True,
    )


def stages(params: dict, resources: dict, datasets=DATASETS) -> list[Stage]:
    """The demo's committed backbones where it uses them (demo_clip, demo_dino), then every dataset's stages."""
    used = demo_backbones_used(params["datasets"]["demo"]) if "demo" in datasets else []
    out = [demo_backbone(params, resources, name) for name in used]
    for ds in datasets:
        out += dataset_stages(params, resources, ds)
    return out


def tracked(params: dict, stage: Stage) -> str:
    """The values of a stage's params keys, as one string: Snakemake re-runs a rule when it changes."""
    values = {}
    for key in stage.params:
        node = params
        for part in key.split("."):
            node = node[part]
        values[key] = node
    return repr(values)


def reference_only(stage: Stage, exists=os.path.exists) -> bool:
    """True when the stage's metrics file is present without the products it summarises.

    That is the committed reference run on a fresh clone (or what an interrupted run
    left), never a result of this checkout.
    """
    return bool(stage.metric) and exists(stage.metric) and not all(exists(p) for p in stage.products)


def snakemake_inputs(stage: Stage, stages: list[Stage], exists=os.path.exists) -> dict[str, list[str]]:
    """A stage's inputs as its Snakemake rule declares them.

    A metrics file that is only the committed reference (`reference_only`) is no rule's output
    there (a guard rule claims it and refuses), so a stage reading it (headline) waits instead
    for the products of the stage that rewrites it. Elsewhere, and in DVC, the inputs as declared.
    """
    reference = {s.metric: s for s in stages if s.metric and reference_only(s, exists)}
    return {name: list(dict.fromkeys(p for path in paths for p in (reference[path].products if path in reference else [path])))
            for name, paths in stage.inputs.items()}


def config_overrides(expected, actual, prefix: str = "") -> list[str]:
    """Dotted keys whose value in the Snakemake config differs from params.yaml."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        keys = sorted(set(expected) | set(actual))
        return [k for key in keys for k in config_overrides(expected.get(key), actual.get(key), f"{prefix}{key}.")]
    if isinstance(actual, str) and not isinstance(expected, str):
        actual = yaml.safe_load(actual)  # --config values arrive as strings ("true", "0.5")
    return [] if expected == actual else [prefix.rstrip(".")]


class ReferenceNotAResult(Exception):
    """A committed reference metrics file was asked for where no run produced it."""


def refuse_reference(stage: Stage):
    """Input function of the guard rule that claims a reference-only metrics file."""
    missing = [p for p in stage.products if not os.path.exists(p)]
    target = stage.dataset or "all"
    raise ReferenceNotAResult(
        f"{stage.metric} is the committed reference run's metrics file, not a result computed in this checkout "
        f"({len(missing)} of the stage's products are missing, e.g. {missing[0]}). Snakemake would skip a request "
        f"for a file that exists, so ask for the stage or the dataset instead, which compute it: "
        f"`snakemake --cores N {target}` (or `make demo`), or `snakemake --cores N {stage.name}`.")


# ------------------------------------------------------------------ DVC

DVC_HEADER = """\
# GENERATED by `python workflow/pipeline.py dvc` from params.yaml and
# workflow/resources.yaml (`make dvc`): edit those, not this file.
#
# {what}
# Stages are named <Snakemake rule>-<dataset> and run the same commands as the
# Snakefile's rules (tests/test_dag.py keeps the two DAGs in agreement). The
# `ssr` console script must be on PATH (activate .venv).
"""


def dvc_plots(stage: Stage, wdir: str = ".") -> list[dict]:
    """DVC's plots of a stage's dvclive curves: one per logged quantity (ssr/curves.py), the
    seeds of the run overlaid, its title naming the dataset, the run, the seeds and the quantity.

    The curves DVC tracks are the method's (`Stage.curves`, results/{ds}/method/seed{S}/dvclive).
    """
    if not stage.curves:
        return []
    seeds = [Path(p).parent.name.removeprefix("seed") for p in stage.curves]
    run = Path(stage.curves[0]).parent.parent.name
    plots = []
    for quantity, words in _ssr_module("curves").CURVES.items():
        value = quantity.rsplit("/", 1)[-1]
        files = {os.path.normpath(os.path.join(wdir, p, "plots", "metrics", f"{quantity}.tsv")): value for p in stage.curves}
        plots.append({f"{stage.dataset} {run}: {quantity}": {
            "title": f"{stage.dataset}, {run}, seeds {', '.join(seeds)}: {words}",
            "x": "step", "x_label": "iteration", "y": files, "y_label": value}})
    return plots


def dvc_file(dataset: str) -> str:
    """Where a dataset's DVC pipeline lives: the demo at the root, voc/coco beside the workflow."""
    return "dvc.yaml" if dataset == DVC_DEFAULT else f"workflow/dvc/{dataset}/dvc.yaml"


def dvc_yaml(params: dict, resources: dict, dataset: str) -> str:
    """The text of one dataset's dvc.yaml."""
    path = dvc_file(dataset)
    wdir = os.path.relpath(".", os.path.dirname(path) or ".")
    todo = stages(params, resources, [dataset])
    body: dict = {"stages": {}}
    for stage in todo:
        entry: dict = {}
        if wdir != ".":
            entry["wdir"] = wdir
        entry["cmd"] = stage.cmd()
        if stage.frozen:
            entry["frozen"] = True
        if stage.input_paths:
            entry["deps"] = list(stage.input_paths)
        if stage.params:
            entry["params"] = list(stage.params)
        outs = []
        for p in stage.output_paths:
            if stage.frozen:
                continue
            if p != stage.metric:
                outs.append(p)
        for p in stage.curves:
            # git-tracked (see .gitignore), and kept when the stage re-runs: a resumed run appends to them
            outs.append({p: {"cache": False, "persist": True}})
        if stage.frozen:
            outs.append({os.path.dirname(stage.outputs["checkpoint"][0]): {"cache": False}})
        if outs:
            entry["outs"] = outs
        if stage.metric:
            entry["metrics"] = [{stage.metric: {"cache": False}}]
        body["stages"][stage.name] = entry
    plots = [plot for s in todo for plot in dvc_plots(s, wdir)]
    if plots:
        body["plots"] = plots
    if dataset == DVC_DEFAULT:
        what = ("The offline demo: plain `dvc repro` reproduces it and nothing else. VOC and COCO\n"
                "# have their own pipelines: `python workflow/pipeline.py dvc voc` writes\n"
                "# workflow/dvc/voc/dvc.yaml, then `dvc repro workflow/dvc/voc/dvc.yaml`.")
    else:
        what = (f"{dataset}: `dvc repro {path}`; every path is relative to the repository\n"
                f"# root (wdir). The demo is the root dvc.yaml.")
    return DVC_HEADER.format(what=what) + "\n" + yaml.safe_dump(body, sort_keys=False, width=10_000, allow_unicode=True)


# DVC's page for `dvc plots show/diff` (.dvc/config: plots.html_template, relative to .dvc/). DVC's
# own page loads vega from a CDN, so offline it stays blank; this one has the scripts inlined.
PLOTS_TEMPLATE = ".dvc/plots_template.html"
PLOTS_PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots</title>
    <!-- Vega VEGA, Vega-Lite VEGALITE and Vega-Embed EMBED, inlined from the installed
         vl-convert-python (written by `python workflow/pipeline.py plots-template`): this page loads
         no script from the network. -->
    <script type="text/javascript">
BUNDLE
    </script>
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def plots_template() -> str:
    """The text of PLOTS_TEMPLATE: DVC's placeholders ({refresh_tag}, {plot_divs}; no {scripts},
    which would add DVC's CDN scripts) around vega, vega-lite 5 and vega-embed, which the
    installed vl-convert-python bundles; they set window.vega, vegaLite and vegaEmbed, which DVC's
    plot divs call. DVC's templates are Vega-Lite 5 specs: the newest 5.x it ships is used."""
    import vl_convert

    version = max((v for v in vl_convert.get_vegalite_versions() if v.startswith("5.")),
                  key=lambda v: tuple(int(x) for x in v.split(".")))
    bundle = vl_convert.javascript_bundle(vl_version=version)
    for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}"):
        if placeholder in bundle:  # DVC fills the page with str.replace, which would reach into the script
            raise ValueError(f"the vl-convert bundle contains DVC's placeholder {placeholder}")
    # the page's parser would end the script at a "</script" inside a string of the bundle
    bundle = bundle.replace("</script", "<\\/script")
    return (PLOTS_PAGE.replace("VEGALITE", version).replace("VEGA,", f"{vl_convert.get_vega_version()},")
            .replace("EMBED", vl_convert.get_vega_embed_version()).replace("BUNDLE", bundle))


def dvc_targets(root: Path, datasets: list[str]) -> list[str]:
    """The demo's file, the named datasets' files and any dataset file already present."""
    named = set(datasets) | {DVC_DEFAULT}
    return [ds for ds in DATASETS if ds in named or (root / dvc_file(ds)).exists()]


def stale_dvc_files(root: Path, params: dict, resources: dict) -> list[str]:
    """The DVC files present under `root` whose text differs from what params.yaml makes."""
    return [dvc_file(ds) for ds in dvc_targets(root, [])
            if (root / dvc_file(ds)).exists() and (root / dvc_file(ds)).read_text() != dvc_yaml(params, resources, ds)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python workflow/pipeline.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dvc", help="write the dvc.yaml files from params.yaml and workflow/resources.yaml")
    p.add_argument("datasets", nargs="*", metavar="DATASET",
                   help=f"also write these datasets' pipelines ({', '.join(d for d in DATASETS if d != DVC_DEFAULT)})")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is missing or out of date")
    p.add_argument("--params", default=PARAMS)
    t = sub.add_parser("plots-template", help=f"write {PLOTS_TEMPLATE}, DVC's offline plots page (make setup does)")
    t.add_argument("--out", default=PLOTS_TEMPLATE, help=f"where to write it (default: {PLOTS_TEMPLATE})")
    args = parser.parse_args(argv)
    if args.command == "plots-template":
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(plots_template(), encoding="utf8")
        tmp.replace(out)
        print(f"wrote {out}")
        return 0
    unknown = sorted(set(args.datasets) - set(DATASETS))
    if unknown:
        parser.error(f"unknown dataset {', '.join(unknown)} (known: {', '.join(DATASETS)})")

    root = Path.cwd()
    params, resources = load(args.params)
    stale = []
    for ds in dvc_targets(root, args.datasets):
        path, text = root / dvc_file(ds), dvc_yaml(params, resources, ds)
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(dvc_file(ds))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {dvc_file(ds)}")
    if stale:
        print(f"out of date with {args.params}: {', '.join(stale)}; run `python workflow/pipeline.py dvc` (make dvc)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
