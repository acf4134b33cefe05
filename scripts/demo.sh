#!/usr/bin/env bash
# The main job: compress all-MiniLM-L6-v2 at several budgets and print one comparison table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_venv.sh
exec lowrank-ops demo "$@"
