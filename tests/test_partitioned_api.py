"""A partitioned cache driven from the test process: one host (a namespace of its
own) with a real vela-bridge, so every call goes through the data port, plus the
options and errors of the partitioned topology.
"""
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

import vela
from cluster import ROOT, eventually, free_port

pytest.importorskip("zmq")


@pytest.fixture
def host(monkeypatch, tmp_path):
    """This process as a worker of a one-member partitioned cluster."""
    namespace = f"vp{uuid.uuid4().hex[:8]}"
    name = f"p{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("VELA_NAMESPACE", namespace)
    cache = vela.Cache(name, capacity="8MiB", topology="partitioned", sweep_interval=None,
                       topology_opts={"timeout": 3.0})
    env = dict(os.environ, PYTHONPATH=ROOT)
    log = open(tmp_path / "bridge.log", "wb")
    bridge = subprocess.Popen([sys.executable, "-m", "vela.bridge", "run", "--cache", name, "--listen",
                               f"tcp://127.0.0.1:{free_port()}", "--data-listen", f"127.0.0.1:{free_port()}",
                               "--heartbeat", "0.2", "--failure-timeout", "1.0"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        eventually(lambda: (cache.cluster() or {}).get("ready"), 15, what="the bridge's partition table")
        yield cache
    finally:
        bridge.send_signal(signal.SIGTERM)
        bridge.wait(20)
        log.close()
        cache.destroy()


def test_the_mapping_api(host):
    host["a"] = {"x": 1}
    assert host["a"] == {"x": 1}
    assert "a" in host and "b" not in host
    assert len(host) == 1
    del host["a"]
    with pytest.raises(KeyError):
        host["a"]
    with pytest.raises(KeyError):
        del host["a"]
    assert host.get("a", "dflt") == "dflt"


def test_get_or_fetch_memoize_and_the_async_form(host):
    calls = []

    @host.memoize(ttl=60)
    def square(n):
        calls.append(n)
        return n * n

    assert [square(3), square(3), square(4)] == [9, 9, 16]
    assert calls == [3, 4]
    assert host.get_or_fetch("g", lambda k: k + "!") == "g!"
    assert host.get_or_fetch("g", lambda k: pytest.fail("fetched again")) == "g!"
    with pytest.raises(ZeroDivisionError):
        host.get_or_fetch("boom", lambda k: 1 / 0)
    assert host.get_or_fetch("boom", lambda k: "ok") == "ok"  # the failed fetch released its lease

    async def fetch(key):
        await asyncio.sleep(0.01)
        return key.upper()

    assert asyncio.run(host.aget_or_fetch("async", fetch)) == "ASYNC"
    assert host.get("async") == "ASYNC"
    assert host.stats()["fetches"] == 5


def test_telemetry_events_name_the_operation(host):
    seen = []
    events = [("vela", "cache", op, "stop") for op in ("get", "put", "delete", "fetch", "flush")]
    vela.telemetry.attach("partitioned-test", events, lambda e, m, md: seen.append((e[2], md.get("result"))))
    try:
        host.put("t", 1)
        host.get("t")
        host.get("absent")
        host.delete("t")
        host.get_or_fetch("f", lambda k: 2)
        host.flush()
    finally:
        vela.telemetry.detach("partitioned-test")
    assert seen == [("put", None), ("get", "hit"), ("get", "miss"), ("delete", True), ("fetch", "fetched"),
                    ("flush", None)]


def test_ttl_expiry_and_default_ttl(host):
    host.put("short", 1, ttl=0.2)
    assert 0 < host.ttl("short") <= 0.2
    time.sleep(0.3)
    assert host.get("short") is None
    import math

    host.put("forever", 1, ttl=math.inf)
    assert host.ttl("forever") is None


def test_options_of_the_partitioned_topology(monkeypatch):
    monkeypatch.setenv("VELA_NAMESPACE", f"vp{uuid.uuid4().hex[:8]}")
    with pytest.raises(vela.OptionError, match="unknown option"):
        vela.Cache("popt", topology="partitioned", topology_opts={"bridge_timeout": 1})
    with pytest.raises(vela.OptionError, match="timeout"):
        vela.Cache("popt", topology="partitioned", topology_opts={"timeout": 0})
    with pytest.raises(vela.OptionError, match="must be one of local, replicated, partitioned"):
        vela.Cache("popt", topology="sharded")
    with pytest.raises(vela.OptionError, match="near_cache"):
        vela.Cache("popt", near_cache=True)
    local = vela.Cache("popt", capacity="4MiB")
    try:
        with pytest.raises(vela.LayoutMismatch, match="topology=partitioned"):
            vela.Cache("popt", topology="partitioned")
    finally:
        local.destroy()


def test_without_a_bridge_calls_fail_within_the_timeout(monkeypatch):
    monkeypatch.setenv("VELA_NAMESPACE", f"vp{uuid.uuid4().hex[:8]}")
    cache = vela.Cache("nobridge", capacity="4MiB", topology="partitioned", topology_opts={"timeout": 0.5})
    try:
        t = time.monotonic()
        with pytest.raises(vela.BridgeUnavailable, match="publishes no partition table"):
            cache.put("k", 1)
        assert time.monotonic() - t < 1.5
    finally:
        cache.destroy()
