#!/usr/bin/env bash
# baton against its peers, side by side, in one run (issues 9, 14 and 18).
#
#   scripts/bench/run.sh [--write-docs] [--quick] [--only NAME[,NAME]] [--rounds N]
#                        [--duration S] [--upgrades N] [--latency-count N]
#                        [--server-cpu N] [--load-cpu N] [--bin-dir DIR] [--keep]
#                        [--ws-conns N] [--tls-conns N]
#
# Prints one Markdown report on stdout (progress on stderr) and keeps a copy
# in target/bench/latest.md. --write-docs also writes docs/benchmarks.md and
# the README's benchmark summary (between its bench-summary markers) from
# that report; it needs a full run (no --quick, no --only): the figures in
# the docs are only ever written by this script.
#
# How it measures: every server runs on CPU --server-cpu (default 0), every
# client (wrk -t1, the probes, the load clients) on --load-cpu (default 1),
# with taskset. Peers alternate round by round (the order rotates), over
# --rounds rounds (default 5); figures are the median with min-max.
#
# Scenarios (each a table in the report):
#   load      wrk -t1 -c64 -d8s, keep-alive and Connection: close, 2 upgrades
#             (--upgrades) in each run, per round; failures per upgrade
#   idle      64 keep-alive connections idle through one upgrade, per round
#   steady    baton-demo vs the same handler on plain hyper (--plain): wrk
#             -t1 -c64, 5 alternating rounds of 5 s, the ratio per round
#   latency   trigger -> new generation ready -> old gone, 20 rounds
#   handoff   bench-handoff: 1k and 10k idle connections handed over
#   spawn     bench-spawn (fork+pre_exec vs posix_spawn) at 20 and 2048 MiB
#             resident, and trigger -> ready of baton-demo --ballast-mib 20
#             vs 2048, in the default (dynamic) build and, in a full run, the
#             static one (scripts/build-static.sh), 20 upgrades each, rotating
#   h2        Node's http2 client (16 sessions x 8 streams, h2c) through 2
#             upgrades per round: ok/refused/retry/failed streams per upgrade
#   memory    RSS of baton-demo and of the plain server; the `baton run`
#             supervisor's RSS and RssAnon at start, after 10 and 100
#             upgrades (static build and `cargo install` build)
#   clients   Java HttpClient 4.5, Node http.Agent, Python requests (8
#             workers, 0-40 ms idle gaps) through 8 upgrades: errors
#   steering  uvicorn under `baton run` with and without steering, wrk -c8
#             Connection: close, 10 upgrades per run, 3 runs each
#   ws        1,000 WebSockets (a message a second each) through one upgrade:
#             how many survive on their connection, how many are closed (by
#             code) or cut, and the time from the trigger to the old
#             generation gone; baton-demo's /ws against nginx and HAProxy
#             reloading in front of the same backend (baton-demo's /ws, not
#             upgraded) with worker_shutdown_timeout / hard-stop-after 10 s.
#             Not in --quick's default list: --quick --only ws (100
#             connections, baton-demo; add nginx-reload,haproxy for those;
#             --ws-conns N for another count)
#   tls       idle HTTPS keep-alive connections (Python ssl, TLS 1.3; 200,
#             --tls-conns N) through 3 upgrades per round: after each, every
#             connection is checked and used once; how many answer on their
#             own socket and how many TLS handshakes each upgrade costs
#             (closed connections reconnect); baton-demo's HTTPS listener vs
#             nginx (ssl) and HAProxy (ssl crt) terminating TLS, reloaded.
#             Not in --quick's default list: --quick --only tls
#   front     `baton run --front http` (issue 17): the suite's Go app under
#             `baton run` directly, through the front and through the front
#             with --front-upstream unix, all up at once, the order rotated
#             every round: max req/s (wrk -t1 -c64 -d5s
#             keep-alive, GET /health; CPU time per request), then p99 at
#             fixed rates of half and a quarter of the direct median (oha -q
#             --latency-correction, pinned, cargo-installed into
#             target/bench/oha), 6 s each; the supervisor's VmRSS, RssAnon
#             and threads idle, under the max-rate load (sampled) and after.
#             The clients scenario has a `baton run --front http` row too.
#             Alone: --only front,baton-run (clients too: front,clients,baton-run)
# Peers: baton-demo baton-run nginx-binary nginx-reload haproxy
#        haproxy-idle-close tableflip pingora ecdysis stop-start
# --only takes peer and/or scenario names (e.g. --only baton-demo,latency).
# --quick: seconds instead of minutes, baton-demo only (plus the plain
# baseline), scenarios load idle steady latency handoff spawn h2 memory,
# wrk -c16;
# the test suite runs it with its debug build (--bin-dir) to check the whole
# chain end to end: its figures mean nothing and it never writes docs.
# --bin-dir DIR: take baton-demo, bench-handoff, bench-spawn and baton from
# DIR instead of a release build.
#
# Installs what the peers need when it is missing (apt-get: nginx-light,
# haproxy, golang-go + golang-github-cloudflare-tableflip-dev, cmake, nodejs,
# libhttpclient-java + a JDK; pip into target/bench/venv from
# scripts/bench/requirements.txt) and builds pingora and ecdysis (their own
# lockfiles), the suite's Go app, and oha (front: cargo install --locked of
# a pinned version into target/bench/oha, once; needs libssl-dev). A peer
# that cannot be installed or built is a failure of the run: it is named
# with its reason in the report and the run exits 1.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
HERE=$ROOT/scripts/bench
APPS=$ROOT/crates/baton-tests/apps
CARGO_TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
# shellcheck source=scripts/bench/lib.sh
source "$HERE/lib.sh"
# shellcheck source=scripts/bench/peers.sh
source "$HERE/peers.sh"

TLS_CONNS_ARG="" WS_CONNS_ARG="" QUICK=0 ONLY="" DUR="" ROUNDS="" LATN="" KEEP=0 BIN_DIR="" UPGRADES="" WRITE_DOCS=0
SRV_CPU=0 LOAD_CPU=1
# ws scenario: the stated limit on an old proxy worker's life after a reload
# (nginx worker_shutdown_timeout, HAProxy hard-stop-after), seconds.
WS_STOP_AFTER=10
ARGS_ECHO="$*"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --write-docs) WRITE_DOCS=1 ;;
    --only) ONLY="$2"; shift ;;
    --only=*) ONLY="${1#--only=}" ;;
    --duration) DUR="$2"; shift ;;
    --rounds) ROUNDS="$2"; shift ;;
    --upgrades) UPGRADES="$2"; shift ;;
    --latency-count) LATN="$2"; shift ;;
    --server-cpu) SRV_CPU="$2"; shift ;;
    --load-cpu) LOAD_CPU="$2"; shift ;;
    --bin-dir) BIN_DIR="$(cd "$2" && pwd)"; shift ;;
    --keep) KEEP=1 ;;
    --ws-conns) WS_CONNS_ARG="$2"; shift ;;
    --tls-conns) TLS_CONNS_ARG="$2"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $WRITE_DOCS == 1 && ( $QUICK == 1 || -n $ONLY ) ]]; then
  echo "run.sh: --write-docs needs a full run (no --quick, no --only)" >&2; exit 2
fi
if (( $(nproc) < 2 )); then
  echo "run.sh: one CPU: servers and clients share it (figures are not comparable with a 2-core run)" >&2
  SRV_CPU=0 LOAD_CPU=0
fi
pin_cpus

ALL_PEERS="baton-demo baton-run nginx-binary nginx-reload haproxy haproxy-idle-close tableflip pingora ecdysis stop-start"
ALL_SCEN="load idle steady latency handoff spawn h2 memory clients steering ws tls front"
if [[ $QUICK == 1 ]]; then
  DUR=${DUR:-3}; ROUNDS=${ROUNDS:-1}; LATN=${LATN:-5}; UPGRADES=${UPGRADES:-2}
  SCALE="200" FIRST=0.5 STEADY_DUR=2 STEADY_ROUNDS=1 BALLAST="20 256" H2_UPGRADES=2
  SUP_COUNT=5 SUP_AT="2,5" CLIENT_UPGRADES=2 STEER_RUNS=1 STEER_UPGRADES=2
  FRONT_DUR=2 FRONT_RATE_DUR=2 FRONT_ROUNDS=${ROUNDS}
  # fewer connections: a debug build on one CPU would time some of 64 out
  CONNS=16 WS_CONNS=100 TLS_CONNS=50 TLS_UPGRADES=3
  PEERS="baton-demo" SCEN="load idle steady latency handoff spawn h2 memory"
else
  DUR=${DUR:-8}; ROUNDS=${ROUNDS:-5}; LATN=${LATN:-20}; UPGRADES=${UPGRADES:-2}
  SCALE="1000 10000" FIRST=1.5 STEADY_DUR=5 STEADY_ROUNDS=$ROUNDS BALLAST="20 2048" H2_UPGRADES=2
  SUP_COUNT=100 SUP_AT="10,100" CLIENT_UPGRADES=8 STEER_RUNS=3 STEER_UPGRADES=10
  FRONT_DUR=5 FRONT_RATE_DUR=6 FRONT_ROUNDS=${ROUNDS}
  CONNS=64 WS_CONNS=1000 TLS_CONNS=200 TLS_UPGRADES=3
  PEERS=$ALL_PEERS SCEN=$ALL_SCEN
fi
[[ -n $WS_CONNS_ARG ]] && WS_CONNS=$WS_CONNS_ARG
[[ -n $TLS_CONNS_ARG ]] && TLS_CONNS=$TLS_CONNS_ARG
if [[ -n $ONLY ]]; then
  sel_peers="" sel_scen=""
  for n in ${ONLY//,/ }; do
    if [[ " $ALL_PEERS " == *" $n "* ]]; then sel_peers+=" $n"
    elif [[ " $ALL_SCEN " == *" $n "* ]]; then sel_scen+=" $n"
    else echo "run.sh: --only: unknown name '$n' (peers: $ALL_PEERS; scenarios: $ALL_SCEN)" >&2; exit 2
    fi
  done
  [[ -n $sel_peers ]] && PEERS=$sel_peers
  [[ -n $sel_scen ]] && SCEN=$sel_scen
fi
want_peer() { [[ " $PEERS " == *" $1 "* ]]; }
want() { [[ " $SCEN " == *" $1 "* ]]; }
# rotate R WORD...: the words, starting at the R-th (round R's order)
rotate() { local r=$1; shift; local a=("$@") n=$# i; for ((i = 0; i < n; i++)); do echo "${a[$(( (i + r - 1) % n ))]}"; done; }
usable() { want_peer "$1" && ! failed "$1"; }

for c in wrk curl taskset python3; do
  command -v "$c" >/dev/null || { echo "run.sh: $c is required (apt-get install wrk curl util-linux python3)" >&2; exit 1; }
done
# the interpreter itself, not a wrapper (a pyenv shim costs ~0.1 s a start)
PY=$(python3 -c 'import sys; print(sys.executable)')

RUN=$(mktemp -d /tmp/baton-bench.XXXXXX)
RES=$RUN/results.jsonl
BIN=$RUN/bin
mkdir -p "$BIN"
: > "$RES"
PROBE=(taskset -c "$LOAD_CPU" "$PY" "$HERE/probe.py")
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  # Every process this run started, by pid (pid files, their descendants,
  # anything running from $RUN), then the background jobs.
  "$PY" "$HERE/probe.py" cleanup "$RUN" 2>/dev/null || true
  local j; for j in $(jobs -p); do kill "$j" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ $KEEP == 1 ]]; then echo "run.sh: kept $RUN" >&2; else rm -rf "$RUN"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
T_START=$(date +%s)
dirty=$(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l)
record kind=meta args="$ARGS_ECHO" cmd="scripts/bench/run.sh${ARGS_ECHO:+ $ARGS_ECHO}" quick="$QUICK" \
  dur="$DUR" rounds="$ROUNDS" latn="$LATN" upgrades="$UPGRADES" steady_dur="$STEADY_DUR" \
  steady_rounds="$STEADY_ROUNDS" ballast="$BALLAST" h2_upgrades="$H2_UPGRADES" sup_count="$SUP_COUNT" \
  sup_at="$SUP_AT" client_upgrades="$CLIENT_UPGRADES" steer_runs="$STEER_RUNS" steer_upgrades="$STEER_UPGRADES" \
  scale="$SCALE" front_dur="$FRONT_DUR" front_rate_dur="$FRONT_RATE_DUR" front_rounds="$FRONT_ROUNDS" \
  load_before="$(loadavg)" date="$(date -u '+%F %H:%M UTC')" t_start="$T_START" \
  commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" dirty="$dirty" \
  cores="$(nproc)" kernel="$(uname -r)" mem_gib="$(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo)" \
  cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)" srv_cpu="$SRV_CPU" load_cpu="$LOAD_CPU" \
  wrk="$(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)" peers="$PEERS" scenarios="$SCEN" bin_dir="$BIN_DIR"
scenario_start() { log "== $1"; record kind=scenario name="$1" load="$(loadavg)" t="$(date +%s)"; }

# ------------------------------------------------------ install, build ----
prepare_baton || exit 1
BATON_CLI=""
if want_peer baton-run && { want load || want idle || want latency || want memory || want clients || want steering \
    || want front; }; then
  prepare_baton_run || true
fi
usable nginx-binary && { prepare_nginx nginx-binary || true; }
usable nginx-reload && { prepare_nginx nginx-reload || true; }
usable haproxy && { prepare_haproxy haproxy || true; }
usable haproxy-idle-close && { prepare_haproxy haproxy-idle-close || true; }
usable tableflip && { prepare_tableflip || true; }
usable pingora && { prepare_pingora || true; }
usable ecdysis && { prepare_ecdysis || true; }
if want h2 || { want clients && { want_peer baton-run || want_peer baton-demo; }; }; then
  prepare_node node || true
fi
if want clients; then
  prepare_java || true
  prepare_venv python-requests || true
fi
if want steering && want_peer baton-run; then
  prepare_venv uvicorn || true
fi
if want front && want_peer baton-run; then
  prepare_goapp front || true
  prepare_oha front || true
fi
record kind=versions \
  nginx="$(nginx -v 2>&1 | sed 's#.*/##')" haproxy="$(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f3)" \
  go="$(go version 2>/dev/null | cut -d' ' -f3)" node="$(node --version 2>/dev/null)" \
  java="$(java -version 2>&1 | head -1 | cut -d'"' -f2)" \
  httpclient="$(dpkg-query -W -f='${Version}' libhttpclient-java 2>/dev/null)" \
  tableflip="$(dpkg-query -W -f='${Version}' golang-github-cloudflare-tableflip-dev 2>/dev/null)" \
  pingora="$(sed -n '/^name = "pingora"$/{n;s/version = "\(.*\)"/\1/p}' "$HERE/pingora-server/Cargo.lock")" \
  ecdysis="$(sed -n '/^name = "ecdysis"$/{n;s/version = "\(.*\)"/\1/p}' "$HERE/ecdysis-server/Cargo.lock")" \
  oha="$([[ -n ${OHA:-} && -x ${OHA:-} ]] && "$OHA" --version 2>/dev/null | cut -d' ' -f2)" \
  requests="$(sed -n 's/^requests==//p' "$HERE/requirements.txt")" \
  uvicorn="$(sed -n 's/^uvicorn==//p' "$HERE/requirements.txt")"

N=0
newdir() { N=$((N + 1)); NEWDIR="$RUN/peers/$1-$N"; }   # sets NEWDIR (no subshell: N must count)

# wrk duration for a peer under upgrades: its upgrades must fit, and
# pingora's old process lives ~6 s after each (5 s CLOSE_TIMEOUT + grace 1 s).
dur_for() {
  if [[ $QUICK == 1 ]]; then echo "$DUR"; return; fi
  case "$1" in pingora) echo $(( DUR > UPGRADES * 8 + 4 ? DUR : UPGRADES * 8 + 4 )) ;; *) echo "$DUR" ;; esac
}

WRK_LUA=$HERE/count-closes.lua
# wrk_run OUT DUR URL [wrk args]: -t1 -c64 on the load CPU
wrk_run() {
  local out=$1 d=$2 url=$3; shift 3
  bounded $((d + 60)) taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${d}s" --latency "$@" -s "$WRK_LUA" "$url" > "$out" 2>&1 || true
}
wrk_cmd() {   # the command line as the report shows it
  echo "taskset -c $LOAD_CPU wrk -t1 -c$CONNS -d${1}s --latency ${2:+$2 }-s scripts/bench/count-closes.lua http://127.0.0.1:PORT/"
}

# ---------------------------------------------------------------- load ----
load_one() {   # peer mode(keepalive|close) upgrades(0|1) round
  local peer=$1 mode=$2 up=$3 round=$4 dir port d url hdr=() gap
  newdir "$peer"; dir=$NEWDIR; port=$(free_port); url="http://127.0.0.1:$port/"
  d=$(dur_for "$peer"); [[ $up == 0 ]] && d=$DUR
  [[ $mode == close ]] && hdr=(-H "Connection: close")
  start_peer "$peer" "$dir" "$port" || { record kind=load peer="$peer" mode="$mode" upgrading="$up" round="$round" error="did not start"; stop_peer "$dir"; return 0; }
  log "load: $peer, $mode, $([[ $up == 1 ]] && echo "$UPGRADES upgrades" || echo steady), ${d}s, round $round/$ROUNDS"
  local drv=""
  if [[ $up == 1 ]]; then
    # upgrades spread over the run: the first after $FIRST s, each one complete
    # (old generation gone) before the pause that leads to the next
    gap=$("$PY" -c "print(max(0.5, ($d - 2 * $FIRST) / $UPGRADES - 0.5))")
    [[ $peer == pingora ]] && gap=1
    "${PROBE[@]}" upgrade --kind "$KIND" "${PEER_ARGS[@]}" --count "$UPGRADES" --delay "$FIRST" --gap "$gap" \
      --poll 0.001 --out "$dir/upgrades.jsonl" >>"$dir/probe.log" 2>&1 &
    drv=$!
  fi
  wrk_run "$dir/wrk.txt" "$d" "$url" "${hdr[@]+"${hdr[@]}"}"
  if [[ -n $drv ]]; then
    local i; for i in $(seq 1200); do kill -0 "$drv" 2>/dev/null || break; sleep 0.1; done
    kill "$drv" 2>/dev/null || true; wait "$drv" 2>/dev/null || true
  fi
  record kind=load peer="$peer" mode="$mode" upgrading="$up" round="$round" dur="$d" wrk="$dir/wrk.txt" \
    upgrades="$dir/upgrades.jsonl" \
    cmd="$(wrk_cmd "$d" "$([[ $mode == close ]] && echo "-H 'Connection: close'")")"
  stop_peer "$dir"
}

if want load; then
  scenario_start load
  list=()
  for p in $PEERS; do usable "$p" && list+=("$p"); done
  # baton-demo without upgrades, in the same rounds: the steady baseline
  usable baton-demo && list+=(baton-demo-steady)
  for r in $(seq "$ROUNDS"); do
    for mode in keepalive close; do
      for p in $(rotate "$r" "${list[@]}"); do
        if [[ $p == baton-demo-steady ]]; then load_one baton-demo "$mode" 0 "$r"
        else load_one "$p" "$mode" 1 "$r"
        fi
      done
    done
  done
fi

# ---------------------------------------------------------------- idle ----
if want idle; then
  scenario_start idle
  list=(); for p in $PEERS; do usable "$p" && list+=("$p"); done
  for r in $(seq "$ROUNDS"); do
    for peer in $(rotate "$r" "${list[@]}"); do
      newdir "$peer"; dir=$NEWDIR; port=$(free_port)
      if start_peer "$peer" "$dir" "$port"; then
        log "idle: $peer, 64 idle keep-alive connections through one upgrade, round $r/$ROUNDS"
        bounded 180 "${PROBE[@]}" idle --kind "$KIND" "${PEER_ARGS[@]}" --conns 64 --out "$dir/idle.json" \
          >/dev/null 2>>"$dir/probe.log" || true
        record kind=idle peer="$peer" round="$r" file="$dir/idle.json"
      else
        record kind=idle peer="$peer" round="$r" error="did not start"
      fi
      stop_peer "$dir"
    done
  done
fi

# -------------------------------------------------------------- steady ----
if want steady && usable baton-demo; then
  scenario_start steady
  # Both servers up at once (an idle one costs nothing), wrk alternates;
  # one warm-up second each first (not counted).
  newdir baton-demo; bdir=$NEWDIR; newdir plain; pdir=$NEWDIR; bport=$(free_port); pport=$(free_port)
  start_peer baton-demo "$bdir" "$bport"
  start_peer plain "$pdir" "$pport"
  wrk_run "$bdir/warmup.txt" 1 "http://127.0.0.1:$bport/"
  wrk_run "$pdir/warmup.txt" 1 "http://127.0.0.1:$pport/"
  for r in $(seq "$STEADY_ROUNDS"); do
    order="baton plain"; (( r % 2 == 0 )) && order="plain baton"
    for w in $order; do
      if [[ $w == baton ]]; then port=$bport; d=$bdir; else port=$pport; d=$pdir; fi
      log "steady: $w, round $r/$STEADY_ROUNDS, ${STEADY_DUR}s"
      wrk_run "$d/wrk-$r.txt" "$STEADY_DUR" "http://127.0.0.1:$port/"
      record kind=steady server="$w" round="$r" wrk="$d/wrk-$r.txt" cmd="$(wrk_cmd "$STEADY_DUR")"
    done
  done
  stop_peer "$bdir"; stop_peer "$pdir"
fi

# ------------------------------------------------------------- latency ----
if want latency; then
  scenario_start latency
  # Every peer up at once (idle), one upgrade each per round, in a rotating
  # order.
  list=() ldirs=() largs=() lkinds=()
  for peer in $PEERS; do
    [[ $peer == haproxy-idle-close ]] && continue   # the same reload as haproxy
    usable "$peer" || continue
    newdir "$peer"; dir=$NEWDIR; port=$(free_port)
    if start_peer "$peer" "$dir" "$port"; then
      list+=("$peer"); ldirs+=("$dir"); lkinds+=("$KIND"); largs+=("$(printf '%q ' "${PEER_ARGS[@]}")")
    else
      record kind=latency peer="$peer" error="did not start"; stop_peer "$dir"
    fi
  done
  declare -A stopped=()
  for r in $(seq "$LATN"); do
    for i in $(rotate "$r" $(seq 0 $((${#list[@]} - 1)))); do
      peer=${list[$i]}; dir=${ldirs[$i]}
      [[ -n ${stopped[$peer]:-} ]] && continue
      [[ $r == 1 || $r == "$LATN" ]] && log "latency: $peer, round $r/$LATN"
      eval "pargs=(${largs[$i]})"
      # shellcheck disable=SC2154
      bounded 120 "${PROBE[@]}" upgrade --kind "${lkinds[$i]}" "${pargs[@]}" --count 1 \
        --gone-timeout "$([[ $peer == pingora ]] && echo 20 || echo 10)" \
        --out "$dir/latency.jsonl" >/dev/null 2>>"$dir/probe.log" || true
      # an upgrade that did not happen stops that peer's series (the next
      # would not be comparable)
      tail -1 "$dir/latency.jsonl" 2>/dev/null | grep -qE '"ready_ms": null|^\{"error"' && stopped[$peer]=1
    done
    sleep 0.2
  done
  for i in "${!list[@]}"; do
    record kind=latency peer="${list[$i]}" file="${ldirs[$i]}/latency.jsonl"
    stop_peer "${ldirs[$i]}"
  done
fi

# ------------------------------------------------------------- handoff ----
if want handoff && usable baton-demo; then
  scenario_start handoff
  log "handoff: bench-handoff $SCALE"
  # the demo on the server CPU, bench-handoff (the clients) on the load CPU
  printf '#!/bin/sh\nexec taskset -c %s %s "$@"\n' "$SRV_CPU" "$BIN/baton-demo" > "$BIN/baton-demo-pinned"
  chmod +x "$BIN/baton-demo-pinned"
  # shellcheck disable=SC2086
  bounded 600 taskset -c "$LOAD_CPU" "$BIN/bench-handoff" --server "$BIN/baton-demo-pinned" $SCALE \
    > "$RUN/handoff.md" 2>"$RUN/handoff.err" || true
  record kind=handoff file="$RUN/handoff.md" err="$RUN/handoff.err" \
    cmd="bench-handoff --server baton-demo $SCALE (clients on CPU $LOAD_CPU, the demo on CPU $SRV_CPU)"
fi

# --------------------------------------------------------------- spawn ----
if want spawn && usable baton-demo; then
  scenario_start spawn
  if [[ -x $BIN/bench-spawn ]]; then
    log "spawn: bench-spawn $BALLAST"
    # shellcheck disable=SC2086
    bounded 600 taskset -c "$SRV_CPU" "$BIN/bench-spawn" --iterations "$([[ $QUICK == 1 ]] && echo 10 || echo 50)" \
      $BALLAST > "$RUN/spawn.jsonl" 2>"$RUN/spawn.err" || true
    record kind=spawn file="$RUN/spawn.jsonl" err="$RUN/spawn.err" \
      cmd="taskset -c $SRV_CPU bench-spawn --iterations $([[ $QUICK == 1 ]] && echo 10 || echo 50) $BALLAST"
  else
    fail spawn "no bench-spawn binary"
  fi
  # trigger -> ready of baton-demo with a small and a large resident set,
  # in the default (dynamic) build and, in a full run, the static one too;
  # upgrades rotate among them
  builds=(dynamic)
  if [[ $QUICK == 0 && -z $BIN_DIR ]]; then
    prepare_demo_static
    [[ -x $BIN/baton-demo-static ]] && builds+=(static)
  fi
  sdirs=() sargs=() sizes=() sbuilds=()
  for build in "${builds[@]}"; do
    for mib in $BALLAST; do
      newdir "baton-demo-$build-ballast-$mib"; dir=$NEWDIR; port=$(free_port)
      demo=$BIN/baton-demo; [[ $build == static ]] && demo=$BIN/baton-demo-static
      DEMO_BIN=$demo EXTRA="--ballast-mib $mib" start_peer baton-demo "$dir" "$port" \
        || { fail spawn "baton-demo ($build) --ballast-mib $mib did not start"; }
      sdirs+=("$dir"); sargs+=("$(printf '%q ' "${PEER_ARGS[@]}")"); sizes+=("$mib"); sbuilds+=("$build")
    done
  done
  # what one of the probe's ready polls costs by itself, on the idle server
  eval "pargs=(${sargs[0]})"
  "${PROBE[@]}" rtt --port "${pargs[1]}" --count 50 --out "$RUN/rtt.json" >/dev/null 2>&1 || true
  record kind=probe_rtt file="$RUN/rtt.json"
  for r in $(seq "$LATN"); do
    for i in $(rotate "$r" $(seq 0 $((${#sizes[@]} - 1)))); do
      eval "pargs=(${sargs[$i]})"
      bounded 180 "${PROBE[@]}" upgrade --kind baton "${pargs[@]}" --count 1 --wait-rss-mib "${sizes[$i]}" \
        --out "${sdirs[$i]}/latency.jsonl" >/dev/null 2>>"${sdirs[$i]}/probe.log" || true
    done
  done
  for i in "${!sizes[@]}"; do
    record kind=spawn_ready mib="${sizes[$i]}" build="${sbuilds[$i]}" file="${sdirs[$i]}/latency.jsonl"
    stop_peer "${sdirs[$i]}"
  done
fi

# ------------------------------------------------------------------ h2 ----
if want h2; then
  scenario_start h2
  if command -v node >/dev/null; then
    list=(); for p in baton-demo nginx-binary nginx-reload haproxy; do usable "$p" && list+=("$p"); done
    for r in $(seq "$ROUNDS"); do
      for peer in $(rotate "$r" "${list[@]}"); do
        newdir "$peer"; dir=$NEWDIR; port=$(free_port)
        if H2=1 start_peer "$peer" "$dir" "$port"; then
          log "h2: $peer, 16 sessions x 8 streams, $H2_UPGRADES upgrades, round $r/$ROUNDS"
          # the ready poll speaks HTTP/1.1, these listeners only h2c: ready = a new process
          bounded 300 "${PROBE[@]}" drive --kind "$KIND" "${PEER_ARGS[@]}" --ready-by proc \
            --client "node $APPS/h2_client.js http://127.0.0.1:$port 16 8 / 240000" \
            --count "$H2_UPGRADES" --gap 0.5 --out "$dir/h2.json" >/dev/null 2>>"$dir/probe.log" || true
          record kind=h2 peer="$peer" round="$r" file="$dir/h2.json"
        else
          record kind=h2 peer="$peer" round="$r" error="did not start"
        fi
        stop_peer "$dir"
      done
    done
  else
    fail h2 "no node (nodejs) to run crates/baton-tests/apps/h2_client.js"
  fi
fi

# -------------------------------------------------------------- memory ----
if want memory; then
  scenario_start memory
  if usable baton-demo; then
    newdir baton-demo; bdir=$NEWDIR; newdir plain; pdir=$NEWDIR; bport=$(free_port); pport=$(free_port)
    start_peer baton-demo "$bdir" "$bport"; start_peer plain "$pdir" "$pport"
    sleep 1
    record kind=memory what="baton-demo (library mode), idle after start" \
      mem="$("${PROBE[@]}" mem "$(cat "$bdir/pid")")"
    record kind=memory what="baton-demo --plain (no baton), idle after start" \
      mem="$("${PROBE[@]}" mem "$(cat "$pdir/pid")")"
    bounded 60 "${PROBE[@]}" upgrade --kind baton --port "$bport" --pidfile "$bdir/pid" >/dev/null 2>&1 || true
    sleep 1
    record kind=memory what="baton-demo (library mode), idle after one upgrade" \
      mem="$("${PROBE[@]}" mem "$(cat "$bdir/pid")")"
    stop_peer "$bdir"; stop_peer "$pdir"
  fi
  if usable baton-run && [[ -n $BATON_CLI ]]; then
    for cli in "$BIN/baton-static" "$BIN/baton-installed" "$BIN/baton"; do
      [[ -x $cli ]] || continue
      [[ $cli == "$BIN/baton" && -n $(ls "$BIN"/baton-static "$BIN"/baton-installed 2>/dev/null) ]] && continue
      case "$cli" in
        */baton-static) build="static (scripts/build-static.sh)" ;;
        */baton-installed) build="dynamic (cargo install --path crates/baton-cli --locked)" ;;
        *) build="the --bin-dir build" ;;
      esac
      newdir baton-run; sdir=$NEWDIR; sport=$(free_port)
      if BATON_CLI=$cli start_peer baton-run "$sdir" "$sport"; then
        log "memory: \`baton run\`, $build, $SUP_COUNT upgrades"
        bounded $((SUP_COUNT * 10 + 60)) "${PROBE[@]}" supervisor-mem --baton "$cli" --control "$sdir/ctl/ctl.sock" \
          --pid "$(cat "$sdir/pid")" --count "$SUP_COUNT" --at "$SUP_AT" --out "$sdir/mem.json" \
          >/dev/null 2>>"$sdir/probe.log" || true
        record kind=supervisor_mem build="$build" file="$sdir/mem.json"
      else
        record kind=supervisor_mem build="$build" error="did not start"
      fi
      stop_peer "$sdir"
    done
  fi
fi

# ------------------------------------------------------------- clients ----
if want clients; then
  scenario_start clients
  cpeers=()
  for p in baton-demo baton-run nginx-reload haproxy ecdysis; do
    usable "$p" || continue
    case "$p" in
      baton-run) cpeers+=(baton-run-node baton-run-node-front) ;;
      haproxy) cpeers+=(haproxy-backend) ;;
      *) cpeers+=("$p") ;;
    esac
  done
  ci=0
  for client in java-httpclient node-http python-requests; do
    ci=$((ci + 1))
    case "$client" in
      java-httpclient) failed java-httpclient && continue
        ccmd="java -Dorg.apache.commons.logging.Log=org.apache.commons.logging.impl.NoOpLog -cp $JAVA_CP HttpClientBench" ;;
      node-http) command -v node >/dev/null || continue; ccmd="node $HERE/clients/node_client.js" ;;
      python-requests) failed python-requests && continue; ccmd="$VENV/bin/python $HERE/clients/python_client.py" ;;
    esac
    for peer in $(rotate "$ci" "${cpeers[@]}"); do
      newdir "$peer"; dir=$NEWDIR; port=$(free_port)
      if start_peer "$peer" "$dir" "$port"; then
        log "clients: $client against $peer, 8 workers, $CLIENT_UPGRADES upgrades"
        bounded 300 "${PROBE[@]}" drive --kind "$KIND" "${PEER_ARGS[@]}" \
          --client "$ccmd http://127.0.0.1:$port/ 8 40 240" --count "$CLIENT_UPGRADES" --delay 1 --gap 0.5 \
          --out "$dir/clients.json" >/dev/null 2>>"$dir/probe.log" || true
        record kind=clients client="$client" peer="$peer" file="$dir/clients.json"
      else
        record kind=clients client="$client" peer="$peer" error="did not start"
      fi
      stop_peer "$dir"
    done
  done
fi

# ------------------------------------------------------------ steering ----
if want steering && usable baton-run; then
  scenario_start steering
  if failed uvicorn; then :; else
    for r in $(seq "$STEER_RUNS"); do
      for peer in $(rotate "$r" uvicorn-nosteer uvicorn-steer); do
        newdir "$peer"; dir=$NEWDIR; port=$(free_port)
        if start_peer "$peer" "$dir" "$port"; then
          log "steering: $peer, wrk -c8 Connection: close, $STEER_UPGRADES upgrades, run $r/$STEER_RUNS"
          bounded 400 "${PROBE[@]}" drive --kind "$KIND" "${PEER_ARGS[@]}" --stop sigint \
            --client "wrk -t1 -c8 -d300s --latency -H 'Connection: close' -s $WRK_LUA http://127.0.0.1:$port/" \
            --count "$STEER_UPGRADES" --delay 1 --gap 0.2 --out "$dir/steer.json" \
            --out-client "$dir/wrk.txt" >/dev/null 2>>"$dir/probe.log" || true
          record kind=steering peer="$peer" run="$r" file="$dir/steer.json" wrk="$dir/wrk.txt" \
            cmd="taskset -c $LOAD_CPU wrk -t1 -c8 --latency -H 'Connection: close' -s scripts/bench/count-closes.lua http://127.0.0.1:PORT/ (stopped with SIGINT after the last upgrade)"
        else
          record kind=steering peer="$peer" run="$r" error="did not start"
        fi
        stop_peer "$dir"
      done
    done
  fi
fi

# ------------------------------------------------------------------ ws ----
if want ws; then
  scenario_start ws
  list=()
  usable baton-demo && list+=(baton-demo)
  want_peer nginx-reload && ! failed nginx-reload && list+=(nginx-ws)
  want_peer haproxy && ! failed haproxy && list+=(haproxy-ws)
  for r in $(seq "$ROUNDS"); do
    for peer in $(rotate "$r" "${list[@]}"); do
      newdir "$peer"; dir=$NEWDIR; port=$(free_port)
      if start_peer "$peer" "$dir" "$port"; then
        log "ws: $peer, $WS_CONNS WebSockets through one upgrade, round $r/$ROUNDS"
        bounded 240 "${PROBE[@]/probe.py/ws_probe.py}" --kind "$KIND" --port "$port" --ws-port "$port" \
          --pidfile "$dir/pid" --conns "$WS_CONNS" --gone-timeout $((WS_STOP_AFTER * 3)) \
          --stop-after "$WS_STOP_AFTER" --out "$dir/ws.json" >/dev/null 2>>"$dir/probe.log" || true
        record kind=ws peer="$peer" round="$r" file="$dir/ws.json" stop_after="$WS_STOP_AFTER"
      else
        record kind=ws peer="$peer" round="$r" error="did not start"
      fi
      stop_peer "$dir"
    done
  done
fi

# ----------------------------------------------------------------- tls ----
if want tls; then
  scenario_start tls
  # One throwaway CA and an ECDSA P-256 certificate for localhost, shared by
  # every peer (HAProxy wants the certificate and key in one file).
  TLS_DIR=$RUN/tls; mkdir -p "$TLS_DIR"
  if (cd "$TLS_DIR" &&
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
        -days 2 -subj "/CN=baton bench CA" -addext basicConstraints=critical,CA:TRUE \
        -addext keyUsage=critical,keyCertSign,cRLSign &&
      openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout key.pem -out cert.csr \
        -subj /CN=localhost &&
      printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > ext.cnf &&
      openssl x509 -req -in cert.csr -CA ca.pem -CAkey ca.key -set_serial 1 -days 2 -extfile ext.cnf \
        -out cert.pem && cat cert.pem key.pem > haproxy.pem) >"$RUN/tls-pki.log" 2>&1; then
    list=()
    usable baton-demo && list+=(baton-demo)
    want_peer nginx-reload && ! failed nginx-reload && list+=(nginx-tls)
    want_peer haproxy && ! failed haproxy && list+=(haproxy-tls)
    for r in $(seq "$ROUNDS"); do
      for peer in $(rotate "$r" "${list[@]}"); do
        newdir "$peer"; dir=$NEWDIR; port=$(free_port); TLS_PORT=$(free_port)
        extra=""
        [[ $peer == baton-demo ]] && extra="--listen https=127.0.0.1:$TLS_PORT --tls-listener https \
          --tls-cert $TLS_DIR/cert.pem --tls-key $TLS_DIR/key.pem"
        if EXTRA=$extra start_peer "$peer" "$dir" "$port"; then
          log "tls: $peer, $TLS_CONNS idle HTTPS connections through $TLS_UPGRADES upgrades, round $r/$ROUNDS"
          bounded 600 "${PROBE[@]/probe.py/tls_probe.py}" --kind "$KIND" --port "$port" --tls-port "$TLS_PORT" \
            --ca "$TLS_DIR/ca.pem" --pidfile "$dir/pid" --conns "$TLS_CONNS" --upgrades "$TLS_UPGRADES" \
            --gone-timeout 60 --out "$dir/tls.json" >/dev/null 2>>"$dir/probe.log" || true
          record kind=tls peer="$peer" round="$r" file="$dir/tls.json"
        else
          record kind=tls peer="$peer" round="$r" error="did not start"
        fi
        stop_peer "$dir"
      done
    done
  else
    fail tls "cannot make the test certificate: $(tail -1 "$RUN/tls-pki.log")"
  fi
fi

# --------------------------------------------------------------- front ----
# front_wrk WAY ROUND: one max-rate wrk run against the direct or the front
# supervisor, its supervisor sampled meanwhile.
front_wrk() {
  local way=$1 r=$2 port dir pid
  case $way in direct) port=$dport dir=$ddir ;; front) port=$fport dir=$fdir ;; *) port=$uport dir=$udir ;; esac
  pid=$(cat "$dir/pid")
  log "front: max req/s, $way, round $r/$FRONT_ROUNDS, ${FRONT_DUR}s"
  local cpu0 cpu1
  cpu0=$("${PROBE[@]}" cpu --pid "$pid")
  "${PROBE[@]}" sample --pid "$pid" --for "$FRONT_DUR" --every 0.2 --out "$dir/sample-$r.json" >/dev/null 2>&1 &
  local sampler=$!
  wrk_run "$dir/wrk-$r.txt" "$FRONT_DUR" "http://127.0.0.1:$port/health"
  wait "$sampler" 2>/dev/null || true
  cpu1=$("${PROBE[@]}" cpu --pid "$pid")
  record kind=front_max way="$way" round="$r" wrk="$dir/wrk-$r.txt" sample="$dir/sample-$r.json" \
    cpu_before="$cpu0" cpu_after="$cpu1" cmd="$(wrk_cmd "$FRONT_DUR" | sed 's#/$#/health#')"
}
# front_oha WAY ROUND RATE SHARE: one fixed-rate oha run (RATE = the direct
# max ÷ SHARE).
front_oha() {
  local way=$1 r=$2 rate=$3 share=$4 port dir
  case $way in direct) port=$dport dir=$ddir ;; front) port=$fport dir=$fdir ;; *) port=$uport dir=$udir ;; esac
  log "front: $rate req/s fixed (1/$share of the direct max), $way, round $r/$FRONT_ROUNDS, ${FRONT_RATE_DUR}s"
  # one worker thread (oha sizes its runtime to the physical cores, not to
  # the CPU it is pinned to); -w: requests in flight at the deadline finish
  # (not counted as errors)
  local args=(--no-tui --output-format json --worker-threads 1 -z "${FRONT_RATE_DUR}s" -w -c "$CONNS"
              -q "$rate" --latency-correction)
  bounded $((FRONT_RATE_DUR + 60)) taskset -c "$LOAD_CPU" "$OHA" "${args[@]}" "http://127.0.0.1:$port/health" \
    > "$dir/oha-$share-$r.json" 2>"$dir/oha-$share-$r.err" || true
  record kind=front_rate way="$way" round="$r" rate="$rate" share="$share" file="$dir/oha-$share-$r.json" \
    err="$dir/oha-$share-$r.err" \
    cmd="taskset -c $LOAD_CPU oha ${args[*]} http://127.0.0.1:PORT/health"
}
if want front && usable baton-run; then
  scenario_start front
  if failed front; then
    :   # the Go app or oha could not be built: recorded by prepare_*
  else
    # The three supervisors up at once (an idle one costs nothing), the
    # load goes to each in turn, the order rotated every round.
    newdir baton-run-go; ddir=$NEWDIR; newdir baton-run-go-front; fdir=$NEWDIR
    newdir baton-run-go-front-unix; udir=$NEWDIR
    dport=$(free_port); fport=$(free_port); uport=$(free_port)
    # the three ways, rotated every round: direct, front, front-unix;
    # front, front-unix, direct; ...
    front_order() {
      local ways=(direct front front-unix) k=$((($1 - 1) % 3))
      echo "${ways[@]:k} ${ways[@]:0:k}"
    }
    if start_peer baton-run-go "$ddir" "$dport" && start_peer baton-run-go-front "$fdir" "$fport" \
        && start_peer baton-run-go-front-unix "$udir" "$uport"; then
      sleep 1
      for way in direct front front-unix; do
        case $way in direct) d=$ddir ;; front) d=$fdir ;; *) d=$udir ;; esac
        record kind=front_mem way="$way" state=idle mem="$("${PROBE[@]}" mem "$(cat "$d/pid")")"
      done
      wrk_run "$ddir/warmup.txt" 1 "http://127.0.0.1:$dport/health"
      wrk_run "$fdir/warmup.txt" 1 "http://127.0.0.1:$fport/health"
      wrk_run "$udir/warmup.txt" 1 "http://127.0.0.1:$uport/health"
      for r in $(seq "$FRONT_ROUNDS"); do
        for way in $(front_order "$r"); do front_wrk "$way" "$r"; done
      done
      sleep 1
      for way in direct front front-unix; do
        case $way in direct) d=$ddir ;; front) d=$fdir ;; *) d=$udir ;; esac
        record kind=front_mem way="$way" state=after mem="$("${PROBE[@]}" mem "$(cat "$d/pid")")"
      done
      # the fixed rates: half the direct median max of this run (the goal's),
      # and a quarter (where the front is not saturated on the shared CPU)
      max=$("$PY" - "$ddir"/wrk-*.txt <<'PYEOF' || true
import re, statistics, sys
v = []
for f in sys.argv[1:]:
    m = re.search(r"Requests/sec:\s+([\d.]+)", open(f).read())
    if m:
        v.append(float(m.group(1)))
print(int(statistics.median(v)) if v else "")
PYEOF
)
      if [[ -n $max && $max -gt 4 ]]; then
        for share in 2 4; do
          for r in $(seq "$FRONT_ROUNDS"); do
            for way in $(front_order "$r"); do front_oha "$way" "$r" $((max / share)) "$share"; done
          done
        done
      else
        fail front "no direct max req/s to take half of (wrk failed against the direct Go app)"
      fi
    else
      fail front "the Go app under \`baton run\` (direct, --front http or --front-upstream unix) did not start"
    fi
    stop_peer "$ddir"; stop_peer "$fdir"; stop_peer "$udir"
  fi
fi

record kind=end load_after="$(loadavg)" t_end="$(date +%s)"
mkdir -p "$CARGO_TARGET/bench"
"$PY" "$HERE/report.py" "$RES" | tee "$CARGO_TARGET/bench/latest.md"
if [[ $WRITE_DOCS == 1 ]]; then
  "$PY" "$HERE/report.py" --doc "$RES" > "$ROOT/docs/benchmarks.md"
  "$PY" "$HERE/report.py" --readme "$ROOT/README.md" "$RES"
  log "wrote docs/benchmarks.md and the README's benchmark summary"
fi
if ((${#FAILED[@]})); then
  log "the run FAILED: ${FAILED[*]} (see the report)"
  exit 1
fi
