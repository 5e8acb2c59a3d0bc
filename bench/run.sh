#!/usr/bin/env bash
# The side-by-side benchmark of sipt against PyTorch, HF transformers and TRL (docs/benchmarks.md).
# Builds the release binary, then runs bench/run.py, which interleaves every pair over several
# rounds and prints medians and ratios. Extra arguments go to run.py (e.g. --rounds 5,
# --only train, --max-wait-min 0). Needs the project venv (.venv, from scripts/setup.sh) with
# transformers, and trl==1.16.0 for the SIP-step reference:
#   .venv/bin/pip install trl==1.16.0
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c "import trl" 2>/dev/null; then
    echo "note: trl is not installed in $PY; the SIP-step reference will fail (pip install trl==1.16.0)" >&2
fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release -p sipt
fi
exec "$PY" bench/run.py --python "$PY" "$@"
