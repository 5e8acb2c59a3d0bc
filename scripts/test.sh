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
# PNG plots need a TrueType font (Debian: fonts-dejavu-core).
if ! fc-list 2>/dev/null | grep -q . && [ ! -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] \
    && [ -z "${SIPT_PLOT_FONT:-}" ] && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fonts-dejavu-core >/dev/null \
        || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -qq --no-install-recommends fonts-dejavu-core >/dev/null; }
fi
# A real single-node Slurm for the Slurm executor's tests (Debian slurm-wlm + munge, installed
# and started by scripts/slurm-local.sh). A test whose need is missing fails, unless SIPT_SKIP
# names the need (tests/common/needs.rs); SIPT_SKIP=slurm runs the suite without Slurm.
case ",${SIPT_SKIP:-}," in
    *,slurm,*|*,all,*) ;;
    *) slurm_env="$(scripts/slurm-local.sh start)"; export "${slurm_env?}" ;;
esac
cargo test --workspace "$@"
