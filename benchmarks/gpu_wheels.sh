#!/usr/bin/env bash
# Wheels of the Python packages benchmarks/gpu_suite.sh needs that the GPU machine's image lacks
# (/work/.library/device/KINDS.md lists what it has: torch, triton, timm, h5py... but not these),
# for its Python 3.12 on x86_64, into .whl/ (git-ignored here; the device tool carries it: carry .whl).
# Versions: what this repository's .venv runs.
#
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> "$(git rev-parse --git-path info/exclude)"
PIP=${PIP:-.venv/bin/python -m pip}
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
mkdir -p .whl
for package in open_clip_torch ftfy wcwidth pydantic pydantic_core annotated_types typing_inspection typing_extensions; do
  $PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
      -d .whl "$package==$(version "$package")"
done
ls -l .whl
