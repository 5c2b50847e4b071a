#!/usr/bin/env bash
# The demo: build baton-demo, start it, upgrade it 5 times under keep-alive
# load (wrk), show that nothing failed, then leave it running.
#   scripts/demo.sh [--port 8080] [--no-load]
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=8080
LOAD=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    --no-load) LOAD=0; shift ;;
    -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

if [[ $LOAD == 1 ]] && ! command -v wrk >/dev/null; then
  echo "demo: installing wrk (load generator)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk
fi

echo "demo: building (release)"
cargo build --release -q -p baton-demo -p baton-cli
RUN=$(mktemp -d /tmp/baton-demo.XXXXXX)
PIDFILE="$RUN/demo.pid"
CTL="$RUN/ctl/control.sock"
URL="http://127.0.0.1:$PORT"
target/release/baton-demo --listen "127.0.0.1:$PORT" --pid-file "$PIDFILE" --control "$CTL" 2>"$RUN/demo.log" &
for _ in $(seq 1 100); do curl -fs "$URL/health" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "$URL/" || { echo "demo: the server did not start; see $RUN/demo.log" >&2; cat "$RUN/demo.log" >&2; exit 1; }

if [[ $LOAD == 1 ]]; then
  echo "demo: 20 s of wrk keep-alive load (64 connections) while upgrading 5 times"
  wrk -t2 -c64 -d20s --latency "$URL/" > "$RUN/wrk.txt" &
  WRK=$!
  sleep 2
  for i in 1 2 3 4 5; do
    target/release/baton upgrade --control "$CTL" || echo "demo: upgrade $i failed (see above)"
    sleep 3
  done
  wait $WRK
  cat "$RUN/wrk.txt"
  grep -q "Socket errors\|Non-2xx" "$RUN/wrk.txt" && echo "demo: wrk saw errors (see above)" || echo "demo: 0 errors across 5 upgrades"
fi

cat <<MSG

baton-demo is running at $URL (pid $(cat "$PIDFILE"), logs in $RUN/demo.log).
  curl $URL/version
  kill -USR2 \$(cat $PIDFILE)                      # upgrade with a signal
  target/release/baton upgrade --control $CTL      # upgrade, with progress and the result
  target/release/baton status --control $CTL
  wrk -t2 -c64 -d30s $URL/                          # load it while you upgrade
Ctrl-C stops it.
MSG
trap 'kill -TERM $(cat "$PIDFILE") 2>/dev/null; exit 0' INT TERM
while kill -0 "$(cat "$PIDFILE" 2>/dev/null)" 2>/dev/null; do sleep 1; done
