#!/usr/bin/env python3
"""Upgrade drivers and probes for scripts/bench/run.sh (Python 3 stdlib only).

Every peer is upgraded the same way in every scenario, by this file:

  upgrade  N upgrades in a row; for each, the time from the trigger to the
           new generation "ready" and to the old generation "gone" (JSON lines)
  idle     64 keep-alive connections make a request, sit idle through one
           upgrade, then send another request on the same socket: which
           generation answers (old / new / none)
  wait     wait until a URL answers
  rss      resident memory of processes

Definitions (the same for every peer, measured from outside):
  trigger  the operator's first action: the signal (or, for pingora, the
           spawn of the new binary with -u; for stop+start, the SIGTERM)
  ready    a fresh TCP connection sent "GET /" is answered by a process that
           is not part of the old generation (every peer puts its pid in the
           body: nginx $pid, HAProxy %pid, ...). Polled in a loop, one
           connection at a time, ~0.1-0.3 ms apart.
  gone     every process of the old generation has exited (no /proc entry,
           or a zombie). Polled in the same loop.
"""

import argparse
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time

PID_RE = re.compile(rb"pid (\d+)")


def now():
    return time.perf_counter()


def read_pid(path):
    with open(path) as f:
        return int(f.read().split()[0])


def alive(pid):
    """True if the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # state is the field after the ")" that ends the command name
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def children(pid):
    """Direct children of pid (all threads)."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except FileNotFoundError:
                pass
    except FileNotFoundError:
        pass
    return out


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children(p):
            out.append(c)
            todo.append(c)
    return out


def reap():
    """Reap our own exited children (pingora / stop+start spawns)."""
    try:
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
    except ChildProcessError:
        return


def http_get(host, port, timeout=1.0, path="/"):
    """One request on a fresh connection; returns (pid or None, error)."""
    try:
        s = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        return None, f"connect: {e.__class__.__name__}"
    try:
        s.settimeout(timeout)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = read_response(s)
        if data is None:
            return None, "closed"
        m = PID_RE.search(data[1])
        return (int(m.group(1)) if m else None), None
    except OSError as e:
        return None, f"io: {e.__class__.__name__}"
    finally:
        s.close()


def read_response(s):
    """Read one HTTP/1.1 response with a Content-Length body.
    Returns (head bytes, body bytes), or None on EOF before a full response."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    m = re.search(rb"(?i)content-length:\s*(\d+)", head)
    n = int(m.group(1)) if m else 0
    while len(rest) < n:
        chunk = s.recv(65536)
        if not chunk:
            return None
        rest += chunk
    return head, rest[:n]


class Peer:
    """How one peer is upgraded. run.sh passes --kind and the paths."""

    def __init__(self, a):
        self.a = a
        self.kind = a.kind
        self.host, self.port = a.host, a.port
        self.pending_quit = None
        self.spawned = []

    # -- the old generation -------------------------------------------------
    def snapshot(self):
        """(pids whose answers are 'old', pids that must exit for 'gone')."""
        k = self.kind
        root = read_pid(self.a.pidfile)
        if k in ("baton", "tableflip", "pingora", "stopstart"):
            return {root}, {root}
        if k == "nginx-binary":
            tree = {root, *descendants(root)}
            return tree, tree
        if k in ("nginx-reload", "haproxy", "baton-run"):
            # the master / supervisor stays; its current children are the old
            # generation
            tree = set(descendants(root))
            return tree | {root}, tree
        raise SystemExit(f"unknown kind {k}")

    # -- the trigger ----------------------------------------------------------
    def trigger(self):
        k, a = self.kind, self.a
        root = read_pid(a.pidfile)
        if k == "baton":
            os.kill(root, signal.SIGUSR2)
        elif k == "tableflip":
            os.kill(root, signal.SIGHUP)
        elif k == "nginx-binary":
            os.kill(root, signal.SIGUSR2)
            self.pending_quit = root
        elif k == "nginx-reload":
            os.kill(root, signal.SIGHUP)
        elif k == "haproxy":
            os.kill(root, signal.SIGUSR2)
        elif k == "baton-run":
            os.kill(root, signal.SIGHUP)
        elif k == "pingora":
            # The documented sequence: start the new binary with -u (it binds
            # upgrade_sock and waits for the listeners), then SIGQUIT the old
            # one, which connects there and sends them. We remove a stale
            # socket file first and signal as soon as the new one exists.
            try:
                os.unlink(a.upgrade_sock)
            except FileNotFoundError:
                pass
            p = self.spawn(shlex.split(a.cmd) + ["-u"])
            deadline = now() + 30
            while not os.path.exists(a.upgrade_sock):
                if now() > deadline or p.poll() is not None:
                    raise RuntimeError("pingora -u did not create its upgrade socket")
                time.sleep(0.0001)
            os.kill(root, signal.SIGQUIT)
            self.write_pid(p.pid)
        elif k == "stopstart":
            os.kill(root, signal.SIGTERM)
            deadline = now() + 30
            while alive(root):
                reap()
                if now() > deadline:
                    raise RuntimeError("stop+start: the old process did not exit in 30 s")
                time.sleep(0.0001)
            p = self.spawn(shlex.split(a.cmd))
            self.write_pid(p.pid)
        else:
            raise SystemExit(f"unknown kind {k}")

    def after_ready(self):
        """nginx binary upgrade: once the new master serves, WINCH (old
        workers stop gracefully) then QUIT (old master exits)."""
        if self.pending_quit:
            os.kill(self.pending_quit, signal.SIGWINCH)
            os.kill(self.pending_quit, signal.SIGQUIT)
            self.pending_quit = None

    def spawn(self, argv):
        env = dict(os.environ)
        for kv in self.a.env or []:
            key, _, val = kv.partition("=")
            env[key] = val
        log = open(self.a.log, "ab") if self.a.log else subprocess.DEVNULL
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=log, close_fds=True)
        self.spawned.append(p)
        return p

    def write_pid(self, pid):
        tmp = self.a.pidfile + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{pid}\n")
        os.rename(tmp, self.a.pidfile)

    # -- one upgrade, timed -----------------------------------------------------
    def upgrade(self, ready_timeout, gone_timeout, poll):
        old_answer, old_procs = self.snapshot()
        t0 = now()
        self.trigger()
        t_trig = now()
        t_ready = t_gone = None
        new_pid = None
        polls = 0
        errors = []
        while True:
            t = now()
            if t_ready is None:
                tp = now()
                pid, err = http_get(self.host, self.port, timeout=1.0)
                polls += 1
                if err is not None:
                    # a poll that fails is a failed request: keep it
                    errors.append({"at_ms": round((tp - t0) * 1000, 3),
                                   "took_ms": round((now() - tp) * 1000, 3), "error": err})
                if pid is not None and pid not in old_answer:
                    t_ready, new_pid = now(), pid
                    self.after_ready()
                elif now() - t0 > ready_timeout:
                    break
            if t_gone is None:
                reap()
                if not any(alive(p) for p in old_procs):
                    t_gone = now()
            if t_ready is not None and t_gone is not None:
                break
            if t - t0 > ready_timeout + gone_timeout:
                break
            time.sleep(poll)
        ms = lambda t: None if t is None else round((t - t0) * 1000, 3)  # noqa: E731
        return {
            "trigger_ms": round((t_trig - t0) * 1000, 3),
            "ready_ms": ms(t_ready),
            "gone_ms": ms(t_gone),
            "gone_after_ready_ms": None if t_ready is None or t_gone is None
            else round((t_gone - t_ready) * 1000, 3),
            "old_pids": sorted(old_answer),
            "new_pid": new_pid,
            "polls": polls,
            "poll_errors": errors,
        }


def cmd_upgrade(a):
    peer = Peer(a)
    out = open(a.out, "a") if a.out else sys.stdout
    time.sleep(a.delay)
    ok = 0
    for i in range(a.count):
        try:
            r = peer.upgrade(a.ready_timeout, a.gone_timeout, a.poll)
        except Exception as e:  # report and stop: the next one would not be comparable
            r = {"error": str(e)}
        r["n"] = i + 1
        out.write(json.dumps(r) + "\n")
        out.flush()
        if r.get("ready_ms") is None:
            break  # the upgrade did not happen: the next one would not be comparable
        if r.get("gone_ms") is not None:
            ok += 1
        # an old generation that does not exit in time is reported and left
        # behind (run.sh's cleanup stops it); the next upgrade goes on
        if i + 1 < a.count:
            time.sleep(a.gap)
    reap()
    return 0 if ok == a.count else 1


def cmd_idle(a):
    peer = Peer(a)
    conns = []
    first = []
    for _ in range(a.conns):
        s = socket.create_connection((a.host, a.port), timeout=5)
        s.settimeout(5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        conns.append(s)
    for s in conns:
        r = read_response(s)
        m = PID_RE.search(r[1]) if r else None
        first.append(int(m.group(1)) if m else None)
    up = peer.upgrade(a.ready_timeout, a.gone_timeout, a.poll)
    old_answer = set(up["old_pids"])
    res = {"conns": a.conns, "first_answered": sum(p is not None for p in first),
           "new": 0, "old": 0, "closed_idle": 0, "failed": 0, "upgrade": up}
    for s in conns:
        # A connection the server closed while idle shows EOF (or a reset)
        # before we send: "closed_idle". One that breaks after we sent: "failed".
        try:
            s.setblocking(False)
            try:
                peek = s.recv(1, socket.MSG_PEEK)
                closed = peek == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            s.setblocking(True)
            s.settimeout(5)
            if closed:
                res["closed_idle"] += 1
                continue
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            r = read_response(s)
            m = PID_RE.search(r[1]) if r else None
            if not m:
                res["failed"] += 1
            elif int(m.group(1)) in old_answer:
                res["old"] += 1
            else:
                res["new"] += 1
        except OSError:
            res["failed"] += 1
        finally:
            s.close()
    reap()
    line = json.dumps(res)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    print(line)
    return 0


def cmd_wait(a):
    deadline = now() + a.timeout
    while now() < deadline:
        pid, _ = http_get(a.host, a.port, timeout=0.5)
        if pid is not None:
            print(pid)
            return 0
        time.sleep(0.02)
    print(f"{a.host}:{a.port} did not answer within {a.timeout} s", file=sys.stderr)
    return 1


def cmd_rss(a):
    for pid in a.pids:
        kb = None
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    kb = int(line.split()[1])
        print(kb)
    return 0


def cmd_cleanup(a):
    """Stop every process of a run directory, by pid: the pids in its pid
    files (*.pid*, e.g. nginx's .oldbin) and their descendants, and any
    process whose command line or executable is inside the directory.
    SIGTERM, then SIGKILL for what is left after --grace seconds."""
    root = os.path.realpath(a.dir)
    me = os.getpid()
    pids = set()
    for d, _, files in os.walk(root):
        for name in files:
            if ".pid" in name or name.startswith("pid"):
                try:
                    pids.add(read_pid(os.path.join(d, name)))
                except (ValueError, IndexError, OSError):
                    pass
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            exe = os.readlink(f"/proc/{entry}/exe")
        except OSError:
            continue
        if root.encode() in cmdline or exe.startswith(root + "/"):
            pids.add(int(entry))
    for p in list(pids):
        pids.update(descendants(p))
    pids.discard(me)
    pids.discard(os.getppid())
    live = [p for p in pids if alive(p)]
    for p in live:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = now() + a.grace
    while now() < deadline and any(alive(p) for p in live):
        reap()
        time.sleep(0.02)
    for p in live:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    reap()
    return 0


def cmd_stats(a):
    """min/median/max of a JSON-lines field (used by tests and debugging)."""
    vals = []
    with open(a.file) as f:
        for line in f:
            v = json.loads(line).get(a.field)
            if v is not None:
                vals.append(v)
    if vals:
        print(min(vals), statistics.median(vals), max(vals))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="action", required=True)

    def peer_args(p):
        p.add_argument("--kind", required=True,
                       choices=["baton", "tableflip", "nginx-binary", "nginx-reload", "haproxy",
                                "pingora", "stopstart", "baton-run"])
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--pidfile", required=True, help="master / supervisor / server pid")
        p.add_argument("--cmd", help="command line to start a generation (pingora, stop+start)")
        p.add_argument("--env", action="append", help="KEY=VALUE for --cmd")
        p.add_argument("--log", help="append the spawned processes' output here")
        p.add_argument("--upgrade-sock", help="pingora's upgrade_sock")
        p.add_argument("--ready-timeout", type=float, default=30)
        p.add_argument("--gone-timeout", type=float, default=60)
        p.add_argument("--poll", type=float, default=0.0001, help="pause between polls, s")
        p.add_argument("--out", help="append JSON lines here")

    p = sub.add_parser("upgrade")
    peer_args(p)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--gap", type=float, default=0.5, help="pause between upgrades, s")
    p.add_argument("--delay", type=float, default=0, help="pause before the first, s")
    p = sub.add_parser("idle")
    peer_args(p)
    p.add_argument("--conns", type=int, default=64)
    p = sub.add_parser("wait")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=30)
    p = sub.add_parser("rss")
    p.add_argument("pids", type=int, nargs="+")
    p = sub.add_parser("cleanup")
    p.add_argument("dir")
    p.add_argument("--grace", type=float, default=3)
    p = sub.add_parser("stats")
    p.add_argument("file")
    p.add_argument("field")
    a = ap.parse_args()
    return {"upgrade": cmd_upgrade, "idle": cmd_idle, "wait": cmd_wait, "rss": cmd_rss,
            "cleanup": cmd_cleanup, "stats": cmd_stats}[a.action](a)


if __name__ == "__main__":
    sys.exit(main())
