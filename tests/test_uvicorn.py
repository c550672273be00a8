"""Vela under a real uvicorn with several worker processes (tests/apps/asgi_app.py),
using the asyncio API (aget_or_fetch with a coroutine fetch function), driven over HTTP
on a loopback port. Every answer names the worker pid that served it.
"""
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("uvicorn")

import vela  # noqa: E402
from apps import readme  # noqa: E402
from apps.server import get, get_all, uvicorn  # noqa: E402
from conftest import new_name  # noqa: E402

WORKERS = 3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    name = new_name()
    log = tmp_path_factory.mktemp("uvicorn") / "uvicorn.log"
    cache = vela.Cache(name, capacity="8MiB", sweep_interval=None)  # workers attach to it
    server = uvicorn("asgi_app:app", log, {"VELA_TEST_CACHE": name}, workers=WORKERS)
    try:
        server.start(workers=WORKERS, timeout=30)
        yield server, cache
    finally:
        server.stop()
        cache.close()
        vela.destroy(name)
    assert "Traceback" not in server.log(), server.log()


def test_value_computed_in_one_worker_is_served_by_the_others(served):
    server, cache = served
    status, body, _ = get(server.url("/put?key=greeting&value=hello"))
    assert status == 200
    writer = body["pid"]
    seen = set()
    for _ in range(5):  # block=0.2 stalls each worker's loop: requests spread
        for status, body, _ in get_all([server.url("/get?key=greeting&block=0.2")] * 6):
            assert status == 200, body
            assert body["value"] == "hello"
            seen.add(body["pid"])
        if seen - {writer}:
            break
    assert seen - {writer}, f"only the writer {writer} answered"
    assert seen <= set(server.workers())
    assert cache.get("greeting") == "hello"


def test_aget_or_fetch_under_concurrent_requests_fetches_once(served):
    server, cache = served
    pool = ThreadPoolExecutor(1)
    try:
        fetches = pool.submit(get_all, [server.url("/afetch?key=report&sleep=1.0")] * 15, 15)
        time.sleep(0.3)
        # While the fetch runs and the others wait for it, every event loop still answers:
        # aget_or_fetch waits off the loop.
        pings = get_all([server.url("/pid")] * 6, timeout=5)
        results = fetches.result(timeout=20)
    finally:
        pool.shutdown(wait=False)
    assert all(status == 200 for status, _, _ in pings), pings
    assert max(seconds for _, _, seconds in pings) < 0.5, pings
    assert all(status == 200 for status, _, _ in results), results
    assert len({body["value"] for _, body, _ in results}) == 1
    assert get(server.url("/count?key=report"))[1]["value"] == 1
    assert cache.get(("fetches", "report")) == 1


def test_sigkill_worker_under_load(served):
    server, cache = served
    cache.put("steady", "value")
    before = server.workers()
    assert len(before) == WORKERS

    pool = ThreadPoolExecutor(1)
    slow = pool.submit(_get_or_error, server.url("/afetch?key=slow&sleep=20"), 10)
    deadline = time.monotonic() + 5
    while not cache._table.leases_info():
        assert time.monotonic() < deadline, "no worker took the lease"
        time.sleep(0.02)
    victim = cache._table.leases_info()[0][3]
    assert victim in before

    stop = threading.Event()
    results = []

    def load():
        while not stop.is_set():
            results.append(_get_or_error(server.url("/get?key=steady"), 5))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        # The dead worker's lease is taken over at once by the next caller: no wait
        # for stampede_timeout (10 s here).
        status, body, seconds = _get_or_error(server.url("/afetch?key=slow&sleep=0"), 5)
        assert status == 200 and seconds < 2, (status, body, seconds)
        assert body["value"] == f"computed by {body['pid']}" and body["pid"] != victim
        after = server.wait_for_workers(WORKERS, timeout=20, exclude=[victim])  # respawned
        assert len(set(after) - set(before)) == 1
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        pool.shutdown(wait=False)
    assert not any(t.is_alive() for t in threads), "a request hung"
    status, error, seconds = slow.result(timeout=10)
    assert status is None and seconds < 5, (status, error, seconds)  # reset, not hung
    assert len(results) > 10
    # Requests the victim had accepted die with it; none may hang.
    assert max(seconds for _, _, seconds in results) < 5
    failed = [r for r in results if r[0] != 200]
    assert len(failed) <= 4, failed
    assert cache.check() == []


def _get_or_error(url, timeout):
    start = time.monotonic()
    try:
        return get(url, timeout)
    except Exception as e:  # noqa: BLE001 - the test looks at it
        return None, e, time.monotonic() - start


def test_readme_example(tmp_path):
    """README's asgi.py, run as it is (with a test cache name) by 2 uvicorn workers."""
    name = new_name()
    code = readme.files("Running under gunicorn and uvicorn")["asgi.py"]
    (tmp_path / "asgi.py").write_text(code.replace('"shop"', f'"{name}"'))
    server = uvicorn("asgi:app", tmp_path / "uvicorn.log", {}, workers=2, app_dir=str(tmp_path))
    try:
        server.start(workers=2, timeout=30, probe=None)  # any request would fetch the report
        results = get_all([server.url("/")] * 8, timeout=15)
        assert all(status == 200 and body == b"report" for status, body, _ in results), results
        cache = vela.Cache(name, sweep_interval=None)
        try:
            assert cache.stats()["fetches"] == 1
        finally:
            cache.close()
    finally:
        server.stop()
        vela.destroy(name)
