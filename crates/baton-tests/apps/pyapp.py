"""A stdlib-only HTTP server for baton's supervisor tests.

It serves the sockets at fds 3.. (systemd socket activation, as `baton run`
passes them: LISTEN_FDS of them) and answers:

  GET /version  {"pid", "generation", "version", "listen_pid", "listen_fds",
                 "listen_fdnames", "ppid"} as JSON
  GET /health   200 "ok" (503 during --unhealthy-for)
  GET /slow?ms=N
  GET /hold?file=PATH   answers once PATH exists (at most 60 s), so a test
                        decides when a long request ends

Behaviour for readiness and fault tests, from flags or from a fault file
that the first generation to start claims (rename) and consumes, so a test
can arm a fault for the *next* generation only:

  --start-delay S    sleep S seconds before accepting
  --notify           send READY=1 (and STATUS=) to $NOTIFY_SOCKET once serving
  --notify-delay S   ...but only S seconds after it started serving
  --probe-port       also serve /health on 127.0.0.1:$BATON_PROBE_PORT
  --orphans N        at start, leave N orphans behind: double-forked processes
                     that exit after --orphan-life S seconds (PID 1 must reap
                     them)
  --exit-on-term C   exit with code C after a SIGTERM stop
  --fault-file PATH  lines: hang | exit:CODE | start-delay:S | notify-delay:S |
                     health-bad-after:S (GET /health answers 503 from S seconds
                     after start) | stop-at:POINT (SIGSTOP itself at POINT:
                     start, listening, ready = right after answering its first
                     GET /health)

SIGTERM: stop accepting, finish in-flight requests, exit 0.
"""

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

p = argparse.ArgumentParser()
p.add_argument("--version", default="py-1")
p.add_argument("--start-delay", type=float, default=0.0)
p.add_argument("--notify", action="store_true")
p.add_argument("--notify-delay", type=float, default=0.0)
p.add_argument("--probe-port", action="store_true")
p.add_argument("--unhealthy-for", type=float, default=0.0)
p.add_argument("--fault-file")
p.add_argument("--orphans", type=int, default=0)
p.add_argument("--orphan-life", type=float, default=1.0)
p.add_argument("--exit-on-term", type=int, default=0)
args = p.parse_args()
args.health_bad_after = None
args.stop_at = None

GEN = int(os.environ.get("BATON_GENERATION", "0"))
PID = os.getpid()


def log(msg):
    print(f"pyapp gen {GEN} pid {PID}: {msg}", file=sys.stderr, flush=True)


def take_faults(path):
    if not path:
        return []
    claimed = f"{path}.{PID}"
    try:
        os.rename(path, claimed)
    except OSError:
        return []
    with open(claimed) as f:
        lines = [l.strip() for l in f if l.strip()]
    os.unlink(claimed)
    return lines


for fault in take_faults(args.fault_file):
    log(f"fault armed: {fault}")
    name, _, arg = fault.partition(":")
    if name == "hang":
        while True:
            time.sleep(3600)
    elif name == "exit":
        sys.exit(int(arg or "1"))
    elif name == "start-delay":
        args.start_delay = float(arg)
    elif name == "notify-delay":
        args.notify_delay = float(arg)
    elif name == "health-bad-after":
        args.health_bad_after = float(arg)
    elif name == "stop-at":
        args.stop_at = arg


# Set before the fault point `ready` answers its probe: from then on the
# accept loop takes no connection (they stay queued for baton), so the
# point is exact.
HOLD_ACCEPT = threading.Event()


def stop_at(point):
    if args.stop_at == point:
        args.stop_at = None
        log(f"stopping myself at {point}")
        os.kill(PID, signal.SIGSTOP)


stop_at("start")


def sd_notify(msg):
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        log("no NOTIFY_SOCKET")
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(msg.encode())


STARTED = time.monotonic()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, status, body, ctype="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        u = urlparse(self.path)
        if u.path == "/version":
            body = json.dumps(
                {
                    "pid": PID,
                    "ppid": os.getppid(),
                    "generation": GEN,
                    "version": args.version,
                    "listen_pid": os.environ.get("LISTEN_PID"),
                    "listen_fds": os.environ.get("LISTEN_FDS"),
                    "listen_fdnames": os.environ.get("LISTEN_FDNAMES"),
                }
            ).encode()
            self.reply(200, body, "application/json")
        elif u.path == "/health":
            age = time.monotonic() - STARTED
            if age < args.unhealthy_for:
                self.reply(503, b"warming up")
            elif args.health_bad_after is not None and age >= args.health_bad_after:
                self.reply(503, b"unhealthy (fault)")
            else:
                if args.stop_at == "ready":
                    HOLD_ACCEPT.set()
                self.reply(200, b"ok")
                self.wfile.flush()
                stop_at("ready")
        elif u.path == "/hold":
            path = parse_qs(u.query).get("file", [""])[0]
            deadline = time.monotonic() + 60
            while path and not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.01)
            self.reply(200, f"held until {path} in pid {PID}".encode())
        elif u.path == "/notify":
            # /notify?line=STATUS%3D...: send that line to $NOTIFY_SOCKET now
            line = parse_qs(u.query).get("line", [""])[0]
            try:
                sd_notify(line)
                self.reply(200, f"sent {line}".encode())
            except OSError as e:
                self.reply(500, f"sd_notify({line}) failed: {e}".encode())
        elif u.path == "/slow":
            ms = int(parse_qs(u.query).get("ms", ["1000"])[0])
            time.sleep(ms / 1000)
            self.reply(200, f"slept {ms} ms in pid {PID}".encode())
        else:
            self.reply(200, f"hello from pyapp {args.version} generation {GEN} pid {PID}\n".encode())


class Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def get_request(self):
        while HOLD_ACCEPT.is_set():
            time.sleep(3600)
        return super().get_request()


def serve_on(sock):
    srv = Server(("127.0.0.1", 0), Handler, bind_and_activate=False)
    srv.socket.close()
    srv.socket = sock
    return srv


if args.start_delay:
    log(f"starting slowly: {args.start_delay} s")
    time.sleep(args.start_delay)

nfds = int(os.environ.get("LISTEN_FDS", "1"))
listener = socket.socket(fileno=3)
server = serve_on(listener)
# Further listeners (fd 4, ...) are served by threads.
others = [serve_on(socket.socket(fileno=fd)) for fd in range(4, 3 + nfds)]
for o in others:
    threading.Thread(target=o.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

if args.probe_port:
    port = int(os.environ["BATON_PROBE_PORT"])
    probe = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    probe.daemon_threads = True
    threading.Thread(target=probe.serve_forever, daemon=True).start()
    log(f"probe port {port}")


def on_term(signum, frame):
    log(f"{signal.Signals(signum).name}: stopping")
    for srv in [server] + others:
        threading.Thread(target=srv.shutdown, daemon=True).start()


signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGQUIT, on_term)  # for baton run --stop-signal QUIT

if args.notify:
    def notify():
        time.sleep(args.notify_delay)
        sd_notify(f"READY=1\nSTATUS=pyapp generation {GEN} serving")
        log("sent READY=1")

    sd_notify(f"STATUS=pyapp generation {GEN} warming up")
    threading.Thread(target=notify, daemon=True).start()

stop_at("listening")
def leave_orphans(n, life):
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            # The middle process exits at once: its child is an orphan.
            if os.fork() == 0:
                time.sleep(life)
                os._exit(0)
            os._exit(0)
        os.waitpid(pid, 0)
    log(f"left {n} orphans behind")


if args.orphans:
    leave_orphans(args.orphans, args.orphan_life)

log(f"serving fd 3 ({listener.getsockname()}), LISTEN_PID={os.environ.get('LISTEN_PID')}")
server.serve_forever(poll_interval=0.05)
server.server_close()
log(f"stopped; exit code {args.exit_on_term}")
sys.exit(args.exit_on_term)
