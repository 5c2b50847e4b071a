#!/usr/bin/env bash
# Install what the test suite needs, if it is missing. Idempotent.
# Debian packages need root (or sudo); the Python venv goes to .venv/.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
command -v wrk >/dev/null || need_apt+=(wrk)
command -v h2load >/dev/null || need_apt+=(nghttp2-client)
command -v go >/dev/null || need_apt+=(golang-go)
command -v setpriv >/dev/null || need_apt+=(util-linux)
command -v systemd-socket-activate >/dev/null || need_apt+=(systemd)
command -v openssl >/dev/null || need_apt+=(openssl)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)

if ((${#need_apt[@]})); then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "setup: need root or sudo to install ${need_apt[*]}" >&2; exit 1; }
    SUDO=sudo
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

if [[ ! -x .venv/bin/gunicorn || ! -x .venv/bin/uvicorn ]]; then
  echo "setup: creating .venv with gunicorn and uvicorn"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check gunicorn uvicorn
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
