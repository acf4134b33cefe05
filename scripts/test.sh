#!/usr/bin/env bash
# All test lanes that run without a GPU (reference, interpreter, compile, emulation); the gpu lane skips.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_venv.sh
exec python -m pytest -q "$@"
