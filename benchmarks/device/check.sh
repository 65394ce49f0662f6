#!/usr/bin/env bash
# The accelerator check (see check.py for the items, their budgets and the outputs).
# Run from anywhere on the GPU machine after benchmarks/device/prepare.sh filled .device/:
#   bash benchmarks/device/check.sh            # full size, results in $OUT
#   bash benchmarks/device/check.sh --dry      # toy sizes on the CPU, < 2 minutes
# The machine's torch is never touched: the carried wheels go to a private folder with --no-deps.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DEV=.device
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" != "--dry" ] && ls "$DEV"/wheels/*.whl >/dev/null 2>&1; then
  SITE=${TMPDIR:-/tmp}/fs_site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$DEV"/wheels/*.whl \
    && export PYTHONPATH="$SITE:$PYTHONPATH" || echo "check.sh: warning: installing the carried wheels failed" >&2
fi
DATA=()
[ -f "$DEV/fashion-mnist/train-images-idx3-ubyte.gz" ] && DATA=(--data-root "$DEV/fashion-mnist")
exec "$PY" benchmarks/device/check.py "${DATA[@]}" "$@"
