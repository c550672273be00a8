"""An ASGI app (no framework) that exercises one Vela cache with the asyncio API.

Same routes as wsgi_app, with /afetch?key=K&sleep=S using aget_or_fetch and a
coroutine fetch function. block=S blocks the event loop S seconds (time.sleep),
so that concurrent requests spread over the workers.
"""
import asyncio
import json
import os
import time
from urllib.parse import parse_qs

import vela

cache = vela.Cache(os.environ["VELA_TEST_CACHE"], stampede_timeout=10.0)


def _load(sleep):
    async def load(key):
        await asyncio.sleep(sleep)
        cache.incr(("fetches", key))
        return f"computed by {os.getpid()}"
    return load


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    q = {k.decode(): v[0].decode() for k, v in parse_qs(scope.get("query_string", b"")).items()}
    path = scope["path"]
    if "block" in q:
        time.sleep(float(q["block"]))
    body, status = {}, 200
    if path == "/put":
        cache.put(q["key"], q["value"])
    elif path == "/get":
        body["value"] = cache.get(q["key"])
    elif path == "/afetch":
        body["value"] = await cache.aget_or_fetch(q["key"], _load(float(q.get("sleep", 0))), ttl=60)
    elif path == "/count":
        body["value"] = cache.get(("fetches", q["key"]), 0)
    elif path != "/pid":
        status = 404
    body["pid"] = os.getpid()
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
