"""Vela under a real gunicorn: 4 sync workers on a small WSGI app (tests/apps/wsgi_app.py,
tests/apps/gunicorn_conf.py with vela.gunicorn's hooks), with and without preload_app,
driven over HTTP on a loopback port. Every answer names the worker pid that served it.
"""
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

pytest.importorskip("gunicorn")

import vela  # noqa: E402
import vela.gunicorn  # noqa: E402
from apps import readme  # noqa: E402
from apps.server import get, get_all, gunicorn  # noqa: E402
from conftest import Child, new_name  # noqa: E402

WORKERS = 4


@pytest.fixture(scope="module", params=[False, True], ids=["no-preload", "preload"])
def served(request, tmp_path_factory):
    name = new_name()
    log = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    env = {"VELA_TEST_CACHE": name, "VELA_TEST_PRELOAD": "1" if request.param else "0"}
    server = gunicorn("wsgi_app:app", log, env)
    cache = None
    try:
        server.start(workers=WORKERS)
        cache = vela.Cache(name, sweep_interval=None)  # the test's own view; adopts the layout
        yield SimpleNamespace(server=server, cache=cache, name=name, preload=request.param,
                              url=server.url)
    finally:
        server.stop()
        if cache is not None:
            cache.close()
        vela.destroy(name)
    out = server.log()
    assert "Exception during worker exit" not in out, out
    assert "Traceback" not in out, out


def test_value_computed_in_one_worker_is_served_by_the_others(served):
    status, body, _ = get(served.url("/put?key=greeting&value=hello"))
    assert status == 200
    writer = body["pid"]
    workers = set(served.server.workers())
    assert writer in workers

    seen = set()
    for _ in range(5):  # each round keeps every worker busy for 0.2 s: requests spread
        for status, body, _ in get_all([served.url("/get?key=greeting&block=0.2")] * 8):
            assert status == 200, body
            assert body["value"] == "hello"
            seen.add(body["pid"])
        if len(seen - {writer}) >= 2:
            break
    assert len(seen - {writer}) >= 2, f"only {seen} answered (writer {writer})"
    assert seen <= workers
    assert served.cache.get("greeting") == "hello"  # and any other process of the host

    # preload_app: the app module (and its Cache) was made in the master, before fork
    _, body, _ = get(served.url("/pid"))
    if served.preload:
        assert body["loaded_in"] == served.server.pid != body["pid"]
    else:
        assert body["loaded_in"] == body["pid"]


def test_get_or_fetch_under_concurrent_requests_fetches_once(served):
    waits_before = served.cache.stats()["stampede_waits"]
    results = get_all([served.url("/fetch?key=report&sleep=1.0")] * 16, timeout=15)
    assert all(status == 200 for status, _, _ in results), results
    values = {body["value"] for _, body, _ in results}
    assert len(values) == 1, values
    pids = {body["pid"] for _, body, _ in results}
    assert len(pids) >= 2, pids  # several workers asked for it at the same time
    assert get(served.url("/count?key=report"))[1]["value"] == 1
    assert served.cache.get(("fetches", "report")) == 1
    assert served.cache.stats()["stampede_waits"] > waits_before  # others waited, not fetched


def test_sigkill_worker_under_load(served):
    cache, server = served.cache, served.server
    cache.put("steady", "value")
    before = server.workers()
    assert len(before) == WORKERS

    # A fetch that never finishes: its worker holds the stampede lease of "slow".
    pool = ThreadPoolExecutor(1)
    slow = pool.submit(lambda: _get_or_error(served.url("/fetch?key=slow&sleep=20"), 10))
    victim = _wait_for_lease_holder(cache, timeout=5)
    assert victim in before

    stop = threading.Event()
    results = []

    def load():
        while not stop.is_set():
            results.append(_get_or_error(served.url("/get?key=steady"), 5))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)

        # child_exit in the master releases the dead worker's lease at once: nobody
        # else asks for "slow", so nothing else could have freed it.
        deadline = time.monotonic() + 3
        while any(lease[3] == victim for lease in cache._table.leases_info()):
            assert time.monotonic() < deadline, "the dead worker's lease was not released"
            time.sleep(0.02)

        after = server.wait_for_workers(WORKERS, timeout=10, exclude=[victim])  # respawned
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
    bad = [r for r in results if r[0] != 200]
    assert not bad, bad[:5]  # the victim was busy: the load went to the others
    assert max(seconds for _, _, seconds in results) < 5

    status, body, seconds = get(served.url("/fetch?key=slow&sleep=0"), timeout=5)
    assert status == 200 and seconds < 2
    assert body["value"] == f"computed by {body['pid']}"
    assert cache.check() == []
    server.wait_for_log(rf"vela: released 1 stampede lease\(s\) of worker {victim}", 5)


def _get_or_error(url, timeout):
    start = time.monotonic()
    try:
        return get(url, timeout)
    except Exception as e:  # noqa: BLE001 - the test looks at it
        return None, e, time.monotonic() - start


def _wait_for_lease_holder(cache, timeout):
    deadline = time.monotonic() + timeout
    while True:
        leases = cache._table.leases_info()
        if leases:
            return leases[0][3]
        assert time.monotonic() < deadline, "no worker took the lease"
        time.sleep(0.02)


# --------------------------------------------------------------------------------------
# the hooks themselves, called as gunicorn calls them, without gunicorn


def _fetch_forever(name):
    cache = vela.Cache(name, sweep_interval=None)
    cache.get_or_fetch("k", lambda key: time.sleep(30))


def test_hooks_without_a_server(cache_name, caplog):
    server = SimpleNamespace(log=logging.getLogger("test.gunicorn"))
    vela.gunicorn.configure(cache_name, capacity="4MiB", stampede_timeout=10.0)
    child = None
    try:
        vela.gunicorn.on_starting(server)
        master = vela.gunicorn.cache(cache_name)
        assert master.info()["capacity"] == 4 << 20
        assert vela.gunicorn.cache(cache_name) is master  # one handle per process
        vela.gunicorn.post_fork(server, SimpleNamespace(pid=os.getpid()))  # already open: kept
        assert vela.gunicorn.cache(cache_name) is master

        child = Child(_fetch_forever, cache_name)  # a "worker" in the middle of a fetch
        holder = _wait_for_lease_holder(master, timeout=5)
        assert holder == child.pid
        child.kill()
        assert master._table.leases_info()  # dead, but its lease is still there

        with caplog.at_level(logging.INFO, logger="test.gunicorn"):
            vela.gunicorn.child_exit(server, SimpleNamespace(pid=child.pid))
        assert master._table.leases_info() == []
        assert f"released 1 stampede lease(s) of worker {child.pid}" in caplog.text

        # gunicorn calls worker_exit in the master for a worker that vanished: the
        # master's handles must stay open.
        vela.gunicorn.worker_exit(server, SimpleNamespace(pid=child.pid))
        assert not master.closed
        # in the worker itself, worker_exit closes the module's handles
        vela.gunicorn.worker_exit(server, SimpleNamespace(pid=os.getpid()))
        assert master.closed
        assert vela.gunicorn.caches() == []
    finally:
        if child is not None:
            child.close()
        vela.gunicorn._configured.pop(cache_name, None)
        handle = vela.gunicorn._handles.pop(cache_name, None)
        if handle is not None:
            handle.close()


def test_a_bad_option_stops_the_master(cache_name):
    vela.Cache(cache_name, capacity="4MiB", sweep_interval=None).close()
    vela.gunicorn.configure(cache_name, capacity="8MiB")
    try:
        with pytest.raises(vela.LayoutMismatch):
            vela.gunicorn.on_starting(SimpleNamespace(log=logging.getLogger("test.gunicorn")))
    finally:
        vela.gunicorn._configured.pop(cache_name, None)
        vela.gunicorn._handles.pop(cache_name, None)


def test_readme_example(tmp_path):
    """README's gunicorn.conf.py and app.py, run as they are (with a test cache name)."""
    name = new_name()
    for file, code in readme.files("Running under gunicorn and uvicorn").items():
        (tmp_path / file).write_text(code.replace('"shop"', f'"{name}"'))
    server = gunicorn("app:app", tmp_path / "gunicorn.log", {}, config=str(tmp_path / "gunicorn.conf.py"),
                      chdir=str(tmp_path))
    try:
        server.start(workers=WORKERS, probe=None)  # any request would build the report
        results = get_all([server.url("/")] * 8, timeout=15)
        bodies = {body for status, body, _ in results if status == 200}
        assert len(results) == 8 and all(status == 200 for status, _, _ in results), results
        assert len(bodies) == 1, bodies  # built once, by one worker
        (body,) = bodies
        assert int(body.decode().rsplit(" ", 1)[1]) in server.workers()
        cache = vela.Cache(name, sweep_interval=None)
        try:
            assert cache.info()["capacity"] == 64 << 20  # configured by the hooks
            stats = cache.stats()
            assert stats["fetches"] == 1
            assert stats["stampede_waits"] >= 1  # other workers waited for it
        finally:
            cache.close()
    finally:
        server.stop()
        vela.destroy(name)
