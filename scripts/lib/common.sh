# Shared helpers for scripts/*: sourced, not run.
# shellcheck shell=bash
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

say() { printf '\033[1m%s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ensure_venv EXTRAS: create .venv when missing; (re)install the project when pyproject.toml changed.
ensure_venv() {
  local extras=$1 stamp want
  if [ ! -x "$PY" ]; then
    local base="" candidate
    # The first interpreter that actually runs and is 3.11+ (pyenv shims may exist but not run).
    for candidate in python3.13 python3.12 python3.11 python3; do
      command -v "$candidate" >/dev/null 2>&1 || continue
      if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
        base=$(command -v "$candidate"); break
      fi
    done
    [ -n "$base" ] || die "no Python 3.11 or newer found (install python3.11+ and python3-venv)"
    say "creating .venv with $base"
    "$base" -m venv "$VENV" || die "python venv failed (on Debian: apt-get install python3-venv)"
  fi
  stamp="$VENV/.edgeseal-installed"
  want="$extras $(sha256sum "$ROOT/pyproject.toml" | cut -c1-64)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing edgeseal[$extras] into .venv"
    "$PY" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
    "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[$extras]" \
      || die "pip install failed (see above)"
    printf '%s' "$want" > "$stamp"
  fi
}

# ensure_mosquitto: the broker binary on PATH, installed with apt when we are root.
ensure_mosquitto() {
  command -v mosquitto >/dev/null 2>&1 && return 0
  [ -x /usr/sbin/mosquitto ] && { export PATH="$PATH:/usr/sbin"; return 0; }
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing mosquitto with apt-get"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto) >/dev/null \
      || say "apt-get could not install mosquitto"
  fi
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] && { export PATH="$PATH:/usr/sbin"; return 0; }
  say "mosquitto is not installed: broker tests will skip (install the 'mosquitto' package)"
  [ "${CI:-}" = true ] && die "CI=true and no mosquitto: refusing to skip the broker tests"
  return 0
}

# ensure_softhsm: SoftHSM2 for the PKCS#11 KMS tests, installed with apt when we are root.
ensure_softhsm() {
  command -v softhsm2-util >/dev/null 2>&1 && [ -e /usr/lib/softhsm/libsofthsm2.so ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing softhsm2 with apt-get"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2) >/dev/null \
      || say "apt-get could not install softhsm2"
  fi
  command -v softhsm2-util >/dev/null 2>&1 && return 0
  say "softhsm2 is not installed: PKCS#11 KMS tests will skip (install the 'softhsm2' package)"
  [ "${CI:-}" = true ] && die "CI=true and no softhsm2: refusing to skip the PKCS#11 tests"
  return 0
}

# ensure_mpy_stubs: MicroPython board stubs for `firmware check --typecheck`, one folder per board
# (the esp32 and rp2 packages ship the same module names, so they cannot share site-packages).
ensure_mpy_stubs() {
  local board
  for board in esp32 rp2; do
    [ -f "$VENV/mpy-stubs/$board/machine.pyi" ] && continue
    say "installing micropython-$board-stubs into .venv/mpy-stubs/$board"
    "$PY" -m pip install -q --disable-pip-version-check --target "$VENV/mpy-stubs/$board" \
      "micropython-$board-stubs" >/dev/null || say "could not install micropython-$board-stubs"
  done
}
