"""WebSocket clients for baton's tests (Python `websockets`).

usage: ws_clients.py URL N INTERVAL_MS MAX_SECONDS [CA_FILE]

(CA_FILE: trust this CA for a wss:// URL.)

N clients connect to URL and each sends a text message every INTERVAL_MS,
waiting for its answer ({"pid", "generation", "seq", "echo"}) before the
next one. Each checks that `echo` is what it sent and that `seq` goes on by
one. stdout, one JSON object a line:
  {"event": "ready"}                       every client got its first answer
  {"event": "pid", "client": I, "pid": P}  client I's answers now come from P
  {"event": "count", "client": I, "answers": N}  every 5 answers
  {"event": "summary", "clients": [...]}   at the end
It stops when stdin closes (or after MAX_SECONDS, or when every connection
has ended), closes its connections normally and prints the summary. Every failure is counted, none retried.
"""

import asyncio
import json
import ssl
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def client(i, url, interval, stop, first_answer, tls):
    st = {"client": i, "lang": "python", "sent": 0, "answers": 0,
          "seq_errors": 0, "echo_errors": 0, "closes": [], "errors": [],
          "pids": [], "ports": []}
    try:
        # The default offers permessage-deflate: the server must decline it
        # (its compression state could not move with the connection).
        async with connect(url, ping_interval=None, open_timeout=10,
                           close_timeout=5, ssl=tls) as ws:
            st["ports"].append(ws.local_address[1])
            ext = ws.response.headers.get("Sec-WebSocket-Extensions")
            if ext:
                st["errors"].append(f"the server negotiated an extension: {ext}")
            expect = 1
            k = 0
            while not stop.is_set():
                k += 1
                msg = f"c{i}-{k}"
                await ws.send(msg)
                st["sent"] += 1
                answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
                st["answers"] += 1
                if st["answers"] % 5 == 0:
                    emit({"event": "count", "client": i, "answers": st["answers"]})
                if answer["echo"] != msg:
                    st["echo_errors"] += 1
                if answer["seq"] != expect:
                    st["seq_errors"] += 1
                    st["errors"].append(f"seq {answer['seq']}, expected {expect}")
                expect = answer["seq"] + 1
                if not st["pids"] or st["pids"][-1] != answer["pid"]:
                    st["pids"].append(answer["pid"])
                    emit({"event": "pid", "client": i, "pid": answer["pid"]})
                if not first_answer.done():
                    first_answer.set_result(True)
                port = ws.local_address[1]
                if port != st["ports"][-1]:
                    st["ports"].append(port)
                try:
                    await asyncio.wait_for(stop.wait(), interval)
                except asyncio.TimeoutError:
                    pass
            # Stopped between exchanges: a close frame the server sent
            # meanwhile counts all the same.
            rcvd = ws.protocol.close_rcvd
            if rcvd is not None:
                st["closes"].append(rcvd.code)
                st["errors"].append(f"closed by the server: {rcvd.code}")
    except ConnectionClosed as e:
        if e.rcvd is not None:
            st["closes"].append(e.rcvd.code)
        st["errors"].append(f"closed: {e}")
    except Exception as e:  # every failure is counted
        st["errors"].append(f"{type(e).__name__}: {e}")
    if not first_answer.done():
        first_answer.set_result(False)
    return st


async def main():
    url, n, interval_ms, max_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    tls = ssl.create_default_context(cafile=sys.argv[5]) if len(sys.argv) > 5 else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    firsts = [loop.create_future() for _ in range(n)]
    tasks = [asyncio.create_task(client(i, url, interval_ms / 1000, stop, firsts[i], tls))
             for i in range(n)]

    async def announce():
        await asyncio.gather(*firsts)
        emit({"event": "ready"})

    async def watch_stdin():
        await loop.run_in_executor(None, sys.stdin.read)
        stop.set()

    asyncio.create_task(announce())
    asyncio.create_task(watch_stdin())
    # Until stdin closes, MAX_SECONDS pass, or every connection ended.
    everyone = asyncio.gather(*tasks)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([everyone, stopped], timeout=max_s,
                       return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    clients = await everyone
    emit({"event": "summary", "clients": clients})


asyncio.run(main())
