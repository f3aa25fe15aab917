#!/usr/bin/env bash
# Reproduces the paper's experiments with one preset and writes report.md / claims.md.
# Usage: bash bazel_free_scripts/reproduce.sh PRESET [OUTPUT_DIR] [extra absl flags]
#   quick   offline real images (no network needed), about half an hour on 2 CPU cores
#   paper   paper scale; MNIST offline, CIFAR-10 / LFW through tfds (network or --data_dir=D)
#   sweep   the threat-model sweep on the quick preset's training (sweep.csv, sweep.md)
# --engine=flower trains with Flower's simulation engine on Ray, in .venv-k3 (no TFF;
# setup_core.sh), e.g. reproduce.sh frontier outputs/frontier_flower --engine=flower
# Rerunning into the same OUTPUT_DIR resumes and skips finished cells.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PRESET="${1:?usage: reproduce.sh PRESET [OUTPUT_DIR] [flags], PRESET one of quick, paper, adaptive, frontier, sweep}"
shift
# OUTPUT_DIR is optional: a first argument that is a flag is left among the flags.
OUT="$ROOT/outputs/$PRESET"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
  OUT="$1"
  shift
fi
VENV=.venv
SETUP=setup.sh
prev=""
for arg in "$@"; do
  if [ "$arg" = "--engine=flower" ] || { [ "$prev" = "--engine" ] && [ "$arg" = "flower" ]; }; then
    VENV=.venv-k3
    SETUP=setup_core.sh
  fi
  prev="$arg"
done
bash "$ROOT/bazel_free_scripts/$SETUP"
export PYTHONUNBUFFERED=1
cd "$ROOT"
exec "$ROOT/$VENV/bin/python" -m experiments.reproduce --preset="$PRESET" --output_dir="$OUT" "$@"
