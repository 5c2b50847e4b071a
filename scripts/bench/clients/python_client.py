#!/usr/bin/env python3
"""Python `requests` keep-alive client for scripts/bench/run.sh (the `clients`
scenario); see README.md here for the protocol.

    python python_client.py URL WORKERS MAX_GAP_MS DEADLINE_S

One requests.Session per worker thread (requests does not promise that a
Session is thread-safe), mounted with HTTPAdapter(max_retries=0): no retry.
"""

import json
import os
import random
import sys
import threading
import time

import requests
from requests.adapters import HTTPAdapter


# CLIENT_METHOD=POST sends a small body with each request (the tests).
METHOD = os.environ.get("CLIENT_METHOD", "GET")
POST_BODY = b"x" * 1024

def main():
    url, workers, max_gap, deadline_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    deadline = time.monotonic() + deadline_s
    stop = threading.Event()
    lock = threading.Lock()
    totals = {"client": "python-requests", "ok": 0, "errors": 0, "kinds": {}, "samples": []}

    def error(kind, msg):
        with lock:
            totals["errors"] += 1
            totals["kinds"][kind] = totals["kinds"].get(kind, 0) + 1
            if len(totals["samples"]) < 10:
                totals["samples"].append(msg)

    def worker():
        s = requests.Session()
        s.mount("http://", HTTPAdapter(max_retries=0, pool_connections=1, pool_maxsize=1))
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                r = s.request(METHOD, url, timeout=5, data=POST_BODY if METHOD == "POST" else None)
                if r.status_code == 200:
                    with lock:
                        totals["ok"] += 1
                else:
                    error(f"status {r.status_code}", f"status {r.status_code}")
            except requests.RequestException as e:
                # the innermost cause names what happened (reset, EOF, ...)
                cause = e
                for _ in range(10):
                    inner = cause.__cause__ or cause.__context__
                    if inner is None:
                        break
                    cause = inner
                error(type(cause).__name__, f"{type(e).__name__}: {e}")
            stop.wait(random.randint(0, max_gap) / 1000)
        s.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()

    def read_stdin():
        for line in sys.stdin:
            if "stop" in line:
                break
        stop.set()

    threading.Thread(target=read_stdin, daemon=True).start()
    while not stop.is_set() and time.monotonic() < deadline:
        stop.wait(1)
        print(f"progress {totals['ok']} {totals['errors']}", file=sys.stderr, flush=True)
    stop.set()
    for t in threads:
        t.join(10)
    print(json.dumps(totals), flush=True)


if __name__ == "__main__":
    main()
