#!/usr/bin/env bash
# One entry point for developers and CI. Idempotent: a second run skips installs.
#
#   bash scripts/dev.sh demo    install, then fine-tune the tiny CPU default with ChunkFlow
#                               (2 processes) and compare it with Megatron's schedule
#   bash scripts/dev.sh test    install, then run the test suite (both megatron-core ends)
#   bash scripts/dev.sh setup   install only
#
# Environment: PYTHON (interpreter for the venv, default python3), CHUNKFLOW_VENV (default
# .venv in the checkout), TORCH_VERSION (default 2.13.0), TORCH_INDEX_URL (optional pip
# index for torch, e.g. PyTorch's CPU wheel index on a CPU machine without local wheels).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${CHUNKFLOW_VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
MCORE_NEW=${MCORE_NEW:-0.19.2}   # newest supported megatron-core, tested in its own venv

_stamp() { cat pyproject.toml scripts/dev.sh | sha1sum | cut -c1-12; }

_install_torch() {  # $1 = venv. Torch first and pinned: an unpinned torch pulls CUDA builds.
  if ! "$1/bin/python" -c "import torch" 2>/dev/null; then
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      "$1/bin/pip" install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
    else
      "$1/bin/pip" install -q "torch==$TORCH_VERSION"
    fi
  fi
}

_drop_old_name() {  # $1 = venv. The distribution was "chunkflow" before it became chunkflow-megatron.
  if "$1/bin/pip" show -q chunkflow >/dev/null 2>&1; then "$1/bin/pip" uninstall -q -y chunkflow; fi
}

setup() {
  local stamp="$VENV/.chunkflow-$(_stamp)"
  [ -f "$stamp" ] && return 0
  echo "== installing chunkflow into $VENV"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  _install_torch "$VENV"
  _drop_old_name "$VENV"
  "$VENV/bin/pip" install -q -e ".[dev]"
  rm -f "$VENV"/.chunkflow-*
  touch "$stamp"
}

setup_mcore_new() {  # megatron-core 0.17+ declares Python >= 3.12; its wheel runs on 3.11.
  local venv="$VENV-mcore${MCORE_NEW//./}"
  local stamp="$venv/.chunkflow-$(_stamp)"
  [ -f "$stamp" ] && return 0
  echo "== installing chunkflow with megatron-core $MCORE_NEW into $venv"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  _install_torch "$venv"
  local pyminor
  pyminor=$("$venv/bin/python" -c "import sys; print(sys.version_info[1])")
  if [ "$pyminor" -ge 12 ]; then
    "$venv/bin/pip" install -q "megatron-core==$MCORE_NEW"
  else
    # --no-deps: with --ignore-requires-python pip would also try to build numpy from source.
    "$venv/bin/pip" install -q --no-deps --ignore-requires-python "megatron-core==$MCORE_NEW"
    "$venv/bin/pip" install -q numpy "packaging>=24.2" psutil
  fi
  _drop_old_name "$venv"
  "$venv/bin/pip" install -q --no-deps -e .
  "$venv/bin/pip" install -q pyyaml tokenizers pytest hypothesis safetensors matplotlib "transformers>=4.45"
  rm -f "$venv"/.chunkflow-*
  touch "$stamp"
}

demo() {
  setup
  # chunkflow/demo.py: torchrun on parallel.tensor x parallel.pipeline processes, ChunkFlow
  # training, then the first batches again under megatron's schedule, side by side.
  "$VENV/bin/python" -m chunkflow.demo --config configs/tiny_cpu.yaml "$@"
}

run_tests() {
  setup
  echo "== test suite (megatron-core $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("megatron-core"))'))"
  # Each run gets its own pytest temp root: concurrent sessions sharing the default one
  # can prune each other's directories.
  "$VENV/bin/python" -m pytest -q --basetemp "$(mktemp -d)" "$@"
  setup_mcore_new
  local venv="$VENV-mcore${MCORE_NEW//./}"
  echo "== megatron-core $MCORE_NEW: tests marked 'megatron' (not 'once')"
  # Tests marked "once" (launch, signals, tools, the recipe end to end) do not depend on
  # megatron-core's version; the main venv ran them.
  "$venv/bin/python" -m pytest -q -m "megatron and not once" --basetemp "$(mktemp -d)" "$@"
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup; setup_mcore_new ;;
  demo) demo "$@" ;;
  test) run_tests "$@" ;;
  *) echo "usage: bash scripts/dev.sh {demo|test|setup} [args]" >&2; exit 2 ;;
esac
