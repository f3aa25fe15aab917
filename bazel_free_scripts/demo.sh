#!/usr/bin/env bash
# The main job on offline real data: sets up .venv, then reproduces the paper's
# experiments at small scale (the `quick` preset) and prints where the report went.
# Usage: bash bazel_free_scripts/demo.sh [OUTPUT_DIR] [extra absl flags]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/outputs/quick}"
shift || true
bash "$ROOT/bazel_free_scripts/reproduce.sh" quick "$OUT" "$@"
echo
echo "[demo] report:  $OUT/report.md ($OUT/report.html)"
echo "[demo] claims:  $OUT/claims.md"
echo "[demo] figures: $OUT/figures/"
