#!/usr/bin/env bash
# The paper-scale experiments on the tfds datasets MNIST, CIFAR-10 and LFW.
# Needs a network for tfds to download them, or data prepared beforehand:
#   python -c "import tensorflow_datasets as tfds; [tfds.load(n, data_dir='DIR') for n in ('mnist','cifar10','lfw')]"
# Usage: bash bazel_free_scripts/reproduce_paper.sh [OUTPUT_DIR] [--data_dir=DIR] [extra absl flags]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/bazel_free_scripts/setup.sh"
OUT="${1:-$ROOT/outputs/paper}"
shift || true
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" PYTHONUNBUFFERED=1
cd "$ROOT"
"$ROOT/.venv/bin/python" -m experiments.reproduce --preset=paper --output_dir="$OUT" "$@"
