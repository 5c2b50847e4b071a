#!/usr/bin/env python3
"""Upgrade drivers and probes for scripts/bench/run.sh (Python 3 stdlib only).

Every peer is upgraded the same way in every scenario, by this file:

  upgrade  N upgrades in a row; for each, the time from the trigger to the
           new generation "ready" and to the old generation "gone" (JSON lines)
  idle     64 keep-alive connections make a request, sit idle through one
           upgrade, then send another request on the same socket: which
           generation answers (old / new / none)
  drive    a load client runs while N upgrades happen: its totals and the
           upgrades' timings in one JSON line (h2, clients, steering)
  supervisor-mem
           `baton upgrade` a `baton run` supervisor N times; its resident
           memory (VmRSS, RssAnon, RssFile) at start and at checkpoints
  wait     wait until a URL answers
  rss      resident memory of processes (VmRSS, KiB)
  mem      VmRSS, RssAnon, RssFile, RssShmem (KiB) and Threads of
           processes (JSON)
  sample   VmRSS, RssAnon and Threads of a process sampled for a while:
           peak and median (JSON)
  cpu      CPU time of a process and of its descendants so far (JSON)
  rtt      the probe's own request time against an idle server

Definitions (the same for every peer, measured from outside):
  trigger  the operator's first action: the signal (or, for pingora, the
           spawn of the new binary with -u; for stop+start, the SIGTERM)
  ready    a fresh TCP connection sent "GET /" is answered by a process that
           is not part of the old generation (every peer names its pid: in an
           X-Served-By-Pid header -- HAProxy in front of a backend -- or in
           the body: nginx $pid, HAProxy %pid, "pid": N in JSON, ...). Polled
           in a loop, one connection at a time, ~0.1-0.3 ms apart.
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

# "pid 123" (text bodies) or "pid": 123 (JSON bodies)
PID_RE = re.compile(rb'pid"?:? ?(\d+)')
PID_HEADER_RE = re.compile(rb"(?im)^x-served-by-pid:\s*(\d+)")


def pid_in(resp):
    """The pid a response names: the X-Served-By-Pid header, else the body."""
    if resp is None:
        return None
    m = PID_HEADER_RE.search(resp[0]) or PID_RE.search(resp[1])
    return int(m.group(1)) if m else None


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


def proc_status(pid):
    """The KiB fields of /proc/PID/status (VmRSS, RssAnon, RssFile, ...),
    and Threads (a count)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                v = v.split()
                if len(v) == 2 and v[1] == "kB":
                    out[k] = int(v[0])
                elif k == "Threads" and len(v) == 1:
                    out[k] = int(v[0])
    except OSError:
        pass
    return out


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
        return pid_in(data), None
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
        if k in ("baton", "tableflip", "ecdysis", "pingora", "stopstart"):
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
        elif k in ("tableflip", "ecdysis"):
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
    def new_process(self, old):
        """--ready-by proc (listeners that do not speak HTTP/1.1, e.g. h2c
        prior knowledge only): a process of the new generation exists -- the
        pid file names a new process, or the master / supervisor has a child
        that is not of the old generation. Coarser than an answer."""
        try:
            root = read_pid(self.a.pidfile)
        except (OSError, ValueError, IndexError):
            return None
        if self.kind in ("nginx-reload", "haproxy", "baton-run"):
            new = [p for p in descendants(root) if p not in old and alive(p)]
            return new[0] if new else None
        return root if root not in old and alive(root) else None

    def wait_resident(self):
        """--wait-rss-mib: the serving process has its ballast resident."""
        want = self.a.wait_rss_mib * 1024
        if not want:
            return None
        deadline = now() + 120
        while True:
            pid = read_pid(self.a.pidfile)
            kib = proc_status(pid).get("VmRSS", 0)
            if kib >= want:
                return kib
            if now() > deadline:
                raise RuntimeError(f"pid {pid} resident {kib} KiB, not {want:.0f}, after 120 s")
            time.sleep(0.05)

    def trace_step(self, step, at=None):
        """--trace: one line in baton's step-trace format (BATON_TRACE_STEPS),
        CLOCK_MONOTONIC microseconds, as the server's own lines; `at`: a
        now() of the past (the start of the poll that saw the new pid)."""
        if getattr(self.a, "trace", None):
            t = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            if at is not None:
                t -= int((now() - at) * 1e6)
                step += "" if "last" in step else " (its poll's start)"
            with open(self.a.trace, "a") as f:
                f.write(f"{t} {os.getpid()} {step}\n")

    def upgrade(self, ready_timeout, gone_timeout, poll):
        resident = self.wait_resident()
        old_answer, old_procs = self.snapshot()
        self.trace_step("probe: trigger")
        t0 = now()
        self.trigger()
        t_trig = now()
        t_ready = t_gone = t_old = None
        new_pid = None
        polls = 0
        errors = []
        while True:
            t = now()
            if t_ready is None:
                tp = now()
                if self.a.ready_by == "proc":
                    pid, err = self.new_process(old_answer), None
                else:
                    pid, err = http_get(self.host, self.port, timeout=1.0, path=self.a.path)
                polls += 1
                if err is not None:
                    # a poll that fails is a failed request: keep it
                    errors.append({"at_ms": round((tp - t0) * 1000, 3),
                                   "took_ms": round((now() - tp) * 1000, 3), "error": err})
                if pid is not None and pid in old_answer:
                    t_old = now()
                if pid is not None and pid not in old_answer:
                    t_ready, new_pid = now(), pid
                    if t_old is not None:
                        self.trace_step("probe: last answer of the old pid", at=t_old)
                    self.trace_step("probe: ready", at=tp)
                    self.trace_step("probe: ready")
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
            "parent_rss_kib": resident,
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
        if a.wait_rss_mib:
            # the new generation has its ballast resident before anything
            # else happens on this machine (the next trigger, another peer's)
            try:
                peer.wait_resident()
            except RuntimeError:
                pass
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
        first.append(pid_in(read_response(s)))
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
            pid = pid_in(read_response(s))
            if pid is None:
                res["failed"] += 1
            elif pid in old_answer:
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


def cmd_drive(a):
    """Start a load client (--client, a shell-quoted command line), wait until
    it has made --warmup-ok successful requests, upgrade the peer --count
    times (--gap s apart), let it run --tail s more, stop it (a line "stop"
    on its stdin, or SIGINT for wrk) and print one JSON line: the client's
    own last JSON line (or its raw output), and every upgrade's timings."""
    import threading

    peer = Peer(a)
    out_f = open(a.out_client, "wb") if a.out_client else subprocess.DEVNULL
    c = subprocess.Popen(shlex.split(a.client), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    progress = {"ok": 0, "lines": []}

    def read_err():
        for line in c.stderr:
            progress["lines"] = (progress["lines"] + [line.decode(errors="replace").rstrip()])[-20:]
            parts = line.split()
            if len(parts) >= 2 and parts[0] == b"progress":
                try:
                    progress["ok"] = int(parts[1])
                except ValueError:
                    pass

    t = threading.Thread(target=read_err, daemon=True)
    t.start()
    res = {"upgrades": [], "client": None}
    try:
        deadline = now() + a.warmup_timeout
        while a.stop == "stdin" and progress["ok"] < a.warmup_ok:
            if c.poll() is not None:
                raise RuntimeError(f"the client exited early: {progress['lines'][-3:]}")
            if now() > deadline:
                raise RuntimeError(f"the client made {progress['ok']} requests in "
                                   f"{a.warmup_timeout} s: {progress['lines'][-3:]}")
            time.sleep(0.05)
        time.sleep(a.delay)
        for i in range(a.count):
            try:
                r = peer.upgrade(a.ready_timeout, a.gone_timeout, a.poll)
            except Exception as e:  # report and stop
                r = {"error": str(e)}
            r["n"] = i + 1
            res["upgrades"].append(r)
            if r.get("ready_ms") is None:
                break
            time.sleep(a.gap)
        time.sleep(a.tail)
    except Exception as e:
        res["error"] = str(e)
    finally:
        try:
            if a.stop == "sigint":
                c.send_signal(signal.SIGINT)
            else:
                c.stdin.write(b"stop\n")
                c.stdin.flush()
        except OSError:
            pass
        try:
            stdout, _ = c.communicate(timeout=a.stop_timeout)
        except subprocess.TimeoutExpired:
            c.kill()
            stdout, _ = c.communicate()
            res["error"] = res.get("error") or f"the client did not stop within {a.stop_timeout} s"
        reap()
    if out_f is not subprocess.DEVNULL:
        out_f.write(stdout)
        out_f.close()
    lines = [ln for ln in stdout.decode(errors="replace").splitlines() if ln.strip()]
    try:
        res["client"] = json.loads(lines[-1])
    except (IndexError, ValueError):
        res["client_raw"] = "\n".join(lines[-40:])
    res["client_exit"] = c.returncode
    res["client_stderr_tail"] = progress["lines"][-5:]
    line = json.dumps(res)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    print(line)
    return 0


def cmd_supervisor_mem(a):
    """`baton upgrade --json` a supervisor --count times; its memory at the
    start and after each --at count, once the old generation is gone and
    --settle s passed."""
    res = {"pid": a.pid, "at": {}, "upgrades": 0, "failed": []}
    time.sleep(a.settle)
    res["at"]["0"] = proc_status(a.pid)
    checkpoints = {int(x) for x in a.at.split(",")}
    for i in range(1, a.count + 1):
        before = set(descendants(a.pid))
        try:
            p = subprocess.run([a.baton, "upgrade", "--control", a.control, "--json"],
                               capture_output=True, timeout=120)
            j = json.loads(p.stdout.decode().strip().splitlines()[-1])
        except Exception as e:
            j = {"ok": False, "message": str(e)}
        if not j.get("ok"):
            res["failed"].append({"n": i, "message": j.get("message")})
            if len(res["failed"]) > 3:
                break
        else:
            res["upgrades"] += 1
        # the old generation gone (at most 30 s) before the next one
        deadline = now() + 30
        while any(alive(p) for p in before) and now() < deadline:
            time.sleep(0.005)
        if i in checkpoints:
            time.sleep(a.settle)
            res["at"][str(i)] = proc_status(a.pid)
    line = json.dumps(res)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    print(line)
    return 0 if not res["failed"] else 1


def cmd_rtt(a):
    """The probe's own cost: --count fresh-connection GETs to an idle server
    (connect, send, read the answer, close), one at a time: median/min/max ms."""
    t = []
    for _ in range(a.count):
        t0 = now()
        pid, err = http_get(a.host, a.port, timeout=1.0, path=a.path)
        if err is None:
            t.append((now() - t0) * 1000)
        time.sleep(0.005)
    line = json.dumps({"n": len(t), "median_ms": statistics.median(t) if t else None,
                       "min_ms": min(t, default=None), "max_ms": max(t, default=None)})
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    print(line)
    return 0


MEM_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads")


def cmd_mem(a):
    for pid in a.pids:
        st = proc_status(pid)
        print(json.dumps({k: st.get(k) for k in MEM_FIELDS}))
    return 0


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds; 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the command name: state is field 3, utime 14 and stime 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cmd_cpu(a):
    """CPU time used so far by a process and, separately, by its live
    descendants (a supervisor and its app), seconds, one JSON line."""
    print(json.dumps({"pid": a.pid, "self_s": round(cpu_seconds(a.pid), 3),
                      "children_s": round(sum(cpu_seconds(c) for c in descendants(a.pid)), 3)}))
    return 0


def cmd_sample(a):
    """/proc/PID/status every --every s for --for s (or until the process is
    gone): the peak and the median of VmRSS, RssAnon and Threads over the
    samples, one JSON line."""
    samples = []
    deadline = now() + a.for_
    while now() < deadline:
        st = proc_status(a.pid)
        if not st:
            break
        samples.append(st)
        time.sleep(a.every)
    keys = ("VmRSS", "RssAnon", "Threads")
    line = json.dumps({
        "pid": a.pid, "n": len(samples),
        "peak": {k: max((x.get(k, 0) for x in samples), default=None) for k in keys},
        "median": {k: statistics.median(x.get(k, 0) for x in samples) if samples else None for k in keys},
    })
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    print(line)
    return 0 if samples else 1


def cmd_wait(a):
    deadline = now() + a.timeout
    while now() < deadline:
        pid, _ = http_get(a.host, a.port, timeout=0.5, path=a.path)
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
                       choices=["baton", "tableflip", "ecdysis", "nginx-binary", "nginx-reload",
                                "haproxy", "pingora", "stopstart", "baton-run"])
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
        p.add_argument("--path", default="/", help="the path the ready poll requests")
        p.add_argument("--ready-by", choices=["http", "proc"], default="http",
                       help="ready: an HTTP/1.1 answer from a new process (default), or a new "
                            "process exists (for listeners that only speak h2c)")
        p.add_argument("--wait-rss-mib", type=float, default=0,
                       help="before each trigger, and after each upgrade, wait (at most "
                            "120 s) until the serving process is resident for at least this "
                            "many MiB")

    p = sub.add_parser("upgrade")
    peer_args(p)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--gap", type=float, default=0.5, help="pause between upgrades, s")
    p.add_argument("--delay", type=float, default=0, help="pause before the first, s")
    p.add_argument("--trace", help="append the trigger and the ready moment to this step-trace "
                                   "file (BATON_TRACE_STEPS, scripts/bench/ready-trace.sh)")
    p = sub.add_parser("idle")
    peer_args(p)
    p.add_argument("--conns", type=int, default=64)
    p = sub.add_parser("drive")
    peer_args(p)
    p.add_argument("--client", required=True, help="the load client's command line")
    p.add_argument("--stop", choices=["stdin", "sigint"], default="stdin")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--gap", type=float, default=0.5, help="pause after each upgrade, s")
    p.add_argument("--delay", type=float, default=0.5, help="pause before the first, s")
    p.add_argument("--tail", type=float, default=0.5, help="load after the last, s")
    p.add_argument("--warmup-ok", type=int, default=10)
    p.add_argument("--warmup-timeout", type=float, default=60)
    p.add_argument("--stop-timeout", type=float, default=30)
    p.add_argument("--out-client", help="save the client's stdout here")
    p = sub.add_parser("supervisor-mem")
    p.add_argument("--baton", required=True)
    p.add_argument("--control", required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--at", default="10,100")
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--out")
    p = sub.add_parser("rtt")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/")
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--out")
    p = sub.add_parser("mem")
    p.add_argument("pids", type=int, nargs="+")
    p = sub.add_parser("cpu")
    p.add_argument("--pid", type=int, required=True)
    p = sub.add_parser("sample")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--for", dest="for_", type=float, required=True, help="how long, s")
    p.add_argument("--every", type=float, default=0.1, help="pause between samples, s")
    p.add_argument("--out")
    p = sub.add_parser("wait")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("--path", default="/")
    p = sub.add_parser("rss")
    p.add_argument("pids", type=int, nargs="+")
    p = sub.add_parser("cleanup")
    p.add_argument("dir")
    p.add_argument("--grace", type=float, default=3)
    p = sub.add_parser("stats")
    p.add_argument("file")
    p.add_argument("field")
    a = ap.parse_args()
    return {"upgrade": cmd_upgrade, "idle": cmd_idle, "drive": cmd_drive,
            "supervisor-mem": cmd_supervisor_mem, "rtt": cmd_rtt, "mem": cmd_mem, "cpu": cmd_cpu, "sample": cmd_sample,
            "wait": cmd_wait, "rss": cmd_rss, "cleanup": cmd_cleanup, "stats": cmd_stats}[a.action](a)


if __name__ == "__main__":
    sys.exit(main())
