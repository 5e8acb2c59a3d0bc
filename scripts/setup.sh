#!/usr/bin/env bash
# Set up everything sipt needs to build: a Python virtual environment holding PyTorch 2.11.0
# (libtorch for the tch crate). Idempotent and quick when already done.
#
# Use:  scripts/setup.sh            (creates .venv in the project)
#       scripts/setup.sh --test     (also what the tests need: transformers, xllamacpp, wandb)
#       SIPT_VENV=/path scripts/setup.sh   (elsewhere; then export LIBTORCH=$SIPT_VENV/libtorch)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SIPT_VENV:-$root/.venv}"
torch_version="2.11.0"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$torch_version' else 1)" 2>/dev/null; then
  echo "setup: installing torch==$torch_version into $venv (about 4.6 GB with its CUDA libraries; a few minutes)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==$torch_version"
fi
# Gloo's headers (Debian's libgloo-dev) let the build compile c10d's ProcessGroupGloo, which
# data-parallel runs use; the PyTorch wheel ships Gloo's library but not its headers. Installed
# when missing and root; without them sipt builds and runs, on one process only.
if [ ! -e /usr/include/gloo/context.h ] && [ -z "${SIPT_GLOO_INCLUDE:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing libgloo-dev (Gloo's headers, for multi-process training)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libgloo-dev >/dev/null \
      || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -qq --no-install-recommends libgloo-dev >/dev/null; } \
      || echo "setup: could not install libgloo-dev; sipt will train on one process only"
  else
    echo "setup: no Gloo headers (Debian: apt-get install libgloo-dev); sipt will train on one process only"
  fi
fi
torch_dir="$("$venv/bin/python" -c "import torch, os; print(os.path.dirname(torch.__file__))" 2>/dev/null)"
ln -sfn "$torch_dir" "$venv/libtorch"
# The NCCL backend of the c10d shim compiles against the CUDA runtime's headers beside the
# wheel; two of them (crt/host_config.h, nv/target) come in packages the wheel does not depend
# on. Headers only, a few MB.
cuda="$("$venv/bin/python" -c "import torch; print(torch.version.cuda or '')" 2>/dev/null || true)"
if [ -n "$cuda" ] && [ ! -e "$torch_dir/../nvidia/cu${cuda%%.*}/include/crt/host_config.h" ]; then
  echo "setup: installing the CUDA $cuda headers the NCCL backend needs (nvidia-cuda-crt, nvidia-cuda-cccl)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    "nvidia-cuda-crt==$cuda.*" "nvidia-cuda-cccl==$cuda.*" \
    || echo "setup: could not install the CUDA headers; sipt will be built without the NCCL backend"
fi
if [ "${1:-}" = "--test" ]; then
  requirements="$root/scripts/requirements-test.txt"
  stamp="$venv/.sipt-test-requirements"
  if ! cmp -s "$requirements" "$stamp" 2>/dev/null; then
    echo "setup: installing test requirements into $venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$stamp"
  fi
fi
echo "setup: libtorch $torch_version at $venv/libtorch"
