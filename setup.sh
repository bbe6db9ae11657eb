#!/usr/bin/env bash
# Create (or bring up to date) the project's virtualenv in .venv: pinned requirements, facenet-pytorch
# without its torch<2.3 pin, ferpipe itself editable. Does nothing when .venv matches the requirements.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.ferpipe-installed
want=$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
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
fi

# Offline `dvc plots show`: DVC's page loads vega / vega-lite / vega-embed from a CDN (blank plots
# without a network). Where npm is present, fetch those packages once from the npm registry and inline
# them into a local HTML template (ferpipe.vega_offline), set in .dvc/config.local. Without npm the
# PNG plots still show; the Vega ones need the network.
tpl=.venv/share/ferpipe/dvc_plots_template.html
if [ ! -s "$tpl" ] && command -v npm >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  if (cd "$tmp" && npm pack --silent vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2 >/dev/null 2>&1); then
    .venv/bin/python -m ferpipe.vega_offline "$tmp"/*.tgz --out "$tpl" || true
  else
    echo "npm could not fetch vega/vega-lite/vega-embed: dvc plots show will need the network for Vega plots"
  fi
  rm -rf "$tmp"
fi
if [ -s "$tpl" ] && [ -d .dvc ]; then
  .venv/bin/dvc config --local plots.html_template "$PWD/$tpl"
fi
