"""A WSGI app that exercises one Vela cache; every answer says which process served it.

    /pid                      {}
    /put?key=K&value=V        cache.put(K, V)
    /get?key=K                {"value": cache.get(K)}
    /fetch?key=K&sleep=S      {"value": cache.get_or_fetch(K, load)}; load sleeps S seconds,
                              counts its runs under ("fetches", K) and returns "computed by PID"
    /count?key=K              {"value": runs of load for K}
Any request may add block=S: the worker sleeps S seconds first (so that concurrent
requests spread over the workers).
"""
import json
import os
import time
from urllib.parse import parse_qs

import vela.gunicorn

cache = vela.gunicorn.cache(os.environ["VELA_TEST_CACHE"])
LOADED_IN = os.getpid()  # the master with preload_app, else the worker


def _load(sleep):
    def load(key):
        time.sleep(sleep)
        cache.incr(("fetches", key))
        return f"computed by {os.getpid()}"
    return load


def app(environ, start_response):
    q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    path = environ.get("PATH_INFO", "/")
    if "block" in q:
        time.sleep(float(q["block"]))
    body = {}
    if path == "/put":
        cache.put(q["key"], q["value"])
    elif path == "/get":
        body["value"] = cache.get(q["key"])
    elif path == "/fetch":
        body["value"] = cache.get_or_fetch(q["key"], _load(float(q.get("sleep", 0))), ttl=60)
    elif path == "/count":
        body["value"] = cache.get(("fetches", q["key"]), 0)
    elif path != "/pid":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    body.update(pid=os.getpid(), loaded_in=LOADED_IN)
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
