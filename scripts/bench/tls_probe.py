#!/usr/bin/env python3
"""Idle HTTPS keep-alive connections through upgrades, for scripts/bench/run.sh
(the tls scenario; Python 3 stdlib only: ssl, TLS 1.3, HTTP/1.1 by ALPN).

N connections to https://localhost:TLS_PORT/ each send one `GET /` and then
stay idle. Then, U times: one upgrade (reload) of the peer (--kind,
--pidfile as for probe.py) is triggered, the probe waits until every process
of the old generation has exited (or --gone-timeout), then, like a pooled
client (curl, urllib3, browsers), checks each connection before reusing it
and sends one `GET /` on it:

  survived    answered on the same connection (the same TLS session: no
              handshake)
  closed      the server had closed it (clean = with close_notify, or
              not); the client opens a new one: one TLS handshake (resumed
              with the previous session's ticket when the server takes it)
  failed      the request was sent on a connection that then failed
              (counted, then reconnected like a closed one)

Every connection gets the same pattern whatever the peer. One JSON line:
conns, upgrades, survived, handshakes (new ones after the first N),
resumed (of those), closed_clean, closed_other, failed, not_opened,
gone_ms (per upgrade; null if the old generation was still there).
"""

import argparse
import json
import os
import select
import socket
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe  # noqa: E402  (the same Peer: snapshot, trigger, gone)

TIMEOUT = 10.0
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"


class Conn:
    def __init__(self, ctx, port):
        self.ctx, self.port = ctx, port
        self.s = None
        self.session = None
        self.buf = b""

    def open(self):
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.s = self.ctx.wrap_socket(raw, server_hostname="localhost", session=self.session,
                                      suppress_ragged_eofs=False)
        self.buf = b""
        return self.s.session_reused

    def closed_by_server(self):
        """None if still open, else how it ended ('clean' or 'other')."""
        if self.buf or self.s.pending():
            return None
        p = select.poll()
        p.register(self.s.fileno(), select.POLLIN)
        if not p.poll(0):
            return None
        self.s.setblocking(False)
        try:
            while True:
                d = self.s.recv(65536)
                if not d:
                    return "clean"
                self.buf += d
                return None
        except ssl.SSLWantReadError:
            return None  # a record with no data (a session ticket)
        except OSError:
            return "other"
        finally:
            self.s.settimeout(TIMEOUT)

    def get(self):
        """One `GET /`; raises on any failure."""
        self.s.sendall(REQUEST)
        while b"\r\n\r\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise EOFError("closed by the server")
            self.buf += d
        head, rest = self.buf.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        n = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                n = int(v)
        while len(rest) < n:
            d = self.s.recv(65536)
            if not d:
                raise EOFError("closed by the server inside a body")
            rest += d
        self.buf = rest[n:]
        self.session = self.s.session
        if status != 200:
            raise RuntimeError(f"status {status}")
        if b"connection: close" in head.lower():
            # answered, but the server ends the connection after it
            self.s.close()
            self.s = None

    def close(self):
        if self.s is not None:
            self.s.close()
            self.s = None


def main(a):
    ctx = ssl.create_default_context(cafile=a.ca)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    conns, not_opened = [], []
    for _ in range(a.conns):
        c = Conn(ctx, a.tls_port)
        try:
            c.open()
            c.get()
            conns.append(c)
        except Exception as e:  # noqa: BLE001 - counted
            not_opened.append(repr(e))
    res = {"conns": a.conns, "upgrades": a.upgrades, "opened": len(conns),
           "not_opened": len(not_opened), "not_opened_first": not_opened[:3],
           "survived": 0, "handshakes": 0, "resumed": 0, "closed_clean": 0,
           "closed_other": 0, "failed": 0, "failed_first": [], "gone_ms": []}
    peer = probe.Peer(a)
    for _ in range(a.upgrades):
        _, old_procs = peer.snapshot()
        t0 = time.monotonic()
        peer.trigger()
        t_gone = None
        while time.monotonic() - t0 < a.gone_timeout:
            probe.reap()
            if not any(probe.alive(p) for p in old_procs):
                t_gone = time.monotonic()
                break
            time.sleep(0.005)
        res["gone_ms"].append(None if t_gone is None else round((t_gone - t0) * 1000, 1))
        # the new generation settles (its pid file, its predecessor's exit)
        time.sleep(0.5)
        for c in conns:
            ended = None if c.s is None else c.closed_by_server()
            if c.s is not None and ended is None:
                try:
                    c.get()
                    res["survived"] += 1
                    continue
                except Exception as e:  # noqa: BLE001 - counted
                    res["failed"] += 1
                    if len(res["failed_first"]) < 3:
                        res["failed_first"].append(repr(e))
            elif ended == "clean" or c.s is None:
                res["closed_clean"] += 1
            else:
                res["closed_other"] += 1
            c.close()
            try:
                res["handshakes"] += 1
                if c.open():
                    res["resumed"] += 1
                c.get()
            except Exception as e:  # noqa: BLE001 - counted
                res["failed"] += 1
                if len(res["failed_first"]) < 3:
                    res["failed_first"].append(repr(e))
                c.close()
    for c in conns:
        c.close()
    line = json.dumps(res)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", required=True, choices=["baton", "nginx-reload", "haproxy"])
    ap.add_argument("--port", type=int, required=True, help="the peer's plain HTTP port")
    ap.add_argument("--tls-port", type=int, required=True, help="where the clients connect")
    ap.add_argument("--ca", required=True, help="the CA of the peer's certificate")
    ap.add_argument("--pidfile", required=True)
    ap.add_argument("--conns", type=int, default=200)
    ap.add_argument("--upgrades", type=int, default=3)
    ap.add_argument("--gone-timeout", type=float, default=60)
    ap.add_argument("--out")
    args = ap.parse_args()
    # what probe.Peer reads
    args.host, args.cmd, args.env, args.log, args.upgrade_sock = "127.0.0.1", None, None, None, None
    main(args)
