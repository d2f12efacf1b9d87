#!/usr/bin/env bash
# Create (or update) the project's virtualenv in .venv and install foveate into it, editable,
# with the test, LSL and Pupil extras. Safe to run again: it skips what is already done.
#
#   bash scripts/setup.sh            # PYTHON=python3.12 bash scripts/setup.sh to pick the interpreter
#   FOVEATE_SETUP_FORCE=1 bash scripts/setup.sh   # reinstall even if nothing changed
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
VENV_PY="$VENV/bin/python"
EXTRAS="test,lsl,pupil"
# Records what the last successful install was made from, so an unchanged tree skips pip.
STAMP="$VENV/.foveate-setup-stamp"

say() { echo "[setup] $*"; }
trap 'echo "[setup] failed at line $LINENO" >&2' ERR

# The machines' pip config names local index folders that are partly empty, and pip warns once per
# package for each; those lines would bury real errors, so only they are dropped.
pip_quiet() {
  "$VENV_PY" -m pip --quiet "$@" 2>&1 \
    | { grep -v -e 'is ignored: it is neither a file nor a directory' || true; }
}

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "[setup] error: '$PYTHON' not found; install Python >= 3.11 or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "[setup] error: $("$PYTHON" --version 2>&1) is too old; foveate needs Python >= 3.11 (set PYTHON=...)" >&2
  exit 1
fi

if [ -x "$VENV_PY" ] && "$VENV_PY" -c 'import sys' >/dev/null 2>&1; then
  say "virtualenv $VENV exists ($("$VENV_PY" --version 2>&1))"
else
  if [ -e "$VENV" ]; then
    say "virtualenv $VENV is broken; recreating it"
    rm -rf "$VENV"
  fi
  say "creating virtualenv $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi

want_stamp="$("$VENV_PY" --version 2>&1) extras=$EXTRAS pyproject=$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -z "${FOVEATE_SETUP_FORCE:-}" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
   && "$VENV_PY" -I -c 'import foveate' >/dev/null 2>&1; then
  say "foveate[$EXTRAS] already installed from this pyproject.toml; nothing to do"
  exit 0
fi

say "upgrading pip"
pip_quiet install --upgrade pip

say "installing foveate (editable) with extras [$EXTRAS]; the first time this downloads torch (~5 GB, a few minutes)"
start=$SECONDS
pip_quiet install -e ".[$EXTRAS]"
echo "$want_stamp" > "$STAMP"
say "installed in $((SECONDS - start)) s: $("$VENV_PY" -c 'import torch; print("torch", torch.__version__)')"
