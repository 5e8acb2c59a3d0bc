#!/usr/bin/env bash
# The main job on built-in defaults, from a fresh machine: set up libtorch, fetch the real
# corpora and word lists, build sipt, and run experiments/quickstart.toml (no servers needed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
if [ -n "${SIPT_VENV:-}" ]; then export LIBTORCH="$SIPT_VENV/libtorch"; fi
scripts/fetch-assets.sh
cargo build --release
exec "${CARGO_TARGET_DIR:-target}/release/sipt" run experiments/quickstart.toml "$@"
