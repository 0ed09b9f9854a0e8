#!/usr/bin/env bash
# Run by `snakemake --use-conda` once, after it creates workflow/envs/ssr.yaml's
# environment, from the workflow's working directory (this checkout): install
# the `ssr` package and console script into that environment.
set -euo pipefail
python -m pip install --no-deps --editable .
