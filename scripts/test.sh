#!/usr/bin/env bash
# Everything the test suite needs, from a fresh machine: libtorch, the real assets, a build,
# then the tests. Re-runs are quick: downloads and the venv are cached.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh --test
export SIPT_VENV="${SIPT_VENV:-$root/.venv}"
export LIBTORCH="$SIPT_VENV/libtorch"
scripts/fetch-assets.sh
cargo test --workspace "$@"
