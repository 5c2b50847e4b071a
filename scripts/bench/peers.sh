# The peers of scripts/bench/run.sh (sourced, not run): how each is
# installed or built (prepare_*) and started (start_peer). Every server is
# started on $SRV_CPU ("${ON_SRV[@]}"); what it forks or re-executes inherits that.
# shellcheck shell=bash

# -------------------------------------------------------------- prepare ----
# Each prepare_* installs or builds what a peer or scenario needs, or records
# a failure of the run (fail) with the reason.

prepare_baton() {   # baton-demo, bench-handoff, bench-spawn, baton (release, or --bin-dir)
  if [[ -n $BIN_DIR ]]; then
    local b; for b in baton-demo bench-handoff bench-spawn baton; do
      [[ -x $BIN_DIR/$b ]] && cp "$BIN_DIR/$b" "$BIN/$b"
    done
  else
    log "building baton-demo, baton, bench-handoff and bench-spawn (release)"
    cargo build --release -q -p baton-demo -p baton-cli -p baton-tests --bins >&2
    cp "$CARGO_TARGET/release/"{baton-demo,bench-handoff,bench-spawn,baton} "$BIN/"
  fi
  [[ -x $BIN/baton-demo ]] || { fail baton-demo "no baton-demo in ${BIN_DIR:-$CARGO_TARGET/release}"; return 1; }
}

# baton-demo linked statically (the spawn scenario compares its upgrades with
# the default dynamic build's): $BIN/baton-demo-static, or nothing.
prepare_demo_static() {
  log "building baton-demo statically (scripts/build-static.sh baton-demo)"
  local static
  if static=$("$ROOT/scripts/build-static.sh" baton-demo 2>"$RUN/build-static-demo.log"); then
    cp "$static" "$BIN/baton-demo-static"
  else
    fail spawn "scripts/build-static.sh baton-demo failed: $(tail -1 "$RUN/build-static-demo.log")"
  fi
}

# `baton run` in the two builds the memory scenario compares: the static one
# (scripts/build-static.sh; the one the other scenarios use) and a plain
# `cargo install` (dynamic, the default release build).
prepare_baton_run() {
  BATON_CLI=""
  if [[ -n $BIN_DIR ]]; then
    [[ -x $BIN/baton ]] || { fail baton-run "no baton in $BIN_DIR"; return 1; }
    BATON_CLI=$BIN/baton
    return 0
  fi
  log "building baton statically (scripts/build-static.sh)"
  local static
  if static=$("$ROOT/scripts/build-static.sh"); then
    cp "$static" "$BIN/baton-static"; BATON_CLI=$BIN/baton-static
  else
    fail baton-run "scripts/build-static.sh failed"; return 1
  fi
  log "cargo install --path crates/baton-cli --locked (the dynamic build)"
  if CARGO_TARGET_DIR=$CARGO_TARGET bounded 1800 cargo install -q --path "$ROOT/crates/baton-cli" \
      --locked --root "$RUN/cargo-install" >&2 2>"$RUN/cargo-install.log"; then
    cp "$RUN/cargo-install/bin/baton" "$BIN/baton-installed"
  else
    fail baton-run "cargo install --path crates/baton-cli --locked failed: $(tail -1 "$RUN/cargo-install.log")"
    return 1
  fi
}

prepare_nginx() { command -v nginx >/dev/null || need "$1" nginx-light; }
prepare_haproxy() { command -v haproxy >/dev/null || need "$1" haproxy; }

prepare_tableflip() {
  need tableflip golang-go golang-github-cloudflare-tableflip-dev || return 1
  log "building the tableflip server (GOPATH mode)"
  mkdir -p "$RUN/go/src/tableflip-server"
  cp "$HERE/tableflip-server/main.go" "$RUN/go/src/tableflip-server/"
  (cd "$RUN/go/src/tableflip-server" && GO111MODULE=off GOPATH=/usr/share/gocode:$RUN/go \
    GOCACHE=$RUN/go/cache GOFLAGS= bounded 600 go build -o "$BIN/tableflip-server" .) >&2 \
    || { fail tableflip "go build of scripts/bench/tableflip-server failed"; return 1; }
}

# A standalone cargo project under scripts/bench/NAME-server, built with its
# own lockfile into its own target dir (kept between runs).
build_cargo_peer() {   # build_cargo_peer PEER DIR BIN
  local peer=$1 dir=$2 bin=$3
  log "building the $peer server (scripts/bench/$dir: own lockfile and target dir; slow the first time)"
  if (cd "$HERE/$dir" && CARGO_TARGET_DIR=$CARGO_TARGET/bench/$peer \
      bounded 2400 cargo build --release --locked -q) >"$RUN/$peer-build.log" 2>&1; then
    cp "$CARGO_TARGET/bench/$peer/release/$bin" "$BIN/$peer-server"
  else
    fail "$peer" "cargo build --locked of scripts/bench/$dir failed: $(grep -m1 -E '^error' "$RUN/$peer-build.log")"
    return 1
  fi
}
prepare_pingora() { need pingora cmake && build_cargo_peer pingora pingora-server bench-pingora-server; }
prepare_ecdysis() { build_cargo_peer ecdysis ecdysis-server bench-ecdysis-server; }

prepare_node() { command -v node >/dev/null || need "$1" nodejs; }

# The test suite's Go app (crates/baton-tests/apps/go: standard library
# only, takes fd 3), built as the tests build it: $BIN/go-app.
prepare_goapp() {
  command -v go >/dev/null || need "$1" golang-go || return 1
  log "building the Go app (crates/baton-tests/apps/go)"
  (GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=0 GOCACHE=$CARGO_TARGET/bench/go-cache \
    bounded 600 go build -o "$BIN/go-app" "$APPS/go/main.go") >&2 \
    || { fail "$1" "go build of crates/baton-tests/apps/go failed"; return 1; }
}

# oha (crates.io), the fixed-rate load client: the pinned version, installed
# once into target/bench/oha (its own target dir, kept between runs). It
# needs a TLS feature to build; native-tls links Debian's OpenSSL, lighter
# than its default rustls + aws-lc (a C build). The bench speaks plain HTTP.
OHA_VERSION=1.16.0
prepare_oha() {
  OHA=$CARGO_TARGET/bench/oha/bin/oha
  [[ -x $OHA ]] && [[ $("$OHA" --version 2>/dev/null) == "oha $OHA_VERSION" ]] && return 0
  need "$1" libssl-dev pkg-config || return 1
  log "cargo install oha $OHA_VERSION --locked into target/bench/oha (the first time only; minutes)"
  if CARGO_TARGET_DIR=$CARGO_TARGET/bench/oha-build bounded 2400 cargo install -q oha --version "$OHA_VERSION" \
      --locked --no-default-features --features native-tls --root "$CARGO_TARGET/bench/oha" \
      >"$RUN/oha-install.log" 2>&1; then
    return 0
  fi
  fail "$1" "cargo install oha $OHA_VERSION --locked failed: $(grep -m1 -E '^error' "$RUN/oha-install.log")"
  return 1
}

# The Python venv of the clients and steering scenarios: pinned requests and
# uvicorn (scripts/bench/requirements.txt), kept in target/bench/venv.
prepare_venv() {
  VENV=$CARGO_TARGET/bench/venv
  local req=$HERE/requirements.txt
  if [[ -x $VENV/bin/python && -f $VENV/requirements.txt ]] && cmp -s "$req" "$VENV/requirements.txt"; then
    return 0
  fi
  python3 -c 'import venv, ensurepip' 2>/dev/null || need "$1" python3-venv || return 1
  log "creating $VENV (pip install -r scripts/bench/requirements.txt)"
  rm -rf "$VENV"
  if python3 -m venv "$VENV" >&2 && bounded 600 "$VENV/bin/pip" install -q --disable-pip-version-check \
      -r "$req" >"$RUN/pip.log" 2>&1; then
    cp "$req" "$VENV/requirements.txt"
  else
    fail "$1" "pip install -r scripts/bench/requirements.txt failed: $(tail -1 "$RUN/pip.log")"
    return 1
  fi
}

# Java: Apache HttpClient 4.5 from Debian, and a JDK to compile the client.
prepare_java() {
  local pkgs=(libhttpclient-java)
  command -v javac >/dev/null || pkgs+=(default-jdk-headless)
  need java-httpclient "${pkgs[@]}" || return 1
  JAVA_CP=$RUN/java:/usr/share/java/httpclient.jar:/usr/share/java/httpcore.jar:/usr/share/java/commons-logging.jar:/usr/share/java/commons-codec.jar
  mkdir -p "$RUN/java"
  bounded 300 javac -nowarn -cp "$JAVA_CP" -d "$RUN/java" "$HERE/clients/HttpClientBench.java" >&2 \
    || { fail java-httpclient "javac scripts/bench/clients/HttpClientBench.java failed"; return 1; }
}

# ---------------------------------------------------------------- start ----
# start_peer NAME DIR PORT: start one instance on $SRV_CPU; sets KIND and
# PEER_ARGS (the probe's peer options) and waits until it answers.
# H2=1 (nginx, haproxy): serve HTTP/2 cleartext (prior knowledge) instead.
# EXTRA: more baton-demo arguments.
start_peer() {
  local name=$1 dir=$2 port=$3 path=/
  mkdir -p "$dir"
  PEER_ARGS=(--port "$port" --pidfile "$dir/pid")
  case "$name" in
    baton-demo)
      KIND=baton
      # --no-state: none of the peers carries state; the demo's own state
      # handoff is measured in docs/state.md.
      # shellcheck disable=SC2086
      # DEMO_BIN: another build of it (the spawn scenario's static one)
      "${ON_SRV[@]}" "${DEMO_BIN:-$BIN/baton-demo}" --listen "127.0.0.1:$port" --pid-file "$dir/pid" \
        --control "$dir/ctl/ctl.sock" --no-state --log warn ${EXTRA:-} >>"$dir/log" 2>&1 &
      ;;
    plain)
      KIND=stopstart
      "${ON_SRV[@]}" "$BIN/baton-demo" --plain --listen "127.0.0.1:$port" --pid-file "$dir/pid" --log warn >>"$dir/log" 2>&1 &
      ;;
    stop-start)
      KIND=stopstart
      local cmd="taskset -c $SRV_CPU $BIN/baton-demo --plain --listen 127.0.0.1:$port --pid-file $dir/pid --log warn"
      $cmd >>"$dir/log" 2>&1 &
      PEER_ARGS+=(--cmd "$cmd" --log "$dir/log")
      ;;
    baton-run)
      KIND=baton-run
      "${ON_SRV[@]}" "$BATON_CLI" run --listen "http=127.0.0.1:$port" --control "$dir/ctl/ctl.sock" --ready notify \
        -- "$BIN/baton-demo" --plain --log warn >>"$dir/log" 2>&1 &
      echo $! > "$dir/pid"
      ;;
    baton-run-node)
      KIND=baton-run
      "${ON_SRV[@]}" "$BATON_CLI" run --listen "http=127.0.0.1:$port" --control "$dir/ctl/ctl.sock" \
        --ready "http://127.0.0.1:$port/health" -- node "$APPS/node_server.js" >>"$dir/log" 2>&1 &
      echo $! > "$dir/pid"
      ;;
    baton-run-node-front)
      # the clients scenario's `baton run` + Node row, through the front
      KIND=baton-run
      "${ON_SRV[@]}" "$BATON_CLI" run --front http --listen "http=127.0.0.1:$port" --control "$dir/ctl/ctl.sock" \
        --ready "http://127.0.0.1:$port/health" -- node "$APPS/node_server.js" >>"$dir/log" 2>&1 &
      echo $! > "$dir/pid"
      ;;
    baton-run-go|baton-run-go-front|baton-run-go-front-unix)
      # the front scenario: the suite's Go app under `baton run`, direct or
      # through the front, over TCP or a Unix upstream (its /version names
      # its pid; /health is trivial)
      KIND=baton-run path=/version
      local front=()
      [[ $name == baton-run-go-front ]] && front=(--front http)
      [[ $name == baton-run-go-front-unix ]] && front=(--front http --front-upstream unix)
      "${ON_SRV[@]}" "$BATON_CLI" run "${front[@]+"${front[@]}"}" --listen "http=127.0.0.1:$port" \
        --control "$dir/ctl/ctl.sock" --ready "http://127.0.0.1:$port/health" -- "$BIN/go-app" >>"$dir/log" 2>&1 &
      echo $! > "$dir/pid"
      PEER_ARGS+=(--path /version)
      ;;
    uvicorn-steer|uvicorn-nosteer)
      # The command line of the supervisor test
      # uvicorn_ten_upgrades_lose_nothing_with_steering_compared_with_plain_sigterm.
      KIND=baton-run path=/version
      local opts=()
      [[ $name == uvicorn-nosteer ]] && opts=(--no-steer --ready delay=1s)
      "${ON_SRV[@]}" "$BATON_CLI" run --name "$name" --listen "http=127.0.0.1:$port" --control "$dir/ctl/ctl.sock" \
        "${opts[@]+"${opts[@]}"}" --drain-timeout 20s -- "$VENV/bin/uvicorn" --fd 3 --app-dir "$APPS" \
        --lifespan off --log-level warning asgi_app:app >>"$dir/log" 2>&1 &
      echo $! > "$dir/pid"
      PEER_ARGS+=(--path /version)
      ;;
    tableflip)
      KIND=tableflip
      "${ON_SRV[@]}" "$BIN/tableflip-server" --listen "127.0.0.1:$port" --pid-file "$dir/pid" >>"$dir/log" 2>&1 &
      ;;
    ecdysis)
      KIND=ecdysis
      "${ON_SRV[@]}" "$BIN/ecdysis-server" --listen "127.0.0.1:$port" --pid-file "$dir/pid" >>"$dir/log" 2>&1 &
      ;;
    nginx-binary|nginx-reload)
      KIND=$name
      mkdir -p "$dir/logs"
      sed -e "s#@DIR@#$dir#g" -e "s#@PORT@#$port#g" -e "s#@HTTP2@#$([[ ${H2:-0} == 1 ]] && echo ' http2')#" \
        "$HERE/nginx.conf" > "$dir/nginx.conf"
      # absolute path: the binary upgrade re-executes argv[0]
      "${ON_SRV[@]}" "$(command -v nginx)" -p "$dir" -c "$dir/nginx.conf" >>"$dir/log" 2>&1
      ;;
    haproxy|haproxy-idle-close)
      KIND=haproxy
      local opt="" bind=""
      [[ $name == haproxy-idle-close ]] && opt="option idle-close-on-response"
      [[ ${H2:-0} == 1 ]] && bind="proto h2"
      sed -e "s#@DIR@#$dir#g" -e "s#@PORT@#$port#g" -e "s#@OPTION@#$opt#" -e "s#@BIND@#$bind#" \
        "$HERE/haproxy.cfg" > "$dir/haproxy.cfg"
      "${ON_SRV[@]}" haproxy -W -f "$dir/haproxy.cfg" -p "$dir/pid" >>"$dir/log" 2>&1 &
      ;;
    haproxy-backend)
      # HAProxy in front of a backend (the plain hyper server, which is not
      # reloaded); HAProxy names its own pid in X-Served-By-Pid.
      KIND=haproxy
      local bport; bport=$(free_port)
      "${ON_SRV[@]}" "$BIN/baton-demo" --plain --listen "127.0.0.1:$bport" --pid-file "$dir/backend.pid" \
        --log warn >>"$dir/backend.log" 2>&1 &
      "${PROBE[@]}" wait --port "$bport" --timeout 30 >/dev/null || return 1
      sed -e "s#@DIR@#$dir#g" -e "s#@PORT@#$port#g" -e "s#@BACKEND@#127.0.0.1:$bport#" \
        "$HERE/haproxy-backend.cfg" > "$dir/haproxy.cfg"
      "${ON_SRV[@]}" haproxy -W -f "$dir/haproxy.cfg" -p "$dir/pid" >>"$dir/log" 2>&1 &
      ;;
    nginx-ws|haproxy-ws)
      # A proxy in front of one WebSocket backend (baton-demo's /ws, never
      # upgraded): the ws scenario. WS_STOP_AFTER is the stated limit on the
      # old worker's life (worker_shutdown_timeout / hard-stop-after).
      local bport; bport=$(free_port)
      "${ON_SRV[@]}" "$BIN/baton-demo" --listen "127.0.0.1:$bport" --pid-file "$dir/backend.pid" \
        --no-state --log warn >>"$dir/backend.log" 2>&1 &
      "${PROBE[@]}" wait --port "$bport" --timeout 30 >/dev/null || return 1
      if [[ $name == nginx-ws ]]; then
        KIND=nginx-reload
        mkdir -p "$dir/logs"
        sed -e "s#@DIR@#$dir#g" -e "s#@PORT@#$port#g" -e "s#@BACKEND@#127.0.0.1:$bport#" \
          -e "s#@STOP_AFTER@#${WS_STOP_AFTER}s#" "$HERE/nginx-ws.conf" > "$dir/nginx.conf"
        "${ON_SRV[@]}" "$(command -v nginx)" -p "$dir" -c "$dir/nginx.conf" >>"$dir/log" 2>&1
      else
        KIND=haproxy
        sed -e "s#@DIR@#$dir#g" -e "s#@PORT@#$port#g" -e "s#@BACKEND@#127.0.0.1:$bport#" \
          -e "s#@STOP_AFTER@#${WS_STOP_AFTER}s#" "$HERE/haproxy-ws.cfg" > "$dir/haproxy.cfg"
        "${ON_SRV[@]}" haproxy -W -f "$dir/haproxy.cfg" -p "$dir/pid" >>"$dir/log" 2>&1 &
      fi
      ;;
    nginx-tls|haproxy-tls)
      # TLS termination (the tls scenario): HTTPS on $TLS_PORT with the
      # certificate in $TLS_DIR (cert.pem, key.pem), plain HTTP on PORT.
      if [[ $name == nginx-tls ]]; then
        KIND=nginx-reload
        mkdir -p "$dir/logs"
        sed -e "s#@DIR@#$dir#g" -e "s#@PORT@#$port#g" -e "s#@TLSPORT@#$TLS_PORT#g" \
          -e "s#@CERT@#$TLS_DIR/cert.pem#" -e "s#@KEY@#$TLS_DIR/key.pem#" "$HERE/nginx-tls.conf" > "$dir/nginx.conf"
        "${ON_SRV[@]}" "$(command -v nginx)" -p "$dir" -c "$dir/nginx.conf" >>"$dir/log" 2>&1
      else
        KIND=haproxy
        sed -e "s#@DIR@#$dir#g" -e "s#@PORT@#$port#g" -e "s#@TLSPORT@#$TLS_PORT#g" \
          -e "s#@PEM@#$TLS_DIR/haproxy.pem#" "$HERE/haproxy-tls.cfg" > "$dir/haproxy.cfg"
        "${ON_SRV[@]}" haproxy -W -f "$dir/haproxy.cfg" -p "$dir/pid" >>"$dir/log" 2>&1 &
      fi
      ;;
    pingora)
      KIND=pingora
      sed -e "s#@DIR@#$dir#g" "$HERE/pingora.yaml" > "$dir/pingora.yaml"
      local cmd="taskset -c $SRV_CPU $BIN/pingora-server -c $dir/pingora.yaml"
      BENCH_LISTEN=127.0.0.1:$port $cmd >>"$dir/log" 2>&1 &
      echo $! > "$dir/pid"
      PEER_ARGS+=(--cmd "$cmd" --env "BENCH_LISTEN=127.0.0.1:$port" --log "$dir/log"
                  --upgrade-sock "$dir/upgrade.sock")
      ;;
    *) echo "unknown peer $name" >&2; return 1 ;;
  esac
  if [[ ${H2:-0} == 1 ]]; then
    # h2c prior knowledge only: wait for the port
    local i; for i in $(seq 300); do
      "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1',$port),1)" 2>/dev/null && break
      sleep 0.1
    done
  else
    "${PROBE[@]}" wait --port "$port" --path "$path" --timeout 30 >/dev/null || { tail -5 "$dir/log" >&2; return 1; }
  fi
  local i; for i in $(seq 300); do [[ -s $dir/pid ]] && break; sleep 0.01; done
  [[ -s $dir/pid ]] || { echo "$name wrote no pid file" >&2; return 1; }
}
stop_peer() { "${PROBE[@]}" cleanup "$1" >/dev/null 2>&1 || true; }
