"""A WSGI app for gunicorn under `baton run` (gunicorn reads LISTEN_FDS
itself). GET /version answers the worker's pid, its master's pid and the
generation baton started."""

import json
import os


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/version":
        body = json.dumps(
            {
                "pid": os.getpid(),
                "master_pid": os.getppid(),
                "generation": int(os.environ.get("BATON_GENERATION", "0")),
                "version": os.environ.get("APP_VERSION", "gunicorn-app"),
            }
        ).encode()
        ctype = "application/json"
    elif path == "/health":
        body, ctype = b"ok", "text/plain"
    else:
        body, ctype = b"hello from gunicorn\n", "text/plain"
    start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]
