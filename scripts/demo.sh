#!/usr/bin/env bash
# The run command: set up .venv, then `foveate demo` (arguments pass through: bash scripts/demo.sh --help).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
exec "$ROOT/.venv/bin/foveate" demo "$@"
