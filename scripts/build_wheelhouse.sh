#!/usr/bin/env bash
# Build wheels of the trl-video core and of every plugin under plugins/ into one local wheelhouse, so that in a
# fresh environment
#     pip install torch==2.13.0                      # (or the torch build for your CUDA)
#     pip install --find-links WHEELHOUSE vidrl-plugin-dmalign
# installs the plugin with the core as its dependency (the core's own dependencies come from PyPI).
# Usage: scripts/build_wheelhouse.sh [WHEELHOUSE]   (default: <repo>/wheelhouse)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELHOUSE="$(mkdir -p "${1:-$ROOT/wheelhouse}" && cd "${1:-$ROOT/wheelhouse}" && pwd)"
PY="${PYTHON:-python3}"
projects=("$ROOT")
for p in "$ROOT"/plugins/*/; do
  [ -f "$p/pyproject.toml" ] && projects+=("${p%/}")
done
for p in "${projects[@]}"; do
  echo "building $(basename "$p") -> $WHEELHOUSE"
  "$PY" -m pip wheel --no-deps --wheel-dir "$WHEELHOUSE" "$p" >/dev/null
done
ls -1 "$WHEELHOUSE"/*.whl
