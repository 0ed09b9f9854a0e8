# SSR workflow (Snakemake >= 9). One rule per stage; every rule runs one `ssr`
# command, the same command as the dvc.yaml stage of the same name, so the two
# DAGs stay interchangeable (tests/test_dag.py keeps them in agreement).
#
#   snakemake --cores 2 results/demo_miou.json     # the offline demo (default target)
#   snakemake --cores 8 results/voc_miou.json      # prepare -> ... -> evaluate
#   snakemake --profile workflow/profiles/slurm results/coco_miou.json
#
# The `ssr` console script must be on PATH: activate the project venv first
# (`source .venv/bin/activate`; `make demo` does it for you).
#
# params.yaml is the one configuration file, and the `ssr` stages read it
# themselves. Change settings there, not with `--config`: an override would
# reshape this DAG while the commands still read params.yaml, so the Snakefile
# refuses overrides that disagree with the file.

import os

import yaml
from snakemake.exceptions import WorkflowError

PARAMS = "params.yaml"


configfile: PARAMS


def _overrides(expected, actual, prefix=""):
    """Dotted keys whose value in the Snakemake config differs from params.yaml."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        keys = sorted(set(expected) | set(actual))
        return [k for key in keys for k in _overrides(expected.get(key), actual.get(key), f"{prefix}{key}.")]
    if isinstance(actual, str) and not isinstance(expected, str):
        # --config values arrive as strings ("true", "0.5")
        actual = yaml.safe_load(actual)
    return [] if expected == actual else [prefix.rstrip(".")]


with open(PARAMS) as _f:
    _params = yaml.safe_load(_f)
_changed = _overrides(_params, config)
if _changed:
    raise WorkflowError(
        f"--config/--configfile changes {', '.join(_changed)}, but the ssr stages read {PARAMS}: "
        f"edit {PARAMS} instead, so the DAG and the commands see the same settings"
    )
# equal overrides may still be strings ("false" is truthy): keep the typed values
config.update(_params)

DATASETS = ["demo", "voc", "coco"]
DATA = config["data_root"]
RESULTS = config["results_root"]
DEMO_CLIP = config["demo_clip"]["checkpoint"]
DEMO_CLIP_DIR = os.path.dirname(DEMO_CLIP)
RETRAIN = config["retrain"]["enabled"]


wildcard_constraints:
    ds="|".join(DATASETS),


def gpus(wildcards):
    """The demo runs on CPU; the real datasets want one GPU per job."""
    return 0 if wildcards.ds == "demo" else 1


def demo_clip_input(wildcards):
    """The committed demo CLIP, only for the demo dataset (voc/coco load open_clip's weights)."""
    return [DEMO_CLIP] if wildcards.ds == "demo" else []


def tracked(*keys):
    """The params.yaml sections a stage reads, as a rule `params` value.

    Snakemake's `params` rerun trigger then re-runs the rule when one of them
    changes, as DVC does for the stage's `params:` list. `{ds}` is the dataset,
    `{preset}` its training preset, `{source}` where prepare gets it from.
    """

    def values(wildcards):
        ds = wildcards.ds
        fill = {
            "ds": ds,
            "preset": config["datasets"][ds]["preset"],
            "source": "demo" if ds == "demo" else "download",
        }
        out = {}
        for key in keys:
            key = key.format(**fill)
            value = config
            for part in key.split("."):
                value = value[part]
            out[key] = value
        return repr(out)

    return values


include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/evaluate.smk"


localrules:
    all,


rule all:
    default_target: True
    input:
        f"{RESULTS}/demo_miou.json",
