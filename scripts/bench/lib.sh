# Helpers for scripts/bench/run.sh (sourced, not run): logging, results,
# deadlines, CPU pinning and installing what a peer needs.
# shellcheck shell=bash

log() { echo "[bench $(date +%T)] $*" >&2; }

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# record key=value ... -> one JSON line in $RES
record() { "$PY" -c 'import json,sys; print(json.dumps(dict(a.split("=",1) for a in sys.argv[1:])))' "$@" >> "$RES"; }

# bounded SECONDS CMD...: every wait has a deadline
bounded() { local s=$1; shift; timeout --kill-after=5 "$s" "$@"; }

# Servers run on $SRV_CPU, every client (wrk, probes, load clients) on
# $LOAD_CPU: on 2 cores each side gets one, and neither steals from the
# other. "${ON_SRV[@]}" CMD: a command, not a function, so that `CMD &` makes
# $! the server's own pid (taskset execs it).
pin_cpus() { ON_SRV=(taskset -c "$SRV_CPU"); ON_LOAD=(taskset -c "$LOAD_CPU"); }

# A failure of the run (a peer that could not be installed or built, a
# scenario that could not run): recorded, printed in the report, and the run
# exits 1 at the end. Never a silent skip.
FAILED=()
fail() {   # fail WHAT REASON
  FAILED+=("$1")
  record kind=failure what="$1" reason="$2"
  log "FAILURE $1: $2"
}
failed() { local s; for s in "${FAILED[@]+"${FAILED[@]}"}"; do [[ $s == "$1" ]] && return 0; done; return 1; }

# ensure_apt PKG...: install the Debian packages that are missing (root, or
# sudo). Returns non-zero, with the reason in $APT_ERR, if they cannot be.
APT_UPDATED=0 APT_ERR=""
ensure_apt() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { APT_ERR="need root or sudo to install ${missing[*]}"; return 1; }
    sudo=(sudo)
  fi
  log "installing Debian packages: ${missing[*]} (apt-get output: ${RUN:-/tmp}/apt.log)"
  local out=${RUN:-/tmp}/apt.log
  local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y
             -o DPkg::Lock::Timeout=300 --no-install-recommends)
  if ! bounded 900 "${apt[@]}" install "${missing[@]}" >>"$out" 2>&1; then
    if [[ $APT_UPDATED == 0 ]]; then
      APT_UPDATED=1
      bounded 600 "${sudo[@]}" apt-get -q -o DPkg::Lock::Timeout=300 update >>"$out" 2>&1 || true
    fi
    bounded 900 "${apt[@]}" install "${missing[@]}" >>"$out" 2>&1 || {
      APT_ERR="apt-get install ${missing[*]} failed: $(grep -E '^E:' "$out" | tail -1)"; return 1; }
  fi
}

# need WHAT PKG...: ensure_apt, or a failure of the run naming WHAT.
need() {
  local what=$1; shift
  ensure_apt "$@" || { fail "$what" "$APT_ERR"; return 1; }
}
