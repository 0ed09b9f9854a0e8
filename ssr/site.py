"""Per-site paths: where this machine keeps datasets, stage outputs and weights, set outside params.yaml.

`data_root`, `results_root` and `weights_root` are the only settings that change from one
machine to another without changing a result, so they are the only ones that may come from
elsewhere than the tracked params.yaml, in this order (last wins):

1. params.yaml itself;
2. `params.local.yaml` beside it (git-ignored), holding only these keys, e.g.
   `data_root: /scratch/me/ssr-data`;
3. the environment variables `SSR_DATA_ROOT`, `SSR_RESULTS_ROOT` and `SSR_WEIGHTS_ROOT`
   (an empty value counts as unset).

`ssr.config.load_params` and the Snakefile (`workflow/pipeline.py`) both apply them
through this module. DVC does not: its dvc.yaml files declare the paths of the tracked
params.yaml, so a stage run by DVC (`DVC_STAGE` is set) refuses a site path that differs
from them instead of writing where DVC does not look (docs/workflow.md, "Per-site paths").

Only the standard library and PyYAML are used, so the Snakefile can load this file
without the package's other dependencies.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

LOCAL_FILE = "params.local.yaml"
ENV_VARS = {"data_root": "SSR_DATA_ROOT", "results_root": "SSR_RESULTS_ROOT", "weights_root": "SSR_WEIGHTS_ROOT"}
SITE_KEYS = tuple(ENV_VARS)
# DVC sets this for every stage command it runs (dvc/stage/run.py).
DVC_STAGE = "DVC_STAGE"


def _names() -> str:
    return ", ".join(SITE_KEYS[:-1]) + " and " + SITE_KEYS[-1]


class SiteError(ValueError):
    """params.local.yaml or an SSR_* variable is malformed, or a site path differs under DVC."""


def local_file(params_path: str | os.PathLike) -> Path:
    """The override file that belongs to a params file: params.local.yaml in the same folder."""
    return Path(params_path).with_name(LOCAL_FILE)


def site_overrides(params_path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """{key: (value, where it was set)} for the per-site keys set outside `params_path`."""
    environ = os.environ if environ is None else environ
    out: dict[str, tuple[str, str]] = {}
    local = local_file(params_path)
    if local.is_file():
        try:
            raw = yaml.safe_load(local.read_text())
        except yaml.YAMLError as err:
            raise SiteError(f"{local}: not valid YAML ({err})") from err
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise SiteError(f"{local}: expected a mapping of {_names()}, got {type(raw).__name__}")
        for key, value in raw.items():
            if key not in SITE_KEYS:
                raise SiteError(f"{local}: {key}: not a per-site key (only {_names()} may be set here; "
                                f"other settings belong in {Path(params_path).name}, where Snakemake and DVC see them)")
            if not isinstance(value, str) or not value:
                raise SiteError(f"{local}: {key}: expected a folder path, got {value!r}")
            out[key] = (value, str(local))
    for key, var in ENV_VARS.items():
        if environ.get(var):
            out[key] = (environ[var], f"${var}")
    return out


def apply_site(raw: dict, params_path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> dict:
    """`raw` (params.yaml as loaded) with the per-site paths set; refused under DVC where they move a path."""
    environ = os.environ if environ is None else environ
    overrides = site_overrides(params_path, environ)
    if not isinstance(raw, dict) or not overrides:
        return raw
    moved = {key: (value, where) for key, (value, where) in overrides.items() if raw.get(key) != value}
    if moved and environ.get(DVC_STAGE):
        details = "; ".join(f"{where} sets {key} to {value!r}, params.yaml says {raw.get(key)!r}"
                            for key, (value, where) in moved.items())
        raise SiteError(f"DVC stage {environ[DVC_STAGE]}: {details}. DVC declares this stage's files under params.yaml's "
                        f"paths inside the repository, so it cannot run with a per-site path: unset it for DVC (and "
                        f"keep the checkout itself on the site's storage), or run the stage through Snakemake")
    return {**raw, **{key: value for key, (value, _) in overrides.items()}}
