#!/usr/bin/env bash
# baton against its peers, side by side, in one run (issue 9).
#
#   scripts/bench/run.sh [--quick] [--only NAME[,NAME]] [--duration S] [--rounds N]
#                        [--upgrades N] [--latency-count N] [--bin-dir DIR] [--keep]
#
# Prints one Markdown report on stdout (progress goes to stderr) and keeps a
# copy in target/bench/latest.md. Scenarios:
#   load     wrk -t2 -c64 -d25s --latency, keep-alive and Connection: close,
#            5 upgrades (--upgrades) during each run (longer -d for slow peers)
#   idle     64 keep-alive connections idle through one upgrade
#   steady   baton-demo vs the same handler on plain hyper (--plain)
#   latency  trigger -> new generation ready -> old generation gone, 20 upgrades
#   handoff  bench-handoff: 1k and 10k idle connections handed over
#   memory   RSS of baton-demo idle (and of the plain server, and `baton run`)
# Peers: baton-demo baton-run nginx-binary nginx-reload haproxy
#        haproxy-idle-close tableflip pingora stop-start
# --only takes peer and/or scenario names (e.g. --only baton-demo,latency).
# --quick: seconds instead of minutes, baton-demo only (plus the plain
# baseline): the test suite runs it to check the whole chain end to end.
# --bin-dir DIR: take baton-demo and bench-handoff from DIR instead of a
# release build (the test suite passes its debug build: figures meaningless).
#
# Needs: wrk, curl, python3; for the peers nginx, haproxy, go + Debian's
# golang-github-cloudflare-tableflip-dev, cmake (pingora's build; installed
# with apt-get if missing). A peer whose tools are missing is reported as
# skipped, with the reason.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
HERE=$ROOT/scripts/bench
PROBE=(python3 "$HERE/probe.py")

QUICK=0 ONLY="" DUR="" ROUNDS="" LATN="" KEEP=0 BIN_DIR="" UPGRADES=""
ARGS_ECHO="$*"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --only) ONLY="$2"; shift ;;
    --only=*) ONLY="${1#--only=}" ;;
    --duration) DUR="$2"; shift ;;
    --rounds) ROUNDS="$2"; shift ;;
    --upgrades) UPGRADES="$2"; shift ;;
    --latency-count) LATN="$2"; shift ;;
    --bin-dir) BIN_DIR="$2"; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

ALL_PEERS="baton-demo baton-run nginx-binary nginx-reload haproxy haproxy-idle-close tableflip pingora stop-start"
ALL_SCEN="load idle steady latency handoff memory"
if [[ $QUICK == 1 ]]; then
  DUR=${DUR:-3}; ROUNDS=${ROUNDS:-1}; LATN=${LATN:-5}; UPGRADES=${UPGRADES:-2}; SCALE="200"; FIRST=0.5
  PEERS="baton-demo"
else
  DUR=${DUR:-25}; ROUNDS=${ROUNDS:-3}; LATN=${LATN:-20}; UPGRADES=${UPGRADES:-5}; SCALE="1000 10000"; FIRST=2
  PEERS=$ALL_PEERS
fi
SCEN=$ALL_SCEN
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
log() { echo "[bench $(date +%T)] $*" >&2; }

command -v wrk >/dev/null || { echo "run.sh: wrk is required (apt-get install wrk)" >&2; exit 1; }
command -v curl >/dev/null || { echo "run.sh: curl is required" >&2; exit 1; }

RUN=$(mktemp -d /tmp/baton-bench.XXXXXX)
RES=$RUN/results.jsonl
: > "$RES"
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  # Every process this run started, by pid (pid files, their descendants,
  # anything running from $RUN), then the background jobs.
  "${PROBE[@]}" cleanup "$RUN" 2>/dev/null || true
  local j; for j in $(jobs -p); do kill "$j" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ $KEEP == 1 ]]; then echo "run.sh: kept $RUN" >&2; else rm -rf "$RUN"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# record key=value ... -> one JSON line in $RES
record() { python3 -c 'import json,sys; print(json.dumps(dict(a.split("=",1) for a in sys.argv[1:])))' "$@" >> "$RES"; }
# run a command with a deadline (every wait is bounded)
bounded() { local s=$1; shift; timeout --kill-after=5 "$s" "$@"; }

UPTIME_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
record kind=meta args="$ARGS_ECHO" quick="$QUICK" dur="$DUR" rounds="$ROUNDS" latn="$LATN" \
  upgrades="$UPGRADES" load_before="$UPTIME_BEFORE" date="$(date -u '+%F %H:%M UTC')" \
  cores="$(nproc)" kernel="$(uname -r)" \
  cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)" \
  wrk="$(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)" peers="$PEERS" scenarios="$SCEN"

# ---------------------------------------------------------------- build ----
BIN=$RUN/bin
mkdir -p "$BIN"
if [[ -n $BIN_DIR ]]; then
  HANDOFF_BIN=$BIN_DIR/bench-handoff
  cp "$BIN_DIR/baton-demo" "$BIN/baton-demo"
else
  log "building baton-demo, baton and bench-handoff (release)"
  cargo build --release -q -p baton-demo -p baton-cli -p baton-tests --bins >&2
  HANDOFF_BIN=target/release/bench-handoff
  cp target/release/baton-demo "$BIN/baton-demo"
fi
SKIP=()   # peer=reason
skip() { SKIP+=("$1=$2"); record kind=skip peer="$1" reason="$2"; log "skip $1: $2"; }

BATON_CLI=""
if want_peer baton-run; then
  # `baton run` supervising the plain hyper server (socket activation,
  # READY=1): the static build (scripts/build-static.sh), the one for
  # containers; the memory scenario also measures the default dynamic one.
  # With --bin-dir, the `baton` found there.
  cli=${BIN_DIR:-target/release}/baton
  if [[ -z $BIN_DIR ]]; then
    log "building baton statically (scripts/build-static.sh)"
    static=$("$ROOT/scripts/build-static.sh") || static=""
    [[ -n $static ]] && cp "$static" "$BIN/baton-static"
  fi
  if [[ -x $cli ]]; then
    cp "$cli" "$BIN/baton"; BATON_CLI=$BIN/baton
    [[ -x $BIN/baton-static ]] && BATON_CLI=$BIN/baton-static
  else
    skip baton-run "no $cli (cargo build --release -p baton-cli)"
  fi
fi
if want_peer nginx-binary || want_peer nginx-reload; then
  if ! command -v nginx >/dev/null; then
    want_peer nginx-binary && skip nginx-binary "nginx not installed (apt-get install nginx-light)"
    want_peer nginx-reload && skip nginx-reload "nginx not installed (apt-get install nginx-light)"
  fi
fi
if want_peer haproxy || want_peer haproxy-idle-close; then
  if ! command -v haproxy >/dev/null; then
    want_peer haproxy && skip haproxy "haproxy not installed"
    want_peer haproxy-idle-close && skip haproxy-idle-close "haproxy not installed"
  fi
fi
if want_peer tableflip; then
  TF_SRC=/usr/share/gocode/src/github.com/cloudflare/tableflip
  if ! command -v go >/dev/null || [[ ! -d $TF_SRC ]]; then
    skip tableflip "needs golang-go and golang-github-cloudflare-tableflip-dev"
  else
    log "building the tableflip server (GOPATH mode)"
    mkdir -p "$RUN/go/src/tableflip-server"
    cp "$HERE/tableflip-server/main.go" "$RUN/go/src/tableflip-server/"
    (cd "$RUN/go/src/tableflip-server" && GO111MODULE=off GOPATH=/usr/share/gocode:$RUN/go \
      GOCACHE=$RUN/go/cache GOFLAGS= bounded 600 go build -o "$BIN/tableflip-server" .) >&2 \
      || skip tableflip "go build failed"
  fi
fi
if want_peer pingora; then
  if ! command -v cmake >/dev/null; then
    log "installing cmake (pingora's build needs it)"
    { bounded 600 apt-get install -y -q cmake || { bounded 300 apt-get update -q && bounded 600 apt-get install -y -q cmake; }; } >&2 || true
  fi
  if command -v cmake >/dev/null; then
    log "building the pingora server (its own cargo project and target dir; slow the first time)"
    if (cd "$HERE/pingora-server" && CARGO_TARGET_DIR=$ROOT/target/bench/pingora \
        bounded 1800 cargo build --release -q) >&2; then
      cp target/bench/pingora/release/bench-pingora-server "$BIN/pingora-server"
    else
      skip pingora "cargo build of scripts/bench/pingora-server failed"
    fi
  else
    skip pingora "cmake missing and could not be installed"
  fi
fi
skipped() { local s; for s in "${SKIP[@]+"${SKIP[@]}"}"; do [[ ${s%%=*} == "$1" ]] && return 0; done; return 1; }

# ---------------------------------------------------------------- peers ----
# start_peer NAME DIR PORT: start one instance; sets KIND and PEER_ARGS (the
# probe's peer options) and waits until it answers.
start_peer() {
  local name=$1 dir=$2 port=$3
  mkdir -p "$dir"
  PEER_ARGS=(--port "$port" --pidfile "$dir/pid")
  case "$name" in
    baton-demo)
      KIND=baton
      # --no-state: none of the peers carries state; the demo's own state
      # handoff is measured in docs/state.md.
      "$BIN/baton-demo" --listen "127.0.0.1:$port" --pid-file "$dir/pid" \
        --control "$dir/ctl/ctl.sock" --no-state --log warn >>"$dir/log" 2>&1 &
      ;;
    plain)
      KIND=stopstart
      "$BIN/baton-demo" --plain --listen "127.0.0.1:$port" --pid-file "$dir/pid" --log warn >>"$dir/log" 2>&1 &
      ;;
    stop-start)
      KIND=stopstart
      local cmd="$BIN/baton-demo --plain --listen 127.0.0.1:$port --pid-file $dir/pid --log warn"
      $cmd >>"$dir/log" 2>&1 &
      PEER_ARGS+=(--cmd "$cmd" --log "$dir/log")
      ;;
    baton-run)
      KIND=baton-run
      "$BATON_CLI" run --listen "http=127.0.0.1:$port" --control "$dir/ctl/ctl.sock" --ready notify \
        -- "$BIN/baton-demo" --plain --log warn >>"$dir/log" 2>&1 &
      echo $! > "$dir/pid"
      ;;
    tableflip)
      KIND=tableflip
      "$BIN/tableflip-server" --listen "127.0.0.1:$port" --pid-file "$dir/pid" >>"$dir/log" 2>&1 &
      ;;
    nginx-binary|nginx-reload)
      KIND=$name
      mkdir -p "$dir/logs"
      sed -e "s#@DIR@#$dir#g" -e "s#@PORT@#$port#g" "$HERE/nginx.conf" > "$dir/nginx.conf"
      # absolute path: the binary upgrade re-executes argv[0]
      "$(command -v nginx)" -p "$dir" -c "$dir/nginx.conf" >>"$dir/log" 2>&1
      ;;
    haproxy|haproxy-idle-close)
      KIND=haproxy
      local opt=""; [[ $name == haproxy-idle-close ]] && opt="option idle-close-on-response"
      sed -e "s#@DIR@#$dir#g" -e "s#@PORT@#$port#g" -e "s#@OPTION@#$opt#" "$HERE/haproxy.cfg" > "$dir/haproxy.cfg"
      haproxy -W -f "$dir/haproxy.cfg" -p "$dir/pid" >>"$dir/log" 2>&1 &
      ;;
    pingora)
      KIND=pingora
      sed -e "s#@DIR@#$dir#g" "$HERE/pingora.yaml" > "$dir/pingora.yaml"
      local cmd="$BIN/pingora-server -c $dir/pingora.yaml"
      BENCH_LISTEN=127.0.0.1:$port $cmd >>"$dir/log" 2>&1 &
      echo $! > "$dir/pid"
      PEER_ARGS+=(--cmd "$cmd" --env "BENCH_LISTEN=127.0.0.1:$port" --log "$dir/log"
                  --upgrade-sock "$dir/upgrade.sock")
      ;;
    *) echo "unknown peer $name" >&2; return 1 ;;
  esac
  "${PROBE[@]}" wait --port "$port" --timeout 30 >/dev/null || { tail -5 "$dir/log" >&2; return 1; }
  local i; for i in $(seq 300); do [[ -s $dir/pid ]] && break; sleep 0.01; done
  [[ -s $dir/pid ]] || { echo "$name wrote no pid file" >&2; return 1; }
}
stop_peer() { "${PROBE[@]}" cleanup "$1" >/dev/null 2>&1 || true; }

# wrk duration for a peer under upgrades: 5 upgrades must fit, and pingora's
# old process lives ~6 s after each (5 s CLOSE_TIMEOUT + grace 1 s).
dur_for() {
  if [[ $QUICK == 1 ]]; then echo "$DUR"; return; fi
  case "$1" in pingora) echo $(( DUR > 50 ? DUR : 50 )) ;; *) echo "$DUR" ;; esac
}

WRK_LUA=$HERE/count-closes.lua
# wrk_run OUT DUR URL [wrk args]
wrk_run() {
  local out=$1 d=$2 url=$3; shift 3
  bounded $((d + 60)) wrk -t2 -c64 -d"${d}s" --latency "$@" -s "$WRK_LUA" "$url" > "$out" 2>&1 || true
}

N=0
newdir() { N=$((N + 1)); NEWDIR="$RUN/peers/$1-$N"; }   # sets NEWDIR (no subshell: N must count)

# ----------------------------------------------------------- scenarios ----
load_one() {   # peer mode(keepalive|close) upgrades(0|1)
  local peer=$1 mode=$2 up=$3 dir port d url hdr=() gap
  newdir "$peer"; dir=$NEWDIR; port=$(free_port); url="http://127.0.0.1:$port/"
  d=$(dur_for "$peer"); [[ $up == 0 ]] && d=$DUR
  [[ $mode == close ]] && hdr=(-H "Connection: close")
  start_peer "$peer" "$dir" "$port" || { record kind=load peer="$peer" mode="$mode" upgrading="$up" error="did not start"; stop_peer "$dir"; return 0; }
  log "load: $peer, $mode, $([[ $up == 1 ]] && echo "$UPGRADES upgrades" || echo steady), ${d}s"
  local drv=""
  if [[ $up == 1 ]]; then
    # upgrades spread over the run: the first after $FIRST s, each one complete
    # (old generation gone) before the pause that leads to the next
    gap=$(python3 -c "print(max(0.5, ($d - 2 * $FIRST) / $UPGRADES - 0.5))")
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
  record kind=load peer="$peer" mode="$mode" upgrading="$up" dur="$d" wrk="$dir/wrk.txt" \
    upgrades="$dir/upgrades.jsonl" \
    cmd="wrk -t2 -c64 -d${d}s --latency $([[ $mode == close ]] && echo "-H 'Connection: close' ")-s scripts/bench/count-closes.lua http://127.0.0.1:PORT/"
  stop_peer "$dir"
}

idle_one() {
  local peer=$1 dir port
  newdir "$peer"; dir=$NEWDIR; port=$(free_port)
  start_peer "$peer" "$dir" "$port" || { record kind=idle peer="$peer" error="did not start"; stop_peer "$dir"; return 0; }
  log "idle: $peer, 64 idle keep-alive connections through one upgrade"
  bounded 180 "${PROBE[@]}" idle --kind "$KIND" "${PEER_ARGS[@]}" --conns 64 --out "$dir/idle.json" >/dev/null 2>>"$dir/probe.log" || true
  record kind=idle peer="$peer" file="$dir/idle.json"
  stop_peer "$dir"
}

latency_one() {
  local peer=$1 dir port t=60
  newdir "$peer"; dir=$NEWDIR; port=$(free_port)
  start_peer "$peer" "$dir" "$port" || { record kind=latency peer="$peer" error="did not start"; stop_peer "$dir"; return 0; }
  log "latency: $peer, $LATN upgrades, idle"
  [[ $peer == pingora ]] && t=$((LATN * 15 + 60))
  bounded $((t + LATN * 20)) "${PROBE[@]}" upgrade --kind "$KIND" "${PEER_ARGS[@]}" --count "$LATN" --gap 0.2 \
    --gone-timeout "$([[ $peer == pingora ]] && echo 20 || echo 10)" \
    --out "$dir/latency.jsonl" >/dev/null 2>>"$dir/probe.log" || true
  record kind=latency peer="$peer" file="$dir/latency.jsonl"
  stop_peer "$dir"
}

if want load; then
  for peer in $PEERS; do
    skipped "$peer" && continue
    if [[ $peer == baton-demo ]]; then
      load_one baton-demo keepalive 0
    fi
    load_one "$peer" keepalive 1
    if [[ $peer == baton-demo ]]; then
      load_one baton-demo close 0
    fi
    load_one "$peer" close 1
  done
fi

if want idle; then
  for peer in $PEERS; do skipped "$peer" || idle_one "$peer"; done
fi

if want steady && want_peer baton-demo; then
  # Both servers up at once (an idle one costs nothing), wrk alternates.
  newdir baton-demo; bdir=$NEWDIR; newdir plain; pdir=$NEWDIR; bport=$(free_port); pport=$(free_port)
  start_peer baton-demo "$bdir" "$bport"
  start_peer plain "$pdir" "$pport"
  for r in $(seq "$ROUNDS"); do
    order="baton plain"; (( r % 2 == 0 )) && order="plain baton"
    for w in $order; do
      if [[ $w == baton ]]; then port=$bport; d=$bdir; else port=$pport; d=$pdir; fi
      log "steady: $w, round $r/$ROUNDS, ${DUR}s"
      wrk_run "$d/wrk-$r.txt" "$DUR" "http://127.0.0.1:$port/"
      record kind=steady server="$w" round="$r" wrk="$d/wrk-$r.txt" \
        cmd="wrk -t2 -c64 -d${DUR}s --latency -s scripts/bench/count-closes.lua http://127.0.0.1:PORT/"
    done
  done
  stop_peer "$bdir"; stop_peer "$pdir"
fi

if want latency; then
  for peer in $PEERS; do
    case "$peer" in haproxy-idle-close) continue ;; esac   # same reload as haproxy
    skipped "$peer" || latency_one "$peer"
  done
fi

if want handoff && want_peer baton-demo; then
  log "handoff: bench-handoff $SCALE"
  # shellcheck disable=SC2086
  bounded 600 "$HANDOFF_BIN" --server "$BIN/baton-demo" $SCALE > "$RUN/handoff.md" 2>"$RUN/handoff.err" || true
  record kind=handoff file="$RUN/handoff.md" err="$RUN/handoff.err" \
    cmd="${HANDOFF_BIN#"$ROOT"/} --server ${BIN_DIR:-target/release}/baton-demo $SCALE"
fi

if want memory; then
  if want_peer baton-demo; then
    newdir baton-demo; bdir=$NEWDIR; newdir plain; pdir=$NEWDIR; bport=$(free_port); pport=$(free_port)
    start_peer baton-demo "$bdir" "$bport"; start_peer plain "$pdir" "$pport"
    sleep 1
    record kind=memory what="baton-demo (library mode), idle after start" \
      kib="$("${PROBE[@]}" rss "$(cat "$bdir/pid")")"
    record kind=memory what="baton-demo --plain (no baton), idle after start" \
      kib="$("${PROBE[@]}" rss "$(cat "$pdir/pid")")"
    bounded 60 "${PROBE[@]}" upgrade --kind baton --port "$bport" --pidfile "$bdir/pid" >/dev/null 2>&1 || true
    sleep 1
    record kind=memory what="baton-demo (library mode), idle after one upgrade" \
      kib="$("${PROBE[@]}" rss "$(cat "$bdir/pid")")"
    stop_peer "$bdir"; stop_peer "$pdir"
  fi
  if want_peer baton-run; then
    if skipped baton-run; then
      record kind=memory what="\`baton run\` supervisor" kib="" note="skipped: no \`baton\` binary"
    else
      for cli in "$BIN/baton-static" "$BIN/baton"; do
        [[ -x $cli ]] || continue
        what="\`baton run\` supervisor only, idle ($([[ $cli == */baton-static ]] && echo "static build" || echo "default build, shared glibc"))"
        newdir baton-run; sdir=$NEWDIR; sport=$(free_port)
        if BATON_CLI=$cli start_peer baton-run "$sdir" "$sport"; then
          sleep 1
          record kind=memory what="$what" kib="$("${PROBE[@]}" rss "$(cat "$sdir/pid")")"
        fi
        stop_peer "$sdir"
      done
    fi
  fi
fi

record kind=end load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
mkdir -p target/bench
python3 "$HERE/report.py" "$RES" | tee target/bench/latest.md
