#!/usr/bin/env bash
# Create (or bring up to date) the project's virtualenv in .venv: pinned requirements, facenet-pytorch
# without its torch<2.3 pin, ferpipe itself editable. Does nothing when .venv matches the requirements.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.ferpipe-installed
want=$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip wheel
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
.venv/bin/python -m pip install -q --no-deps -e .
# a git identity is needed by `dvc exp run`; set one for this repository only if none is configured
git config user.email >/dev/null 2>&1 || git config user.email "ferpipe@localhost"
git config user.name >/dev/null 2>&1 || git config user.name "ferpipe"
echo "$want" > "$stamp"
echo "ferpipe environment ready in .venv"
