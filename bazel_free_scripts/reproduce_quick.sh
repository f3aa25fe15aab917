#!/usr/bin/env bash
# The paper's experiments at small scale on offline real images (no network needed):
# digits stands in for MNIST, photos for CIFAR-10, lfw_subset for LFW.
# Usage: bash bazel_free_scripts/reproduce_quick.sh [OUTPUT_DIR] [extra absl flags]
# Rerunning into the same OUTPUT_DIR resumes and skips finished cells.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/bazel_free_scripts/setup.sh"
OUT="${1:-$ROOT/outputs/quick}"
shift || true
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" PYTHONUNBUFFERED=1
cd "$ROOT"
"$ROOT/.venv/bin/python" -m experiments.reproduce --preset=quick --output_dir="$OUT" "$@"
