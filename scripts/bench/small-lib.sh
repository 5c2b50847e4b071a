# small-lib.sh: what the small A/B scripts (front-cpu.sh, front-peers.sh)
# share: sourced, after they set ROOT and TARGET.

# build_go_app PATH: the suite's Go app (crates/baton-tests/apps/go) at
# PATH, unless it is there.
build_go_app() {
  [[ -x $1 ]] && return 0
  mkdir -p "$(dirname "$1")"
  (GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0 GOCACHE=$TARGET/bench/go-cache \
    timeout 600 go build -o "$1" "$ROOT/crates/baton-tests/apps/go/main.go")
}

# start_run NAME: a temporary directory in RUN, removed at exit with every
# process in PIDS stopped (TERM, then KILL after 30 s).
start_run() {
  RUN=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
  PIDS=()
  trap _small_cleanup EXIT
}
_small_cleanup() {
  local p
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do timeout 30 tail --pid="$p" -f /dev/null 2>/dev/null || kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$RUN"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
