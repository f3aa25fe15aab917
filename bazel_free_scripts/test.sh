#!/usr/bin/env bash
# Sets up .venv (bazel_free_scripts/setup.sh), runs ruff (lint + format check), then the test suite.
# Exit code is pytest's. Extra arguments go to pytest (e.g. `-m slow`, `-k masking`).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/bazel_free_scripts/setup.sh" || exit $?
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export PYTHONUNBUFFERED=1
cd "$ROOT"
# Lint and format first: a style slip fails in seconds, before the long suite.
"$ROOT/.venv/bin/ruff" check . || exit $?
"$ROOT/.venv/bin/ruff" format --check . || exit $?
# pytest runs as the leader of its own process group, so that any TFF worker_binary
# it might leave behind is stopped with the group and cannot hold CI's output open.
setsid "$ROOT/.venv/bin/python" -m pytest "$@" </dev/null &
pid=$!
trap 'kill -TERM -- -$pid 2>/dev/null' INT TERM
wait "$pid"
rc=$?
kill -KILL -- -"$pid" 2>/dev/null || true
exit "$rc"
