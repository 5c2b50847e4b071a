#!/usr/bin/env bash
# front-cpu.sh: CPU time per request of `baton run --front http`, two baton
# binaries A/B in the same run (for work on the front's hot path; the full
# figures are run.sh's front scenario).
#
#   scripts/bench/front-cpu.sh BATON_A BATON_B [GO_APP] [ROUNDS] [SECONDS]
#
# Both supervisors run the suite's Go app through the front, both up at
# once on CPU 0; wrk (-t1 -c64 keep-alive, on CPU 1) loads one at a time,
# alternating A/B, B/A, ... round by round. Per run: req/s (wrk) and the
# `baton run` process's own CPU time (utime + stime from /proc, its app
# not included) divided by the requests wrk completed. The table ends with
# each side's median and B ÷ A. GO_APP: a built crates/baton-tests/apps/go
# (default: built into $CARGO_TARGET_DIR/bench/go-app).
set -euo pipefail

A=${1:?usage: front-cpu.sh BATON_A BATON_B [GO_APP] [ROUNDS] [SECONDS]}
B=${2:?usage: front-cpu.sh BATON_A BATON_B [GO_APP] [ROUNDS] [SECONDS]}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
GO_APP=${3:-$TARGET/bench/go-app}
ROUNDS=${4:-6}
SECS=${5:-5}
CONNS=64
SRV_CPU=0 LOAD_CPU=1
(( $(nproc) < 2 )) && SRV_CPU=0 LOAD_CPU=0

command -v wrk >/dev/null || { echo "front-cpu.sh: wrk is not installed (apt-get install wrk)" >&2; exit 1; }
# shellcheck source=scripts/bench/small-lib.sh
. "$HERE/small-lib.sh"
build_go_app "$GO_APP"
start_run front-cpu
# cpu PID: utime + stime of the process, in clock ticks
cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

declare -A PORT PID
for side in A B; do
  bin=${!side}
  port=$(free_port)
  mkdir -p "$RUN/$side"
  taskset -c "$SRV_CPU" "$bin" run --front http --listen "http=127.0.0.1:$port" --control "$RUN/$side/ctl.sock" \
    --ready "http://127.0.0.1:$port/health" -- "$GO_APP" >"$RUN/$side/log" 2>&1 &
  PID[$side]=$!
  PIDS+=("$!")
  PORT[$side]=$port
done
for side in A B; do
  ok=0
  for _ in $(seq 100); do
    if curl -fsS -m 1 "http://127.0.0.1:${PORT[$side]}/health" >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.1
  done
  (( ok )) || { echo "front-cpu.sh: $side did not start:" >&2; tail -5 "$RUN/$side/log" >&2; exit 1; }
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:${PORT[$side]}/health" >/dev/null 2>&1
done

TICK=$(getconf CLK_TCK)
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)   A=$A   B=$B   wrk -t1 -c$CONNS -d${SECS}s, $ROUNDS rounds"
printf '%-6s %-4s %10s %10s\n' round side 'req/s' 'µs/req'
declare -A RES
for r in $(seq "$ROUNDS"); do
  order="A B"; (( r % 2 == 0 )) && order="B A"
  for side in $order; do
    c0=$(cpu "${PID[$side]}")
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${SECS}s" "http://127.0.0.1:${PORT[$side]}/health" 2>&1)
    c1=$(cpu "${PID[$side]}")
    n=$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' <<<"$out")
    rps=$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' <<<"$out")
    errs=$(sed -n 's/^ *Non-2xx or 3xx responses: *//p; s/^ *Socket errors: *//p' <<<"$out")
    us=$(awk -v c=$((c1 - c0)) -v t="$TICK" -v n="$n" 'BEGIN { printf "%.2f", c / t * 1e6 / n }')
    printf '%-6s %-4s %10.0f %10s %s\n' "$r" "$side" "$rps" "$us" "${errs:+errors: $errs}"
    RES[$side]+="$us $rps "
  done
done
python3 - "${RES[A]}" "${RES[B]}" <<'EOF'
import statistics, sys
def med(s, k):
    v = [float(x) for x in s.split()[k::2]]
    return statistics.median(v)
a, b = sys.argv[1], sys.argv[2]
print(f"median A: {med(a, 0):.2f} µs/req {med(a, 1):.0f} req/s")
print(f"median B: {med(b, 0):.2f} µs/req {med(b, 1):.0f} req/s")
print(f"B / A:    {med(b, 0) / med(a, 0):.2f} (CPU per request)   {med(b, 1) / med(a, 1):.2f} (req/s)")
EOF
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
