#!/usr/bin/env bash
# Creates the project's own virtual environment (.venv) when missing and installs the package
# with its test, demo and bench (plots) extras into it. Sourced by scripts/demo.sh and scripts/test.sh.
# LOWRANK_OPS_TORCH picks the torch requirement (default: the CPU build these machines carry).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip warns about every index folder this machine's pip.conf names but lacks: drop that noise only
quiet_pip() { python -m pip install -q "$@" 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'; }
if ! python -c "import torch" 2>/dev/null; then
  quiet_pip "${LOWRANK_OPS_TORCH:-torch==2.13.0}"
fi
quiet_pip -e ".[test,demo,bench]"
