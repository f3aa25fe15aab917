#!/usr/bin/env bash
# Reproduces the paper's experiments with one preset and writes report.md / claims.md.
# Usage: bash bazel_free_scripts/reproduce.sh PRESET [OUTPUT_DIR] [extra absl flags]
#   quick   offline real images (no network needed), about half an hour on 2 CPU cores
#   paper   paper scale; MNIST offline, CIFAR-10 / LFW through tfds (network or --data_dir=D)
#   sweep   the threat-model sweep on the quick preset's training (sweep.csv, sweep.md)
# Rerunning into the same OUTPUT_DIR resumes and skips finished cells.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PRESET="${1:?usage: reproduce.sh PRESET [OUTPUT_DIR] [flags], PRESET one of quick, paper, adaptive, frontier, sweep}"
shift
OUT="${1:-$ROOT/outputs/$PRESET}"
shift || true
bash "$ROOT/bazel_free_scripts/setup.sh"
export PYTHONUNBUFFERED=1
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m experiments.reproduce --preset="$PRESET" --output_dir="$OUT" "$@"
