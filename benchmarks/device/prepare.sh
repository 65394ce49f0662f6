#!/usr/bin/env bash
# Prepare the accelerator check on this (CPU) machine: fill the git-ignored folder .device/
# with what the bare GPU machine lacks, then print the one command to run there.
#
#   .device/wheels/        torch-pruning and timm (pure-Python wheels for CPython 3.12)
#   .device/fashion-mnist/ the four Fashion-MNIST .gz files
#
# usage: bash benchmarks/device/prepare.sh [FASHION_MNIST_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
DEV=.device
SRC=${1:-/usr/share/datasets/fashion-mnist}
PY=${PYTHON:-python3}
grep -qxF '/.device/' .gitignore || echo '/.device/' >> .gitignore
mkdir -p "$DEV/wheels" "$DEV/fashion-mnist"
TP=$("$PY" -c "import torch_pruning; print(torch_pruning.__version__)" 2>/dev/null || echo 1.6.0)
TIMM=$("$PY" -c "import timm; print(timm.__version__)" 2>/dev/null || echo 1.0.31)
rm -f "$DEV"/wheels/*.whl
for pkg in "torch-pruning==$TP" "timm==$TIMM"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$DEV/wheels" "$pkg"
done
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  if [ ! -f "$SRC/$f" ]; then
    echo "prepare: $SRC/$f missing (apt-get install dataset-fashion-mnist, or pass the folder holding the .gz files)" >&2
    exit 2
  fi
  cp "$SRC/$f" "$DEV/fashion-mnist/$f"
done
echo "prepared $(du -sh "$DEV" | cut -f1) in $DEV:"; ls -1 "$DEV/wheels"
echo
echo "On the accelerator machine (repository root), carry: .device"
echo "  bash benchmarks/device/check.sh"
echo "Results land in \$OUT (at most 8 files). Toy-size rehearsal here: bash benchmarks/device/check.sh --dry"
