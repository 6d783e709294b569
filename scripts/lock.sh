#!/usr/bin/env bash
# Refresh requirements.lock to the newest releases pyproject.toml allows, install them and run the suite: upgrading
# is a choice made here, never an accident of the day. Review `git diff requirements.lock`, then commit or revert.
# Widen a cap in pyproject.toml first to try a newer minor. Uses uv (installed into .venv if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
.venv/bin/python -m uv --version >/dev/null 2>&1 || .venv/bin/python -m pip install -q uv
# torch stays out of the lock (setup installs the CPU wheel first); resolving against a local CPU wheel, where one is
# found, keeps CUDA-only dependencies out of the lock too.
links=()
for dir in /opt/wheels ${TORCH_WHEELS:-}; do [ -d "$dir" ] && links+=(--find-links "$dir"); done
.venv/bin/python -m uv pip compile pyproject.toml --extra dev --extra eval --python-version 3.11 --upgrade \
  "${links[@]}" --no-emit-package torch -q -o requirements.lock
bash scripts/setup.sh
.venv/bin/python -m pytest
