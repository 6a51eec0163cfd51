#!/usr/bin/env bash
# The accelerator check (scripts/accelerator_check.py) on a machine that has only an image's
# preinstalled jax, flax, optax, orbax-checkpoint and torch: the wheels this project needs beyond
# them (ml_collections, tensorboardX), carried in $WHEELS, go into a scratch folder on PYTHONPATH;
# the package itself is used from this checkout. Results: $OUT (default ./accelerator_check_out).
#
#   WHEELS=wheels OUT=/tmp/out scripts/accelerator_check.sh            # a GPU
#   JAX_PLATFORMS=cpu scripts/accelerator_check.sh --small             # a CPU, small sizes
#
# Get the wheels where there is a network (Python of the target machine, here 3.12):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d wheels ml_collections tensorboardX
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-wheels}"
if ! "$PYTHON" -c "import ml_collections, tensorboardX" 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "accelerator_check.sh: ml_collections or tensorboardX is missing and $WHEELS/ holds no wheels;" \
         "download them as this script's header says, or pip install -e ." >&2
    exit 2
  fi
  SITE="$(mktemp -d)/site"
  "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" scripts/accelerator_check.py --out "${OUT:-accelerator_check_out}" "$@"
