"""A plain ASGI app for uvicorn under `baton run` (`uvicorn --fd 3`)."""

import json
import os


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    # Read the request body (a POST's), so that the connection can carry
    # the next request.
    more = True
    while more:
        msg = await receive()
        more = msg.get("more_body", False) and msg["type"] == "http.request"
    if path == "/version":
        body = json.dumps(
            {
                "pid": os.getpid(),
                "generation": int(os.environ.get("BATON_GENERATION", "0")),
                "version": os.environ.get("APP_VERSION", "uvicorn-app"),
            }
        ).encode()
        ctype = b"application/json"
    elif path == "/health":
        body, ctype = b"ok", b"text/plain"
    else:
        body, ctype = b"hello from uvicorn\n", b"text/plain"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
