#!/usr/bin/env bash
# Upgrade under load: wrk against baton-demo for 20 s while 10 upgrades fire,
# keep-alive and Connection: close, next to a steady run without upgrades
# (the baseline, same run, same machine); then the handoff-scale benchmark.
#   scripts/bench-upgrade.sh [--quick]     (--quick: 4 s, 2 upgrades, 200 conns)
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0; [[ "${1:-}" == "--quick" ]] && QUICK=1
DUR=20; UPGRADES=10; SCALE="1000 10000"
if [[ $QUICK == 1 ]]; then DUR=4; UPGRADES=2; SCALE="200"; fi
command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)" >&2; exit 1; }
cargo build --release -q -p baton-demo -p baton-tests --bins
BIN=target/release/baton-demo
RUN=$(mktemp -d /tmp/baton-bench.XXXXXX)
trap 'pkill -f "$RUN/server" 2>/dev/null || true; rm -rf "$RUN"' EXIT
cp "$BIN" "$RUN/server"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT/"
"$RUN/server" --listen "127.0.0.1:$PORT" --pid-file "$RUN/pid" --control "$RUN/ctl/ctl.sock" --log warn 2>"$RUN/log" &
for _ in $(seq 100); do curl -fs "$URL" >/dev/null 2>&1 && break; sleep 0.1; done

upgrade_loop() {   # fires $UPGRADES upgrades spread over the run, each after the previous completed
  local gap; gap=$(python3 -c "print(($DUR - 2) / $UPGRADES)")
  sleep 1
  for _ in $(seq "$UPGRADES"); do
    local old; old=$(cat "$RUN/pid")
    kill -USR2 "$old"
    for _ in $(seq 500); do [[ -e /proc/$old ]] || break; sleep 0.01; done
    sleep "$gap"
  done
}

# name, upgrades?, extra wrk args...
run() {
  local name="$1" up="$2" out="$RUN/$1.txt"; shift 2
  if [[ $up == 1 ]]; then upgrade_loop & fi
  local ul=$!
  wrk -t2 -c64 -d"${DUR}s" --latency "$@" -s scripts/bench/count-closes.lua "$URL" > "$out" 2>&1
  [[ $up == 1 ]] && wait "$ul"
  local rps p50 p99 errs closes non2xx
  rps=$(awk '/Requests\/sec/ {print $2}' "$out")
  p50=$(awk '$1=="50%" {print $2}' "$out")
  p99=$(awk '$1=="99%" {print $2}' "$out")
  errs=$(awk -F'[ ,]+' '/Socket errors/ {printf "%s/%s/%s/%s", $4, $6, $8, $10}' "$out"); errs=${errs:-0/0/0/0}
  closes=$(sed -n 's/BATON closes=\([0-9]*\).*/\1/p' "$out")
  non2xx=$(sed -n 's/.*non2xx=\([0-9]*\)/\1/p' "$out")
  [[ $# -gt 0 ]] && closes="$closes (asked)"
  printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n" "$name" "$([[ $up == 1 ]] && echo "$UPGRADES" || echo 0)" "$rps" "$p50" "$p99" "$errs" "$non2xx" "$closes"
}

echo "## Upgrade under load — $(date -u +%F), $(nproc) cores, $(uname -r)"
echo
echo "\`wrk -t2 -c64 -d${DUR}s --latency [-H 'Connection: close']\`; errors are connect/read/write/timeout;"
echo "\"closes\" counts responses carrying Connection: close that the client did not ask for (a reconnect"
echo "the server forced); with Connection: close the client asks for it on every request."
echo
echo "| run | upgrades | req/s | p50 | p99 | socket errors c/r/w/t | non-2xx | closes |"
echo "|---|---:|---:|---:|---:|---|---:|---:|"
run "keep-alive, steady (baseline)" 0
run "keep-alive, upgrading" 1
run "Connection: close, steady (baseline)" 0 -H "Connection: close"
run "Connection: close, upgrading" 1 -H "Connection: close"
gen=$(curl -fs "${URL}version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])')
echo
echo "generation after the runs: $gen (expected $((1 + 2 * UPGRADES)))"
echo
# shellcheck disable=SC2086
target/release/bench-handoff --server "$BIN" $SCALE
