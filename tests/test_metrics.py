"""vela.metrics: the host's figures in the Prometheus text format, as a function and as a
prometheus_client collector (also next to prometheus_client's multiprocess collector)."""
import os
import signal
import time

import pytest

import vela
import vela.metrics
from conftest import Child, run_children
from vela.inspect import segment_exists

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def parse(text):
    """{(sample name, cache label): value} and {family name: type}."""
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, s.labels.get("cache"))] = s.value
    return samples, types


def test_exposition_reports_the_stats(cache):
    cache.put("a", 1)
    cache.put("b", b"x" * 100)
    cache.get("a")
    cache.get("a")
    cache.get("missing")
    cache.delete("b")
    text = vela.metrics.exposition([cache])
    samples, types = parse(text)
    name = cache.name
    stats = cache.stats()
    for counter in ("hits", "misses", "writes", "deletes", "evictions", "expirations", "invalidations",
                    "fetches", "stampede_waits", "stampede_timeouts", "lock_recoveries"):
        assert types[f"vela_cache_{counter}"] == "counter"
        assert samples[(f"vela_cache_{counter}_total", name)] == stats[counter], counter
    assert samples[("vela_cache_hits_total", name)] == 2
    assert samples[("vela_cache_misses_total", name)] == 1
    assert samples[("vela_cache_up", name)] == 1
    assert samples[("vela_cache_entries", name)] == 1
    assert samples[("vela_cache_memory_used_bytes", name)] == stats["memory_used"] > 0
    assert samples[("vela_cache_capacity_bytes", name)] == 8 << 20
    assert samples[("vela_cache_hit_ratio", name)] == pytest.approx(2 / 3)
    assert samples[("vela_cache_locks_held", name)] == 0
    assert samples[("vela_cache_leases_held", name)] == 0
    assert samples[("vela_cache_poisoned", name)] == 0
    assert f'vela_cache_hits_total{{cache="{name}"}} 2\n' in text
    assert text.endswith("\n")


def test_collector_agrees_with_the_text(cache):
    cache.put("k", "v")
    cache.get("k")
    registry = prometheus_client.CollectorRegistry()
    collector = vela.metrics.VelaCollector(cache)
    registry.register(collector)
    from_client, _ = parse(prometheus_client.generate_latest(registry).decode())
    from_text, _ = parse(vela.metrics.exposition([cache]))
    assert from_client == from_text
    assert len(from_text) == len(vela.metrics.METRICS)


def _hits(name, n):
    c = vela.Cache(name, sweep_interval=None)
    for _ in range(n):
        c.get("shared")
    return True


def test_counts_are_those_of_every_process(cache):
    cache.put("shared", 1)
    run_children(_hits, [(cache.name, 100)] * 3, timeout=30)
    samples, _ = parse(vela.metrics.exposition([cache]))
    assert samples[("vela_cache_hits_total", cache.name)] == 300


def test_by_name_and_absent_caches(cache):
    absent = "vela-metrics-absent"
    text = vela.metrics.exposition([cache.name, absent, cache])
    samples, _ = parse(text)
    assert samples[("vela_cache_up", cache.name)] == 1
    assert samples[("vela_cache_up", absent)] == 0
    assert ("vela_cache_hits_total", absent) not in samples  # nothing invented for it
    assert text.count(f'vela_cache_up{{cache="{cache.name}"}}') == 1  # named twice, one series
    assert segment_exists(absent) == (False, 0)  # looking did not create it

    collector = vela.metrics.VelaCollector(absent, namespace="shop")
    registry = prometheus_client.CollectorRegistry()
    registry.register(collector)  # describe(): registering reads nothing
    samples, _ = parse(prometheus_client.generate_latest(registry).decode())
    assert samples[("shop_up", absent)] == 0
    collector.close()
    assert segment_exists(absent) == (False, 0)


def test_next_to_prometheus_multiprocess_mode(cache, tmp_path, monkeypatch):
    from prometheus_client import multiprocess, values

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    values.ValueClass = values.get_value_class()
    try:
        requests = prometheus_client.Counter("app_requests", "requests", registry=None)
        requests.inc(3)
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(vela.metrics.VelaCollector(cache))
        cache.get("nothing")
        samples, _ = parse(prometheus_client.generate_latest(registry).decode())
    finally:
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
        values.ValueClass = values.get_value_class()
    assert samples[("app_requests_total", None)] == 3
    assert samples[("vela_cache_misses_total", cache.name)] == 1


def _stall(name):
    c = vela.Cache(name, sweep_interval=None)
    c._table.debug_stall(1, "stalled", "value")  # stops forever holding a stripe lock


def _fetch_slowly(name):
    c = vela.Cache(name, sweep_interval=None)
    c.get_or_fetch("slow", lambda key: time.sleep(30))


def test_a_scrape_never_waits_for_a_lock(cache):
    staller = Child(_stall, cache.name)
    fetcher = Child(_fetch_slowly, cache.name)
    try:
        deadline = time.monotonic() + 5
        while not (any(s[3] for s in cache._table.stripes_info()) and cache._table.leases_info()):
            assert time.monotonic() < deadline, "the children did not get their lock and lease"
            time.sleep(0.02)
        os.kill(staller.pid, signal.SIGSTOP)
        start = time.monotonic()
        samples, _ = parse(vela.metrics.exposition([cache]))
        assert time.monotonic() - start < 1
        assert samples[("vela_cache_locks_held", cache.name)] == 1
        assert samples[("vela_cache_leases_held", cache.name)] == 1
    finally:
        staller.close()
        fetcher.close()


def test_readme_examples(cache_name, tmp_path, monkeypatch):
    from prometheus_client import values

    from apps import readme

    plain, with_client = (code.replace('"shop"', f'"{cache_name}"')
                          for code in readme.python_blocks("Metrics"))
    ns = readme.run_snippet(plain, {})
    try:
        assert f'vela_cache_up{{cache="{cache_name}"}} 1' in ns["text"]
        sent = []
        body = b"".join(ns["metrics_app"]({}, lambda status, headers: sent.append((status, headers))))
        assert sent == [("200 OK", [("Content-Type", vela.metrics.CONTENT_TYPE)])]
        assert parse(body.decode())[0][("vela_cache_up", cache_name)] == 1
    finally:
        ns["cache"].close()

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    values.ValueClass = values.get_value_class()
    ns = {}
    try:
        readme.run_snippet(with_client, ns)
        assert parse(ns["body"].decode())[0][("vela_cache_up", cache_name)] == 1
    finally:
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
        values.ValueClass = values.get_value_class()
        for collector in list(getattr(ns.get("registry"), "_collector_to_names", ())):
            if isinstance(collector, vela.metrics.VelaCollector):
                collector.close()
