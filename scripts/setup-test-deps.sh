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
command -v node >/dev/null || need_apt+=(nodejs)
# npm: Node's `ws` for the WebSocket tests (Debian packages it apart).
command -v npm >/dev/null || need_apt+=(npm)
command -v setpriv >/dev/null || need_apt+=(util-linux)
# systemd-socket-activate and systemd-analyze (the unit-file test).
{ command -v systemd-socket-activate && command -v systemd-analyze; } >/dev/null || need_apt+=(systemd)
command -v openssl >/dev/null || need_apt+=(openssl)
# strip: the fleet tests deliver stripped copies of the fixture binaries.
command -v strip >/dev/null || need_apt+=(binutils)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# The front tests' Java keep-alive client (scripts/bench/clients): Apache
# HttpClient 4.5 and a compiler for it.
[[ -e /usr/share/java/httpclient.jar && -e /usr/share/java/commons-codec.jar ]] \
  || need_apt+=(libhttpclient-java)
command -v javac >/dev/null || need_apt+=(default-jdk-headless)

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

# The venv, pinned: gunicorn and uvicorn for the supervisor tests,
# requests for the keep-alive client the front tests share with the benchmark,
# prometheus_client for its OpenMetrics parser (the metrics tests),
# ansible-core for the fleet play and modules (contrib/ansible; 2.19 is the
# newest that runs on Python 3.11), kubernetes-validate for the manifests in
# contrib/kubernetes (its schemas ship in the package: no network at test
# time), websockets for the WebSocket tests' Python clients. A pin that is
# missing or at another version is (re)installed.
PY_PINS=(gunicorn==27.0.1 uvicorn==0.55.0 prometheus_client==0.26.0
  requests==2.34.2 charset-normalizer==3.5.3 idna==3.20 urllib3==2.8.0 certifi==2026.10.19.post1
  ansible-core==2.19.14 kubernetes-validate==1.37.0 websockets==17.4)
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
# (A command substitution, not `< <(...)`: a broken venv python must stop
# the set-up under `set -e`.)
missing=$(.venv/bin/python - "${PY_PINS[@]}" <<'PY'
import sys
from importlib import metadata
missing = []
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have != want:
        missing.append(pin)
print(" ".join(missing))
PY
)
read -r -a need_pip <<<"$missing"
if ((${#need_pip[@]})); then
  echo "setup: installing into .venv: ${need_pip[*]}"
  .venv/bin/pip install -q --disable-pip-version-check "${need_pip[@]}"
fi

# Node packages of the test apps (Node's `ws` for the WebSocket tests),
# pinned in crates/baton-tests/apps/package.json and package-lock.json.
ws_have=$(node -p 'try { require("./crates/baton-tests/apps/node_modules/ws/package.json").version } catch (e) { "" }' 2>/dev/null || true)
ws_want=$(node -p 'require("./crates/baton-tests/apps/package.json").dependencies.ws')
if [[ "$ws_have" != "$ws_want" ]]; then
  echo "setup: installing Node packages into crates/baton-tests/apps (ws@$ws_want)"
  npm ci --prefix crates/baton-tests/apps --no-audit --no-fund --ignore-scripts --loglevel=error
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
