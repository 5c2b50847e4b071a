#!/usr/bin/env bash
# front-peers.sh: what a reverse proxy costs per request here — `baton run
# --front http` next to nginx (proxy_pass, upstream keepalive) and HAProxy
# (mode http, http-reuse always) in front of the same Go app, and the Go app
# direct, in the same run; baton's front over loopback TCP (the default)
# and with --front-upstream unix. The context for run.sh's front scenario (its
# goal: through the front ≥ 0.5 × direct max req/s).
#
#   scripts/bench/front-peers.sh [BATON] [ROUNDS] [SECONDS]
#
# Every server side (proxy and app) is pinned to CPU 0, wrk (-t1 -c64
# keep-alive, GET /health) to CPU 1, as in run.sh. The ways take turns,
# the order rotated every round. Per run: req/s, the ratio to the direct
# run of the same round, and the CPU time per request (utime + stime from
# /proc ÷ wrk's requests) of the proxy's processes and of the app's.
# BATON: a release build of baton (default: target/release/baton, built if
# missing). Needs wrk, nginx (nginx-light) and haproxy; a missing one is an
# error, not a skipped row.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BATON=${1:-$TARGET/release/baton}
ROUNDS=${2:-5}
SECS=${3:-5}
CONNS=64
SRV_CPU=0 LOAD_CPU=1
(( $(nproc) < 2 )) && SRV_CPU=0 LOAD_CPU=0
GO_APP=$TARGET/bench/go-app
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

for t in wrk "$NGINX" "$HAPROXY" go curl; do
  command -v "$t" >/dev/null || { echo "front-peers.sh: $t is not installed (apt-get install wrk nginx-light haproxy golang-go curl)" >&2; exit 1; }
done
if [[ ! -x $BATON ]]; then
  (cd "$ROOT" && cargo build --release -p baton-cli)
fi
# shellcheck source=scripts/bench/small-lib.sh
. "$HERE/small-lib.sh"
build_go_app "$GO_APP"
start_run front-peers
# ticks PID...: utime + stime of the processes and their threads, summed
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done; echo "$t"; }
# tree PID: PID and its descendants
tree() {
  local p=$1 c
  echo "$p"
  for c in $(cat "/proc/$p/task/"*/children 2>/dev/null); do tree "$c"; done
}
wait_http() {
  local port=$1 name=$2
  for _ in $(seq 100); do
    curl -fsS -m 1 "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "front-peers.sh: $name did not answer on $port:" >&2
  tail -5 "$RUN/$name.log" >&2 || true
  exit 1
}

declare -A PORT PROXY APP
# The Go app under `baton run` (direct: the supervisor only supervises);
# also the upstream of nginx and HAProxy.
PORT[direct]=$(free_port)
taskset -c "$SRV_CPU" "$BATON" run --listen "http=127.0.0.1:${PORT[direct]}" --control "$RUN/direct.sock" \
  --ready "http://127.0.0.1:${PORT[direct]}/health" -- "$GO_APP" >"$RUN/direct.log" 2>&1 &
PIDS+=("$!"); SUP_DIRECT=$!
PORT[front]=$(free_port)
taskset -c "$SRV_CPU" "$BATON" run --front http --listen "http=127.0.0.1:${PORT[front]}" --control "$RUN/front.sock" \
  --ready "http://127.0.0.1:${PORT[front]}/health" -- "$GO_APP" >"$RUN/front.log" 2>&1 &
PIDS+=("$!"); SUP_FRONT=$!
PORT[unix]=$(free_port)
taskset -c "$SRV_CPU" "$BATON" run --front http --front-upstream unix --listen "http=127.0.0.1:${PORT[unix]}" \
  --control "$RUN/unix.sock" --ready "http://127.0.0.1:${PORT[unix]}/health" -- "$GO_APP" >"$RUN/unix.log" 2>&1 &
PIDS+=("$!"); SUP_UNIX=$!
wait_http "${PORT[direct]}" direct
wait_http "${PORT[front]}" front
wait_http "${PORT[unix]}" unix

PORT[nginx]=$(free_port)
cat >"$RUN/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $RUN/nginx.pid;
error_log $RUN/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream app { server 127.0.0.1:${PORT[direct]}; keepalive 64; }
  server {
    listen 127.0.0.1:${PORT[nginx]};
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$remote_addr;
    }
  }
}
EOF
taskset -c "$SRV_CPU" "$NGINX" -c "$RUN/nginx.conf" -p "$RUN" >"$RUN/nginx.log" 2>&1 &
PIDS+=("$!"); NGINX_PID=$!
PORT[haproxy]=$(free_port)
cat >"$RUN/haproxy.cfg" <<EOF
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind 127.0.0.1:${PORT[haproxy]}
  option forwardfor
  default_backend b
backend b
  server app 127.0.0.1:${PORT[direct]}
EOF
taskset -c "$SRV_CPU" "$HAPROXY" -db -f "$RUN/haproxy.cfg" >"$RUN/haproxy.log" 2>&1 &
PIDS+=("$!"); HAPROXY_PID=$!
wait_http "${PORT[nginx]}" nginx
wait_http "${PORT[haproxy]}" haproxy

app_of() { cat "/proc/$1/task/"*/children 2>/dev/null | awk '{ print $1; exit }'; }
GO_DIRECT=$(app_of "$SUP_DIRECT")
GO_FRONT=$(app_of "$SUP_FRONT")
GO_UNIX=$(app_of "$SUP_UNIX")
# proxy processes (empty: none) and app process, per way
PROXY[direct]="" APP[direct]=$GO_DIRECT
PROXY[front]=$SUP_FRONT APP[front]=$GO_FRONT
PROXY[unix]=$SUP_UNIX APP[unix]=$GO_UNIX
PROXY[nginx]="$(tree "$NGINX_PID" | tr '\n' ' ')" APP[nginx]=$GO_DIRECT
PROXY[haproxy]=$HAPROXY_PID APP[haproxy]=$GO_DIRECT
WAYS=(direct front unix nginx haproxy)
for w in "${WAYS[@]}"; do
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:${PORT[$w]}/health" >/dev/null 2>&1
done

TICK=$(getconf CLK_TCK)
NAME_direct="Go app, direct"
NAME_front="baton run --front http"
NAME_unix="baton --front-upstream unix"
NAME_nginx="nginx $("$NGINX" -v 2>&1 | sed 's#.*/##') proxy_pass"
NAME_haproxy="HAProxy $("$HAPROXY" -v 2>&1 | head -1 | awk '{print $3}') mode http"
echo "front-peers.sh $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "machine: $(nproc) CPUs ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "servers (proxy + app) on CPU $SRV_CPU, taskset -c $LOAD_CPU wrk -t1 -c$CONNS -d${SECS}s GET /health, $ROUNDS rounds, ways rotated"
echo
printf '| %-5s | %-34s | %9s | %7s | %11s | %9s | %6s |\n' round way 'req/s' 'ratio' 'proxy µs/req' 'app µs/req' errors
printf '|%s|\n' "-------|------------------------------------|-----------|---------|--------------|-----------|--------"
declare -A RES
for r in $(seq "$ROUNDS"); do
  k=$(( (r - 1) % ${#WAYS[@]} ))
  order=("${WAYS[@]:$k}" "${WAYS[@]:0:$k}")
  declare -A RPS=()
  lines=()
  for w in "${order[@]}"; do
    # shellcheck disable=SC2086
    p0=$( [[ -n ${PROXY[$w]} ]] && ticks ${PROXY[$w]} || echo 0 ); a0=$(ticks "${APP[$w]}")
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${SECS}s" "http://127.0.0.1:${PORT[$w]}/health" 2>&1)
    # shellcheck disable=SC2086
    p1=$( [[ -n ${PROXY[$w]} ]] && ticks ${PROXY[$w]} || echo 0 ); a1=$(ticks "${APP[$w]}")
    n=$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' <<<"$out")
    rps=$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' <<<"$out")
    errs=$(sed -n 's/^ *Non-2xx or 3xx responses: *//p; s/^ *Socket errors: *//p' <<<"$out" | tr '\n' ' ')
    pus=$(awk -v c=$((p1 - p0)) -v t="$TICK" -v n="$n" 'BEGIN { printf "%.1f", c / t * 1e6 / n }')
    aus=$(awk -v c=$((a1 - a0)) -v t="$TICK" -v n="$n" 'BEGIN { printf "%.1f", c / t * 1e6 / n }')
    RPS[$w]=$rps
    lines+=("$w $rps $pus $aus ${errs:-0}")
  done
  for l in "${lines[@]}"; do
    read -r w rps pus aus errs <<<"$l"
    ratio=$(awk -v a="$rps" -v d="${RPS[direct]}" 'BEGIN { printf "%.3f", a / d }')
    name=NAME_$w
    printf '| %-5s | %-34s | %9.0f | × %5s | %12s | %9s | %6s |\n' "$r" "${!name}" "$rps" "$ratio" \
      "$([[ $w == direct ]] && echo - || echo "$pus")" "$aus" "$errs"
    RES[$w]+="$ratio $pus $aus "
  done
done
echo
echo "Medians over the rounds:"
echo
printf '| %-34s | %7s | %12s | %10s |\n' way ratio 'proxy µs/req' 'app µs/req'
printf '|%s|\n' "------------------------------------|---------|--------------|------------"
for w in "${WAYS[@]}"; do
  name=NAME_$w
  python3 - "${!name}" "${RES[$w]}" "$w" <<'EOF'
import statistics, sys
name, vals, way = sys.argv[1], [float(x) for x in sys.argv[2].split()], sys.argv[3]
med = lambda k: statistics.median(vals[k::3])
proxy = "-" if way == "direct" else f"{med(1):.1f}"
print(f"| {name:<34} | × {med(0):5.3f} | {proxy:>12} | {med(2):>10.1f} |")
EOF
done
echo
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
