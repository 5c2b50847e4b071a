#!/usr/bin/env bash
# Where the time from trigger to ready goes in a baton-demo upgrade: each
# build given is started pinned to CPU 0 (as run.sh's spawn scenario does)
# with BATON_TRACE_STEPS set, and upgraded N times by `probe.py upgrade
# --trace` on CPU 1, the builds alternating. Both generations append their
# steps (CLOCK_MONOTONIC) to the trace; the probe appends the trigger (its
# SIGUSR2) and "ready" (a fresh connection answered by the new pid). Prints,
# per build, each step's median (and minimum) time since the trigger and the
# median time since the step before it, and the probe's own cost of one poll
# (`probe.py rtt` on the idle server). Writes nothing else.
#
#   scripts/bench/ready-trace.sh [--upgrades N] [--ballast-mib M] [--keep] DEMO [DEMO...]
#
# DEMO: a baton-demo binary (e.g. target/release/baton-demo, or another
# build's copy to compare with). Defaults: 20 upgrades, no ballast.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
N=20 MIB=0 KEEP=0 DEMOS=()
while (($#)); do
  case "$1" in
    --upgrades) N=$2; shift ;;
    --ballast-mib) MIB=$2; shift ;;
    --keep) KEEP=1 ;;
    -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "ready-trace.sh: unknown option $1" >&2; exit 2 ;;
    *) DEMOS+=("$(realpath "$1")") ;;
  esac
  shift
done
((${#DEMOS[@]})) || { echo "ready-trace.sh: give at least one baton-demo binary (--help)" >&2; exit 2; }
for d in "${DEMOS[@]}"; do [[ -x $d ]] || { echo "ready-trace.sh: $d is not executable" >&2; exit 2; }; done
PY=$(python3 -c 'import sys; print(sys.executable)')
WORK=$(mktemp -d /tmp/ready-trace.XXXXXX)
cleanup() {
  "$PY" "$HERE/probe.py" cleanup "$WORK" >/dev/null 2>&1 || true
  if [[ $KEEP == 1 ]]; then echo "ready-trace.sh: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

ports=()
for i in "${!DEMOS[@]}"; do
  d=$WORK/b$i; mkdir -p "$d"; port=$(free_port); ports+=("$port")
  BATON_TRACE_STEPS=$d/trace taskset -c 0 "${DEMOS[$i]}" --listen "127.0.0.1:$port" --pid-file "$d/pid" \
    --control "$d/ctl/ctl.sock" --no-state --log warn --ballast-mib "$MIB" >>"$d/log" 2>&1 &
done
for i in "${!DEMOS[@]}"; do
  d=$WORK/b$i
  for _ in $(seq 100); do [[ -s $d/pid ]] && break; sleep 0.1; done
  [[ -s $d/pid ]] || { echo "ready-trace.sh: ${DEMOS[$i]} did not start: $(tail -3 "$d/log")" >&2; exit 1; }
  timeout 60 taskset -c 1 "$PY" "$HERE/probe.py" rtt --port "${ports[$i]}" --count 50 --out "$d/rtt.json" >/dev/null
done
for r in $(seq "$N"); do
  for k in "${!DEMOS[@]}"; do
    i=$(( (k + r) % ${#DEMOS[@]} )); d=$WORK/b$i
    timeout 180 taskset -c 1 "$PY" "$HERE/probe.py" upgrade --kind baton --port "${ports[$i]}" --pidfile "$d/pid" \
      --count 1 --wait-rss-mib "$MIB" --trace "$d/trace" --out "$d/latency.jsonl" >/dev/null 2>>"$d/probe.log" \
      || echo "ready-trace.sh: upgrade $r of ${DEMOS[$i]} failed: $(tail -1 "$d/probe.log")" >&2
  done
done
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); $N upgrades per build, ballast $MIB MiB"
"$PY" - "$WORK" "${DEMOS[@]}" <<'EOF'
import json, statistics, sys
work, demos = sys.argv[1], sys.argv[2:]
for i, demo in enumerate(demos):
    d = f"{work}/b{i}"
    lines = []
    with open(f"{d}/trace") as f:
        for ln in f:
            t, pid, step = ln.rstrip("\n").split(" ", 2)
            lines.append((int(t), int(pid), step))
    lines.sort()
    ups, cur = [], None
    for t, pid, step in lines:
        if step == "probe: trigger":
            cur = {"t0": t, "steps": {}}
            ups.append(cur)
        elif cur is not None and step not in cur["steps"]:
            cur["steps"][step] = (t - cur["t0"]) / 1000
    ups = [u for u in ups if "probe: ready" in u["steps"]]
    order = {}
    for u in ups:
        for s, ms in u["steps"].items():
            order.setdefault(s, []).append(ms)
    rows = sorted(order.items(), key=lambda kv: statistics.median(kv[1]))
    rtt = json.load(open(f"{d}/rtt.json"))
    print(f"\n{demo}: {len(ups)} upgrades traced; one probe poll on the idle server: "
          f"median {rtt['median_ms']:.3f} ms (min {rtt['min_ms']:.3f})")
    print(f"  {'step':<38} {'n':>3} {'ms since trigger':>17} {'(min)':>7} {'ms since previous':>18}")
    prev = 0.0
    for s, v in rows:
        m = statistics.median(v)
        print(f"  {s:<38} {len(v):>3} {m:>17.3f} {min(v):>7.3f} {m - prev:>18.3f}")
        prev = m
EOF
