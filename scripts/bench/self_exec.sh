#!/usr/bin/env bash
# `baton upgrade --self` under `baton run --front http` (Node app): how long
# it takes from the request to the new image answering, with 0, 100 and 1000
# idle keep-alive client connections to carry, and how many it carried. The
# baseline, measured in the same run on the same supervisor: `baton upgrade`
# of the app. Prints a table; writes nothing.
#
#   scripts/bench/self_exec.sh            # BATON=path/to/baton ROUNDS=5 CONNS="0 100 1000"
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BATON="${BATON:-$ROOT/target/debug/baton}"
ROUNDS="${ROUNDS:-5}"
CONNS="${CONNS:-0 100 1000}"
NODE="$(command -v node)"
[ -x "$BATON" ] || { echo "no baton at $BATON: cargo build -p baton-cli (or set BATON)" >&2; exit 1; }
WORK="$(mktemp -d /tmp/bench-self-exec.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -S "$WORK/ctl/c.sock" ] && timeout 20 "$BATON" stop --control "$WORK/ctl/c.sock" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
json() { python3 -c "import json,sys;print(json.loads(sys.stdin.read().strip().splitlines()[-1])$1)"; }
median() { python3 -c 'import sys,statistics;v=[float(x) for x in sys.argv[1:]];print(round(statistics.median(v)))' "$@"; }

echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); baton: $BATON ($("$BATON" --version))"
printf '%-18s %-22s %-10s %-24s\n' "idle connections" "--self ms (median)" "carried" "app upgrade ms (median)"
for n in $CONNS; do
  port="$(free_port)"
  mkdir -p "$WORK/ctl"
  "$BATON" run --name bench-self --control "$WORK/ctl/c.sock" --front http \
    --front-max-connections 20000 --listen "http=127.0.0.1:$port" \
    --ready "http://127.0.0.1:$port/health" -- "$NODE" "$ROOT/crates/baton-tests/apps/node_server.js" \
    >"$WORK/baton.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do "$BATON" status --control "$WORK/ctl/c.sock" --timeout 1s >/dev/null 2>&1 && break; sleep 0.1; done
  # N connections, one request each, then idle (held until killed).
  python3 - "$port" "$n" >"$WORK/holder.out" 2>&1 <<'PY' &
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
conns = []
for _ in range(n):
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    c.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
    conns.append(c)
for c in conns:
    got = b""
    while b"\r\n\r\n" not in got:
        got += c.recv(4096)
print("ready", flush=True)
time.sleep(3600)
PY
  PIDS+=($!)
  for _ in $(seq 300); do grep -q ready "$WORK/holder.out" 2>/dev/null && break; sleep 0.1; done
  selfs=(); carried=""; ups=()
  for _ in $(seq "$ROUNDS"); do
    out="$("$BATON" upgrade --self --json --timeout 120s --control "$WORK/ctl/c.sock")"
    selfs+=("$(echo "$out" | json "['elapsed_ms']")")
    carried="$("$BATON" status --json --control "$WORK/ctl/c.sock" | python3 -c 'import json,sys;n=[x for x in json.load(sys.stdin)["notes"] if x.startswith("baton: ")][0];print(n.split("carried=")[1].split()[0])')"
  done
  for _ in $(seq "$ROUNDS"); do
    out="$("$BATON" upgrade --json --timeout 120s --control "$WORK/ctl/c.sock")"
    ups+=("$(echo "$out" | json "['elapsed_ms']")")
  done
  printf '%-18s %-22s %-10s %-24s\n' "$n" "$(median "${selfs[@]}")" "$carried" "$(median "${ups[@]}")"
  "$BATON" stop --control "$WORK/ctl/c.sock" >/dev/null 2>&1 || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  PIDS=()
  rm -rf "$WORK/ctl"
done
