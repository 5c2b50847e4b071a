#!/usr/bin/env python3
"""Long-lived WebSockets through one upgrade, for scripts/bench/run.sh
(the ws scenario; Python 3 stdlib only, its own minimal RFC 6455 client).

N connections to ws://127.0.0.1:WS_PORT/ws (baton-demo's echo, directly or
through a proxy) each exchange a text message every second. One upgrade of
the peer (--kind, --pidfile as for probe.py) is triggered; the probe waits
until every process of the old generation has exited (or --gone-timeout),
then one more second, and counts what the connections saw:

  survived   still answering on the same connection at the end
  close N    the server sent a close frame with code N
  cut        the connection ended without a close frame (EOF, reset)
  stalled    no answer within 5 s, connection still open

One JSON line: conns, opened, survived, closes {code: n}, cut, stalled,
gone_ms (trigger -> old generation gone; null if still there), and the
timings of the first close and cut after the trigger.
"""

import argparse
import asyncio
import base64
import json
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe  # noqa: E402  (the same Peer: snapshot, trigger, gone)

ANSWER_TIMEOUT = 5.0


async def read_frame(r):
    """One server frame: (opcode, payload). Servers do not mask."""
    b0, b1 = await r.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await r.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await r.readexactly(8))[0]
    return b0 & 0x0F, await r.readexactly(n)


def frame(opcode, payload):
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Conn:
    def __init__(self):
        self.state = "opening"
        self.code = None
        self.ended_at = None

    async def open(self, host, port):
        self.r, self.w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.w.write((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await asyncio.wait_for(self.r.readuntil(b"\r\n\r\n"), 10)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        await self.exchange(0)
        self.state = "open"

    async def exchange(self, k):
        self.w.write(frame(1, f"m{k}".encode()))
        await self.w.drain()
        while True:
            op, payload = await asyncio.wait_for(read_frame(self.r), ANSWER_TIMEOUT)
            if op == 8:
                self.code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                raise ConnectionAbortedError("close")
            if op == 9:  # ping -> pong
                self.w.write(frame(10, payload))
                continue
            if op in (1, 2):
                return

    async def run(self, stop):
        k = 0
        while not stop.is_set():
            k += 1
            try:
                await self.exchange(k)
            except ConnectionAbortedError:
                self.state, self.ended_at = "close", time.monotonic()
                return
            except asyncio.TimeoutError:
                self.state = "stalled"
                return
            except (OSError, asyncio.IncompleteReadError):
                self.state, self.ended_at = "cut", time.monotonic()
                return
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        self.state = "survived"


async def main(a):
    conns = [Conn() for _ in range(a.conns)]
    sem = asyncio.Semaphore(100)

    async def opened(c):
        async with sem:
            try:
                await c.open("127.0.0.1", a.ws_port)
            except Exception as e:  # counted: not opened
                c.state = f"not opened: {e}"

    await asyncio.gather(*(opened(c) for c in conns))
    live = [c for c in conns if c.state == "open"]
    peer = probe.Peer(a)
    _, old_procs = peer.snapshot()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run(stop)) for c in live]
    t0 = time.monotonic()
    peer.trigger()
    t_gone = None
    while time.monotonic() - t0 < a.gone_timeout:
        probe.reap()
        if not any(probe.alive(p) for p in old_procs):
            t_gone = time.monotonic()
            break
        await asyncio.sleep(0.005)
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)
    closes = {}
    for c in live:
        if c.state == "close":
            closes[str(c.code)] = closes.get(str(c.code), 0) + 1
    ends = [c.ended_at - t0 for c in live if c.ended_at]
    res = {
        "conns": a.conns,
        "opened": len(live),
        "not_opened": [c.state for c in conns if c.state.startswith("not opened")][:3],
        "survived": sum(c.state == "survived" for c in live),
        "closes": closes,
        "cut": sum(c.state == "cut" for c in live),
        "stalled": sum(c.state == "stalled" for c in live),
        "gone_ms": None if t_gone is None else round((t_gone - t0) * 1000, 1),
        "first_end_ms": round(min(ends) * 1000, 1) if ends else None,
        "last_end_ms": round(max(ends) * 1000, 1) if ends else None,
        "stop_after_s": a.stop_after,
    }
    line = json.dumps(res)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", required=True, choices=["baton", "nginx-reload", "haproxy"])
    ap.add_argument("--port", type=int, required=True, help="the peer's HTTP port")
    ap.add_argument("--ws-port", type=int, required=True, help="where the clients connect")
    ap.add_argument("--pidfile", required=True)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--gone-timeout", type=float, default=60)
    ap.add_argument("--stop-after", type=float, help="the proxy's stated limit, for the report")
    ap.add_argument("--out")
    args = ap.parse_args()
    # what probe.Peer reads
    args.host, args.cmd, args.env, args.log, args.upgrade_sock = "127.0.0.1", None, None, None, None
    asyncio.run(main(args))
