# SSR workflow (Snakemake >= 9). One rule per stage and dataset, named
# <stage>-<dataset> like the DVC stages; every rule runs one `ssr` command, the
# same command as the DVC stage of the same name. Both DAGs come from one
# description, workflow/pipeline.py (tests/test_dag.py checks them through the
# tools). docs/workflow.md has the details.
#
#   snakemake --cores 2 demo          # the offline demo from scratch (`make demo`; default target)
#   snakemake --cores 8 voc           # prepare, weights -> superpixels -> train -> pseudo_labels -> retrain -> evaluate
#   snakemake --profile workflow/profiles/slurm coco
#   snakemake --cores 8 train-voc     # one stage (and what it needs)
#   snakemake --cores 2 --report results/demo_report.html --report-after-run report-demo   # the HTML report
#
# Ask for a dataset or a stage, not for a metrics file: results/demo_*.json are
# committed (the reference run that `dvc metrics diff` compares with), and
# Snakemake answers a request for an existing file with "Nothing to be done".
# While a metrics file stands without the products of its stage (a fresh
# clone), a request for it stops with an explanation instead.
#
# The `ssr` console script must be on PATH: activate the project venv first
# (`source .venv/bin/activate`; `make demo` does it for you), or run with
# --use-conda (workflow/envs/ssr.yaml).
#
# params.yaml is the one configuration file, and the `ssr` stages read it
# themselves. Change settings there, not with `--config`: an override would
# reshape this DAG while the commands still read params.yaml, so the Snakefile
# refuses overrides that disagree with the file. The exceptions are the per-site
# paths data_root, results_root and weights_root, which params.local.yaml (git-ignored)
# or SSR_DATA_ROOT / SSR_RESULTS_ROOT / SSR_WEIGHTS_ROOT may set (docs/workflow.md,
# "Per-site paths").

import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, os.path.join(workflow.basedir, "workflow"))
import pipeline  # noqa: E402


configfile: pipeline.PARAMS


TRACKED, RESOURCES = pipeline.load(pipeline.PARAMS)
_changed = pipeline.config_overrides(TRACKED, config)
if _changed:
    raise WorkflowError(
        f"--config/--configfile changes {', '.join(_changed)}, but the ssr stages read {pipeline.PARAMS}: "
        f"edit {pipeline.PARAMS} instead, so the DAG and the commands see the same settings"
    )
# Types, bounds and keys of params.yaml (the schema is written from ssr/config.py by
# `ssr schema`); the `ssr` commands validate the file again, with every message at once.
validate(TRACKED, pipeline.SCHEMA, set_default=False)
# data_root, results_root and weights_root as this machine sets them (params.local.yaml,
# SSR_DATA_ROOT, SSR_RESULTS_ROOT, SSR_WEIGHTS_ROOT), as the `ssr` commands of the rules read them.
PARAMS = pipeline.with_site(TRACKED, pipeline.PARAMS)
# equal overrides may still be strings ("false" is truthy): keep the typed values
config.update(PARAMS)

STAGES = pipeline.stages(PARAMS, RESOURCES)
# the dvc.yaml files are written from the tracked params.yaml, whatever this machine's paths
_stale = pipeline.stale_dvc_files(Path(workflow.basedir), TRACKED, RESOURCES)
if _stale:
    print(
        f"warning: {', '.join(_stale)} out of date with params.yaml / workflow/resources.yaml "
        f"(DVC would run other stages than this Snakefile): run `make dvc`",
        file=sys.stderr,
    )


report: "workflow/report/workflow.rst"


include: "workflow/rules/stages.smk"
include: "workflow/rules/targets.smk"
include: "workflow/rules/report.smk"


rule all:
    # the default target: the demo, from scratch where its products are missing
    default_target: True
    input:
        rules.demo.input,
    localrule: True
