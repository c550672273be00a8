"""FastAPI/Starlette: the cache dependency and the response-caching middleware, on real
FastAPI apps (driven through Starlette's TestClient), in several worker processes."""
import os
import time
import uuid

import pytest
from fastapi import Depends, FastAPI, Response
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import vela
from conftest import FORK, run_children, run_in_child
from vela.contrib.fastapi import CacheDependency, CachedResponses


@pytest.fixture
def name():
    name = f"fa{uuid.uuid4().hex[:10]}"
    yield name
    vela.destroy(name)


def make_app(name, renders=None, **middleware):
    dependency = CacheDependency(name, capacity="8MiB")
    app = FastAPI()
    app.add_middleware(CachedResponses, cache=dependency, **middleware)

    def rendered():
        if renders is not None:
            with renders.get_lock():
                renders.value += 1

    @app.get("/catalog/{item}")
    def catalog(item: str, page: int = 1, size: int = 10):
        rendered()
        return {"item": item, "page": page, "size": size, "pid": os.getpid()}

    @app.get("/catalog-slow")
    def slow():
        rendered()
        time.sleep(0.3)
        return {"pid": os.getpid()}

    @app.get("/missing")
    def missing():
        rendered()
        return Response("no such thing", status_code=404)

    @app.get("/private")
    def private():
        rendered()
        return Response("for you", headers={"Cache-Control": "private, max-age=60"})

    @app.get("/login")
    def login(response: Response):
        rendered()
        response.set_cookie("session", "s3cret")
        return {"logged in": True}

    @app.post("/catalog/{item}")
    def change(item: str, cache: vela.Cache = Depends(dependency)):
        return {"changes": cache.incr(("changes", item))}

    @app.get("/visits")
    def visits(cache: vela.Cache = Depends(dependency)):
        return {"visits": cache.incr("visits"), "same handle": cache is dependency()}

    return app


def test_get_responses_are_cached_by_path_query_and_vary_headers(name):
    renders = FORK.Value("i", 0)
    client = TestClient(make_app(name, renders, ttl=60, tags=["pages"], paths=["/catalog", "/missing",
                                                                                "/private", "/login"]))
    first = client.get("/catalog/shoe?page=2&size=5")
    assert first.status_code == 200 and first.headers["x-vela-cache"] == "miss"
    assert first.json() == {"item": "shoe", "page": 2, "size": 5, "pid": os.getpid()}
    again = client.get("/catalog/shoe?size=5&page=2")  # the same query in another order
    assert again.headers["x-vela-cache"] == "hit" and again.json() == first.json()
    assert again.headers["content-type"] == "application/json"
    assert renders.value == 1
    assert client.get("/catalog/shoe?page=3").headers["x-vela-cache"] == "miss"
    assert client.get("/catalog/shoe?page=2&size=5", headers={"accept": "text/html"}).headers[
        "x-vela-cache"] == "miss"  # another Accept: another entry
    head = client.head("/catalog/shoe?page=2&size=5")  # a route of GET only: 405, not stored
    assert (head.status_code, head.headers["x-vela-cache"]) == (405, "miss")
    assert renders.value == 3
    # what must not be stored is rendered every time
    for path, status in (("/missing", 404), ("/private", 200), ("/login", 200)):
        responses = []
        for _ in range(2):
            responses.append(client.get(path))
            client.cookies.clear()  # (else /login's cookie would make the next request private)
        assert [r.status_code for r in responses] == [status, status]
        assert [r.headers["x-vela-cache"] for r in responses] == ["miss", "miss"]
    assert client.get("/login").cookies.get("session") == "s3cret"
    client.cookies.clear()
    # a request with credentials or cookies is someone's own: it bypasses the cache
    for headers in ({"authorization": "Bearer t0ken"}, {"cookie": "session=abc"}):
        private = client.get("/catalog/shoe?page=2&size=5", headers=headers)
        assert private.status_code == 200 and "x-vela-cache" not in private.headers
    assert client.get("/catalog/shoe?page=2&size=5", headers={"host": "other.example"}).headers[
        "x-vela-cache"] == "miss"  # another site: another entry
    assert renders.value == 3 + 6 + 1 + 2 + 1
    # POST goes through, and the dependency gives the same handle to every route
    assert client.post("/catalog/shoe").json() == {"changes": 1}
    assert client.post("/catalog/shoe").json() == {"changes": 2}
    assert client.get("/visits").json() == {"visits": 1, "same handle": True}
    assert "x-vela-cache" not in client.get("/visits").headers  # not under paths
    # the tag drops every stored page
    assert CacheDependency(name, capacity="8MiB")().invalidate_tag("pages") == 4
    assert client.get("/catalog/shoe?page=2&size=5").headers["x-vela-cache"] == "miss"


def _request_in_worker(name, renders, barrier, path):
    client = TestClient(make_app(name, renders, paths=["/catalog"]))
    barrier.wait(30)
    response = client.get(path)
    return response.headers["x-vela-cache"], response.json()


def test_worker_processes_render_a_page_once(name):
    renders = FORK.Value("i", 0)
    barrier = FORK.Barrier(4)
    results = run_children(_request_in_worker, [(name, renders, barrier, "/catalog-slow") for _ in range(4)],
                           timeout=60)
    assert renders.value == 1
    assert len({body["pid"] for _, body in results}) == 1
    assert sorted(outcome for outcome, _ in results) == ["hit", "hit", "hit", "miss"]
    # and a worker started later reads it too
    assert run_in_child(_request_in_worker, name, renders, FORK.Barrier(1), "/catalog-slow") == \
        ("hit", results[0][1])


def test_plain_starlette_and_bad_options(name):
    cache = vela.Cache(name, capacity="8MiB")
    calls = []

    def home(request):
        calls.append(1)
        return PlainTextResponse(f"hello {len(calls)}")

    app = Starlette(routes=[Route("/", home)])
    app.add_middleware(CachedResponses, cache=cache, ttl=30, vary=())
    client = TestClient(app)
    assert [client.get("/").text for _ in range(3)] == ["hello 1"] * 3
    cache.close()
    with pytest.raises(vela.OptionError, match="paths must be a list of path prefixes"):
        CachedResponses(app, cache=cache, paths="/catalog")
    with pytest.raises(vela.OptionError, match="cache must be a vela.Cache or a CacheDependency"):
        CachedResponses(app, cache="shop")


def test_readme_example_runs_as_written(name):
    from apps import readme

    code = readme.python_blocks("Flask, dogpile.cache and FastAPI")[2]
    readme.run_snippet(code.replace('"shop"', repr(name)), {"__name__": "readme_fastapi"})
