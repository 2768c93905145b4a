#!/usr/bin/env bash
# Wheels the GPU machine lacks for `make train` (LightningCLI): download them HERE into .whl/ (git-ignored),
# then carry .whl to the GPU machine; benchmarks/gpu_check.sh installs them there into .site/ (--no-index).
set -eu
PY=${PY:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "jsonargparse==4.53.0" "docstring-parser==0.18.0" "typeshed-client==2.15.0"
ls .whl
