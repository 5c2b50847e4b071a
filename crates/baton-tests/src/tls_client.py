#!/usr/bin/env python3
"""baton's TLS test client: HTTP/1.1 and HTTP/2 (by ALPN) over Python's ssl.

Standard library only. No retries: every request is counted once.

  tls_client.py load --port P --ca CA --proto h1|h2 --conns N --seconds S --stop-file F
      N threads, each sending `GET /version` in a loop on one kept-alive
      connection. A connection is left only when the server ends it
      cleanly after a complete response (HTTP/1.1: `Connection: close`;
      HTTP/2: GOAWAY) — the client then reads to the end and records whether
      the TLS stream ended with close_notify — and the next connection
      offers the previous TLS session (counts resumptions). Like curl,
      urllib3 or a browser, an HTTP/1.1 client checks a kept-alive
      connection before reusing it: if the server has closed it meanwhile
      (a thread that was starved of CPU for longer than the server's quiet
      period), it counts that apart (`idle_closes`) and opens a new one; no
      request is ever sent twice. Prints {"progress": n} lines while
      running and one {"final": {...}} line.

  tls_client.py session --port P --ca CA
      Commands on stdin, one JSON line answered on stdout for each:
        fresh NAME [tls12]   new connection offering no session
        resume NAME [PORT]   new connection offering the session saved as NAME
                             (to another server's PORT if given)
      Both send one `GET /version` (Connection: close) and save the
      connection's session as NAME.
        quit

  tls_client.py idle --port P --ca CA --conns N --seconds S
      N HTTP/1.1 connections, one request each, then idle; prints
      {"ready": pids}. Then waits (at most S seconds) for the server to close
      each one, and right after each close asks a new connection which pid
      answers. Prints {"closes": [...]} with, per connection, the time, how
      it ended (clean = close_notify) and that pid.

  tls_client.py held --port P --ca CA --conns N [--tls12 --cipher NAME]
      N HTTP/1.1 connections (TLS 1.2 with only the OpenSSL cipher NAME
      offered, or TLS 1.3: its suites come from OpenSSL's configuration, so
      the test sets OPENSSL_CONF to choose one), one `GET /version` each;
      prints {"ready": [answer...], "version": V, "cipher": C}. Then, on
      stdin: `get` (`GET /version` on each connection, never a new one:
      {"answers": [answer...]}) and `quit`. An answer is {"ok": true, "pid",
      "generation", "handed_over", "peer", "local"} or {"ok": false,
      "error"}.

  tls_client.py hold --port P --ca CA --conns N [--tls12 [--cipher OPENSSL-NAME]]
      N HTTP/1.1 keep-alive connections, one `GET /version` each; prints
      {"ready": [...]} (per connection: pid, TLS version, cipher). Then
      commands on stdin, one JSON line answered for each:
        get PATH     one request on each connection, in turn; per
                     connection: ok, status, the JSON body (or text), the
                     Connection header, or the error
        send PATH    send the request on connection 0 without reading
        recv         read connection 0's response to `send`
        echo N       POST /echo with N bytes on each connection; per
                     connection: ok (the same bytes came back), len
        part PATH    send the first half of the request (up to the middle of
                     the Host header) on connection 0
        rest         send the rest of it (same record layer: a new TLS
                     record), and read the response as `recv` does
        quit
"""

import argparse
import json
import select
import socket
import ssl
import sys
import threading
import time

HOST = "localhost"
TIMEOUT = 10.0


def context(ca, alpn, tls12=False):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(alpn)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def connect(ctx, port, session=None):
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # suppress_ragged_eofs=False: an EOF without close_notify raises
    # SSLEOFError instead of looking like a clean end.
    return ctx.wrap_socket(raw, server_hostname=HOST, session=session,
                           suppress_ragged_eofs=False)


def read_to_end(s):
    """After the server said it closes: read until the end. 'clean' means
    the TLS stream ended with close_notify."""
    try:
        while True:
            if not s.recv(65536):
                return "clean"
    except ssl.SSLEOFError:
        return "eof-without-close_notify"
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return "error: %r" % (e,)


# ---------------------------------------------------------------- HTTP/1.1


class H1:
    def __init__(self, s):
        self.s = s
        self.buf = b""

    def closed_by_server(self):
        """Before reusing the connection (what urllib3's
        is_connection_dropped does): has the server closed it? Returns how it
        ended, or None if it is still open."""
        if self.buf or self.s.pending():
            return None
        if not select.select([self.s], [], [], 0)[0]:
            return None
        self.s.setblocking(False)
        try:
            d = self.s.recv(65536)
            if d:
                self.buf += d
                return None
            return "clean"
        except ssl.SSLWantReadError:
            return None  # a TLS record that carried no data
        except ssl.SSLEOFError:
            return "eof-without-close_notify"
        except OSError as e:
            return "error: %r" % (e,)
        finally:
            self.s.settimeout(TIMEOUT)

    def fill(self):
        d = self.s.recv(65536)
        if not d:
            raise EOFError("connection closed by the server")
        self.buf += d

    def get(self, path, close=False):
        req = "GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (
            path, HOST, "Connection: close\r\n" if close else "")
        self.s.sendall(req.encode())
        while b"\r\n\r\n" not in self.buf:
            self.fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for l in lines[1:]:
            k, _, v = l.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            self.fill()
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, body


# ---------------------------------------------------------------- HTTP/2

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
REFUSED_STREAM = 0x7
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# HPACK static-table entries the server uses for these statuses.
STATUS = {0x88: 200, 0x89: 204, 0x8A: 206, 0x8B: 304, 0x8C: 400, 0x8D: 404, 0x8E: 500}


class StreamRefused(Exception):
    """The server did not process the stream (safe to retry; counted apart)."""


class H2:
    def __init__(self, s):
        self.s = s
        self.buf = b""
        self.next_id = 1
        self.goaway = None
        s.sendall(PREFACE + self.frame(SETTINGS, 0, 0, b""))

    @staticmethod
    def frame(ftype, flags, sid, payload):
        return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload

    def read_exact(self, n):
        while len(self.buf) < n:
            d = self.s.recv(65536)
            if not d:
                raise EOFError("connection closed by the server")
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_frame(self):
        h = self.read_exact(9)
        n = int.from_bytes(h[:3], "big")
        sid = int.from_bytes(h[5:9], "big") & 0x7FFFFFFF
        return h[3], h[4], sid, self.read_exact(n)

    def control(self, ftype, flags, payload):
        """Connection-level frames; True if handled."""
        if ftype == SETTINGS:
            if not flags & ACK:
                self.s.sendall(self.frame(SETTINGS, ACK, 0, b""))
            return True
        if ftype == PING:
            if not flags & ACK:
                self.s.sendall(self.frame(PING, ACK, 0, payload))
            return True
        if ftype == GOAWAY:
            self.goaway = (int.from_bytes(payload[:4], "big") & 0x7FFFFFFF,
                           int.from_bytes(payload[4:8], "big"))
            return True
        return ftype == WINDOW_UPDATE

    def get(self, path):
        sid = self.next_id
        self.next_id += 2
        p, a = path.encode(), HOST.encode()
        # :method GET, :scheme https (indexed); :path, :authority (literal,
        # indexed name, no Huffman).
        block = bytes([0x82, 0x87, 0x04, len(p)]) + p + bytes([0x01, len(a)]) + a
        self.s.sendall(self.frame(HEADERS, END_STREAM | END_HEADERS, sid, block))
        status, body, block = None, b"", b""
        while True:
            ftype, flags, fsid, payload = self.read_frame()
            if self.control(ftype, flags, payload):
                if self.goaway and sid > self.goaway[0]:
                    raise StreamRefused("stream %d after GOAWAY(last=%d)" % (sid, self.goaway[0]))
                continue
            if fsid != sid:
                continue
            if ftype in (HEADERS, CONTINUATION):
                if ftype == HEADERS:
                    if flags & PADDED:
                        payload = payload[1:len(payload) - payload[0]]
                    if flags & PRIORITY:
                        payload = payload[5:]
                block += payload
                if flags & END_HEADERS and status is None:
                    i = 0
                    while i < len(block) and block[i] & 0xE0 == 0x20:  # table size update
                        i += 1
                        if block[i - 1] & 0x1F == 0x1F:
                            while block[i] & 0x80:
                                i += 1
                            i += 1
                    status = STATUS.get(block[i], "unknown(0x%02x)" % block[i])
                if flags & END_STREAM:
                    return status, body
            elif ftype == DATA:
                if flags & PADDED:
                    payload = payload[1:len(payload) - payload[0]]
                body += payload
                if payload:
                    self.s.sendall(self.frame(WINDOW_UPDATE, 0, 0, len(payload).to_bytes(4, "big")))
                if flags & END_STREAM:
                    return status, body
            elif ftype == RST_STREAM:
                code = int.from_bytes(payload[:4], "big")
                if code == REFUSED_STREAM:
                    raise StreamRefused("RST_STREAM(REFUSED_STREAM)")
                raise IOError("RST_STREAM code %d" % code)

    def finish(self):
        """After a GOAWAY: answer the server's frames until it closes."""
        try:
            while True:
                ftype, flags, _, payload = self.read_frame()
                self.control(ftype, flags, payload)
        except EOFError:
            return "clean"
        except ssl.SSLEOFError:
            return "eof-without-close_notify"
        except socket.timeout:
            return "timeout"
        except OSError as e:
            return "error: %r" % (e,)


# ---------------------------------------------------------------- load


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = self.failed = self.wrong = self.refused = 0
        self.server_closes = 0
        self.idle_closes = 0
        self.close_endings = {}
        self.reconnects = self.reconnects_resumed = 0
        self.handed_over = 0
        self.errors = []
        self.pids = set()
        self.generations = set()

    def error(self, what):
        with self.lock:
            self.failed += 1
            if len(self.errors) < 20:
                self.errors.append(what)


def check_body(stats, body, want_http):
    try:
        v = json.loads(body)
    except ValueError:
        return "bad /version body %r" % (body[:200],)
    if v.get("tls") is not True or v.get("http") != want_http:
        return "unexpected tls/http in %r" % (v,)
    with stats.lock:
        stats.ok += 1
        stats.pids.add(v["pid"])
        stats.generations.add(v["generation"])
        if v.get("handed_over"):
            stats.handed_over += 1
    return None


def load_worker(args, stats, stop):
    alpn = "h2" if args.proto == "h2" else "http/1.1"
    want_http = "HTTP/2.0" if args.proto == "h2" else "HTTP/1.1"
    ctx = context(args.ca, [alpn])
    conn = None
    session = None
    while not stop():
        try:
            if conn is None:
                s = connect(ctx, args.port, session)
                if s.selected_alpn_protocol() != alpn:
                    raise IOError("ALPN chose %r" % (s.selected_alpn_protocol(),))
                if session is not None:
                    with stats.lock:
                        stats.reconnects += 1
                        stats.reconnects_resumed += int(s.session_reused)
                conn = H2(s) if args.proto == "h2" else H1(s)
                conn.reused = False
            if args.proto == "h1" and conn.reused:
                ending = conn.closed_by_server()
                if ending is not None:
                    session = conn.s.session or session
                    conn.s.close()
                    conn = None
                    with stats.lock:
                        stats.idle_closes += 1
                        stats.close_endings[ending] = stats.close_endings.get(ending, 0) + 1
                    continue
            if args.proto == "h2":
                status, body = conn.get("/version")
                closing = conn.goaway is not None
            else:
                conn.reused = True
                status, headers, body = conn.get("/version")
                closing = headers.get("connection", "").lower() == "close"
        except StreamRefused as e:
            with stats.lock:
                stats.refused += 1
                if len(stats.errors) < 20:
                    stats.errors.append("refused: %s" % e)
            closing, status = True, None
        except Exception as e:  # noqa: BLE001 - every failure is counted
            stats.error("%s: %r" % (args.proto, e))
            if conn is not None:
                conn.s.close()
            conn = None
            continue
        if status is not None:
            if status != 200:
                with stats.lock:
                    stats.wrong += 1
                    stats.errors.append("status %r" % (status,))
            else:
                bad = check_body(stats, body, want_http)
                if bad:
                    with stats.lock:
                        stats.wrong += 1
                        if len(stats.errors) < 20:
                            stats.errors.append(bad)
        if closing:
            session = conn.s.session or session
            ending = conn.finish() if args.proto == "h2" else read_to_end(conn.s)
            conn.s.close()
            conn = None
            with stats.lock:
                stats.server_closes += 1
                stats.close_endings[ending] = stats.close_endings.get(ending, 0) + 1


def run_load(args):
    stats = Stats()
    deadline = time.monotonic() + args.seconds

    def stop():
        if time.monotonic() > deadline:
            return True
        try:
            open(args.stop_file).close()
            return True
        except OSError:
            return False

    threads = [threading.Thread(target=load_worker, args=(args, stats, stop), daemon=True)
               for _ in range(args.conns)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        with stats.lock:
            n = stats.ok + stats.failed + stats.wrong + stats.refused
        print(json.dumps({"progress": n}), flush=True)
        time.sleep(0.2)
    for t in threads:
        t.join(TIMEOUT)
    with stats.lock:
        print(json.dumps({"final": {
            "ok": stats.ok, "failed": stats.failed, "wrong": stats.wrong,
            "refused": stats.refused, "server_closes": stats.server_closes,
            "idle_closes": stats.idle_closes,
            "close_endings": stats.close_endings, "reconnects": stats.reconnects,
            "reconnects_resumed": stats.reconnects_resumed,
            "handed_over": stats.handed_over, "errors": stats.errors,
            "pids": sorted(stats.pids), "generations": sorted(stats.generations),
        }}), flush=True)


# ---------------------------------------------------------------- session


def run_session(args):
    ctxs = {False: context(args.ca, ["http/1.1"]), True: context(args.ca, ["http/1.1"], tls12=True)}
    saved = {}
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            return
        try:
            cmd, name = words[0], words[1]
            port = args.port
            if cmd == "fresh":
                tls12 = "tls12" in words[2:]
                offered = None
            elif cmd == "resume":
                tls12, offered = saved[name]
                if len(words) > 2:
                    port = int(words[2])
            else:
                raise ValueError("unknown command %r" % cmd)
            s = connect(ctxs[tls12], port, offered)
            status, _, body = H1(s).get("/version", close=True)
            ending = read_to_end(s)
            sess = s.session
            cert = s.getpeercert()
            out = {
                "ok": status == 200,
                "offered": offered is not None,
                "reused": s.session_reused,
                "tls": s.version(),
                "version": json.loads(body),
                "hint": sess.ticket_lifetime_hint if sess else None,
                "has_ticket": sess.has_ticket if sess else None,
                "time": time.time(),
                "serial": cert.get("serialNumber"),
                "subject": dict(x[0] for x in cert.get("subject", ())),
                "ending": ending,
            }
            s.close()
            if sess is not None:
                saved[name] = (tls12, sess)
        except Exception as e:  # noqa: BLE001 - reported to the test
            out = {"ok": False, "error": repr(e)}
        print(json.dumps(out), flush=True)


# ---------------------------------------------------------------- idle


def run_idle(args):
    ctx = context(args.ca, ["http/1.1"])
    conns, pids = [], []
    for _ in range(args.conns):
        s = connect(ctx, args.port)
        _, _, body = H1(s).get("/version")
        pids.append(json.loads(body)["pid"])
        s.settimeout(None)
        s.setblocking(False)
        conns.append(s)
    print(json.dumps({"ready": pids}), flush=True)
    deadline = time.monotonic() + args.seconds
    open_ = {s.fileno(): s for s in conns}
    closes = []
    while open_ and time.monotonic() < deadline:
        readable, _, _ = select.select(list(open_.values()), [], [], 0.5)
        for s in readable:
            t = time.time()
            try:
                d = s.recv(65536)
                ending = "clean" if not d else "data: %r" % (d[:100],)
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLEOFError:
                ending = "eof-without-close_notify"
            except OSError as e:
                ending = "error: %r" % (e,)
            del open_[s.fileno()]
            s.close()
            # Who serves right now?
            try:
                n = connect(ctx, args.port)
                _, _, body = H1(n).get("/version", close=True)
                now_pid = json.loads(body)["pid"]
                n.close()
            except Exception as e:  # noqa: BLE001
                now_pid = "error: %r" % (e,)
            closes.append({"time": t, "ending": ending, "serving_pid": now_pid})
    print(json.dumps({"closes": closes, "still_open": len(open_)}), flush=True)


def held_answer(c):
    try:
        status, _, body = c.get("/version")
        if status != 200:
            return {"ok": False, "error": "status %d" % status}
        v = json.loads(body)
        return {"ok": True, "pid": v["pid"], "generation": v["generation"],
                "handed_over": v["handed_over"], "tls": v["tls"],
                "peer": v["peer"], "local": "%s:%d" % c.s.getsockname()[:2]}
    except Exception as e:  # noqa: BLE001 - every failure is reported
        return {"ok": False, "error": "%r" % (e,)}


def run_held(args):
    ctx = context(args.ca, ["http/1.1"], tls12=args.tls12)
    if args.cipher:
        ctx.set_ciphers(args.cipher)
    conns = [H1(connect(ctx, args.port)) for _ in range(args.conns)]
    ready = [held_answer(c) for c in conns]
    first = conns[0].s
    print(json.dumps({"ready": ready, "version": first.version(),
                      "cipher": first.cipher()[0]}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd == "get":
            print(json.dumps({"answers": [held_answer(c) for c in conns]}), flush=True)
        else:
            print(json.dumps({"error": "unknown command %r" % cmd}), flush=True)


# ---------------------------------------------------------------- hold


def hold_get(h, path):
    try:
        status, headers, body = h.get(path)
        try:
            body = json.loads(body)
        except ValueError:
            body = body.decode("utf-8", "replace")
        return {"ok": status == 200, "status": status, "body": body,
                "connection": headers.get("connection")}
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"ok": False, "error": repr(e)}


def run_hold(args):
    ctx = context(args.ca, ["http/1.1"], tls12=args.tls12)
    if args.cipher:
        ctx.set_ciphers(args.cipher)  # TLS 1.2 suites only (OpenSSL names)
    conns, ready = [], []
    for _ in range(args.conns):
        s = connect(ctx, args.port)
        h = H1(s)
        _, _, body = h.get("/version")
        ready.append({"pid": json.loads(body)["pid"], "tls": s.version(), "cipher": s.cipher()[0]})
        conns.append(h)
    print(json.dumps({"ready": ready}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            return
        if words[0] == "get":
            out = {"results": [hold_get(h, words[1]) for h in conns]}
        elif words[0] == "send":
            req = "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (words[1], HOST)
            conns[0].s.sendall(req.encode())
            out = {"sent": True}
        elif words[0] == "echo":
            # POST /echo with N bytes on each connection; the body must come back.
            n = int(words[1])
            results = []
            for i, h in enumerate(conns):
                data = bytes((i + j * 7) % 251 for j in range(n))
                try:
                    req = ("POST /echo HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
                           % (HOST, n)).encode() + data
                    h.s.sendall(req)
                    while b"\r\n\r\n" not in h.buf:
                        h.fill()
                    head, h.buf = h.buf.split(b"\r\n\r\n", 1)
                    length = 0
                    for l in head.decode("latin-1").split("\r\n")[1:]:
                        k, _, v = l.partition(":")
                        if k.strip().lower() == "content-length":
                            length = int(v.strip())
                    while len(h.buf) < length:
                        h.fill()
                    body, h.buf = h.buf[:length], h.buf[length:]
                    results.append({"ok": body == data, "len": len(body)})
                except Exception as e:  # noqa: BLE001
                    results.append({"ok": False, "error": repr(e)})
            out = {"results": results}
        elif words[0] == "part":
            conns[0].s.sendall(("GET %s HTTP/1.1\r\nHo" % words[1]).encode())
            out = {"sent": True}
        elif words[0] in ("recv", "rest"):
            h = conns[0]
            if words[0] == "rest":
                h.s.sendall(("st: %s\r\n\r\n" % HOST).encode())
            try:
                while b"\r\n\r\n" not in h.buf:
                    h.fill()
                head, h.buf = h.buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for l in lines[1:]:
                    k, _, v = l.partition(":")
                    headers[k.strip().lower()] = v.strip()
                n = int(headers.get("content-length", "0"))
                while len(h.buf) < n:
                    h.fill()
                body, h.buf = h.buf[:n], h.buf[n:]
                out = {"ok": int(lines[0].split()[1]) == 200,
                       "body": body.decode("utf-8", "replace"),
                       "connection": headers.get("connection")}
            except Exception as e:  # noqa: BLE001
                out = {"ok": False, "error": repr(e)}
        else:
            out = {"ok": False, "error": "unknown command %r" % words[0]}
        print(json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["load", "session", "idle", "held", "hold"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--proto", choices=["h1", "h2"], default="h1")
    p.add_argument("--conns", type=int, default=4)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--stop-file", default="/nonexistent/stop")
    p.add_argument("--tls12", action="store_true")
    p.add_argument("--cipher", default="")
    args = p.parse_args()
    {"load": run_load, "session": run_session, "idle": run_idle,
     "held": run_held, "hold": run_hold}[args.mode](args)


if __name__ == "__main__":
    main()
