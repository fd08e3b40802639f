#!/usr/bin/env bash
# Download, on a machine with a package index, the pure-Python wheels that the GPU machine lacks
# (its image has torch, transformers, peft, tensorboard, tokenizers, cloudpickle and rich, but not
# these), into .whl/ (ignored by git). benchmarks/gpu_check.sh installs them there with --no-index.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON]      # PYTHON defaults to python3
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
# Exactly one version of each: two versions of a package stop the whole install there.
packages=(
    gymnasium==1.4.0
    farama-notifications==0.0.6
    stable-baselines3==2.9.2
    tyro==1.0.17
    docstring-parser==0.18.0
    typeguard==4.6.1
)
mkdir -p .whl
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "${packages[@]}"
ls -1 .whl
echo "total: $(du -ck .whl/*.whl | tail -1 | cut -f1) KiB in $(ls .whl/*.whl | wc -l) wheels"
