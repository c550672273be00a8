"""OpenTelemetry (vela.contrib.otel) and the start/exception telemetry events it builds on.

Spans and metrics are read back with the real opentelemetry-sdk: an in-memory span
exporter behind a SimpleSpanProcessor (a span is exported when it ends) and an
in-memory metric reader. Every test leaves no telemetry handler behind.
"""
import asyncio
import contextlib
import itertools
import subprocess
import sys
import time
import uuid

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import vela
import vela.contrib.otel
from apps import readme

_ids = itertools.count()
BIG = b"x" * (200 * 1024)   # above max_entry_size of an 8 MiB cache (128 KiB)


@pytest.fixture(autouse=True)
def no_leaked_handlers():
    assert vela.telemetry.list_handlers() == {}
    yield
    leaked = vela.telemetry.list_handlers()
    for hid in leaked:
        vela.telemetry.detach(hid)
    assert leaked == {}, "a test left telemetry handlers attached"


class Otel:
    """An SDK tracer and meter provider reading into memory, instrumented."""

    def __init__(self, prefix=("vela", "cache")):
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.instrumentation = vela.contrib.otel.instrument(self.tracer_provider, self.meter_provider, prefix)

    def spans(self):
        return list(self.exporter.get_finished_spans())

    def metrics(self):
        """{(metric name, frozenset of attributes): value (counters) or data point (histograms)}"""
        out = {}
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                assert sm.scope.name == "vela.contrib.otel"
                for metric in sm.metrics:
                    for point in metric.data.data_points:
                        out[metric.name, frozenset(point.attributes.items())] = getattr(point, "value", point)
        return out

    def close(self):
        self.instrumentation.uninstrument()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def otel():
    o = Otel()
    yield o
    o.close()


def common(cache, op):
    return {"db.system.name": "vela", "db.namespace": cache.name, "db.operation.name": op,
            "vela.cache.name": cache.name}


def summary(span):
    return span.name, dict(span.attributes), span.status.status_code


@contextlib.contextmanager
def recorder(events):
    got = []
    hid = ("otel-test", next(_ids))
    vela.telemetry.attach(hid, events, lambda e, m, md: got.append((e, dict(m), dict(md))))
    try:
        yield got
    finally:
        vela.telemetry.detach(hid)


def ev(op, end):
    return ("vela", "cache", op, end)


# --------------------------------------------------------------------------------------
# spans


def test_get_hit_and_miss_spans(cache, otel):
    cache.put("here", 1)
    otel.exporter.clear()
    before = time.time_ns()
    assert cache.get("here") == 1
    assert cache.get("absent", "dflt") == "dflt"
    after = time.time_ns()
    hit, miss = otel.spans()
    assert summary(hit) == ("vela.get", dict(common(cache, "get"), **{"vela.result": "hit"}), StatusCode.UNSET)
    assert summary(miss) == ("vela.get", dict(common(cache, "get"), **{"vela.result": "miss"}), StatusCode.UNSET)
    for span in (hit, miss):
        assert span.kind is SpanKind.CLIENT
        assert span.events == ()
        assert before <= span.start_time <= span.end_time <= after
        assert span.instrumentation_scope.name == "vela.contrib.otel"
        assert span.instrumentation_scope.version == vela.__version__
    assert hit.end_time <= miss.start_time


def test_put_add_delete_spans(cache, otel):
    cache.put("a", 1)
    cache.put(("t", 2), "x", ttl=60, tags=["g"])
    assert cache.add("a", 2) is False
    assert cache.add("b", 2, ttl=1.5) is True
    assert cache.delete("a") is True
    assert cache.delete("a") is False
    assert [summary(s) for s in otel.spans()] == [
        ("vela.put", common(cache, "put"), StatusCode.UNSET),
        ("vela.put", dict(common(cache, "put"), **{"vela.ttl": 60}), StatusCode.UNSET),
        ("vela.put", dict(common(cache, "put"), **{"vela.stored": False}), StatusCode.UNSET),
        ("vela.put", dict(common(cache, "put"), **{"vela.stored": True, "vela.ttl": 1.5}), StatusCode.UNSET),
        ("vela.delete", dict(common(cache, "delete"), **{"vela.removed": 1}), StatusCode.UNSET),
        ("vela.delete", dict(common(cache, "delete"), **{"vela.removed": 0}), StatusCode.UNSET),
    ]


def test_batch_fetch_tag_and_flush_spans(cache, otel):
    cache.put_many({"a": 1, "b": 2, "c": 3})
    assert cache.get_many(["a", "b", "zz"]) == {"a": 1, "b": 2}
    assert cache.delete_many(["a"]) == 1
    assert cache.get_or_fetch("f", lambda k: "v") == "v"
    assert cache.get_or_fetch("f", lambda k: "w") == "v"
    cache.put("t", 1, tags=["users"])
    assert cache.invalidate_tag("users") == 1
    assert cache.flush() == 3
    assert [summary(s) for s in otel.spans()] == [
        ("vela.put", dict(common(cache, "put"), **{"vela.keys": 3, "db.operation.batch.size": 3}),
         StatusCode.UNSET),
        ("vela.get", dict(common(cache, "get"), **{"vela.keys": 3, "db.operation.batch.size": 3,
                                                   "vela.hits": 2}), StatusCode.UNSET),
        # a batch of one is no batch for the conventions: only vela.keys counts it
        ("vela.delete", dict(common(cache, "delete"), **{"vela.keys": 1, "vela.removed": 1}), StatusCode.UNSET),
        ("vela.fetch", dict(common(cache, "fetch"), **{"vela.result": "fetched"}), StatusCode.UNSET),
        ("vela.fetch", dict(common(cache, "fetch"), **{"vela.result": "hit"}), StatusCode.UNSET),
        ("vela.put", common(cache, "put"), StatusCode.UNSET),
        ("vela.invalidate_tag", dict(common(cache, "invalidate_tag"), **{"vela.tag": "users", "vela.count": 1}),
         StatusCode.UNSET),
        ("vela.flush", dict(common(cache, "flush"), **{"vela.count": 3}), StatusCode.UNSET),
    ]


@pytest.mark.parametrize("value, error, error_type", [
    (BIG, vela.ValueTooLarge, "vela.errors.ValueTooLarge"),
    (lambda: 1, TypeError, "TypeError"),   # the pickle serializer refuses a lambda
])
def test_a_put_that_raises_is_an_error_span(cache, otel, value, error, error_type):
    with pytest.raises(error) as raised:
        cache.put("k", value)
    (span,) = otel.spans()
    assert summary(span) == ("vela.put", dict(common(cache, "put"), **{"error.type": error_type}),
                             StatusCode.ERROR)
    assert span.status.description == str(raised.value)
    (event,) = span.events
    assert event.name == "exception"
    assert event.timestamp == span.end_time
    assert event.attributes["exception.type"] == error_type
    assert event.attributes["exception.message"] == str(raised.value)
    assert "Traceback" in event.attributes["exception.stacktrace"]
    assert "k" not in cache                    # nothing stored


def test_a_fetch_fn_that_raises_is_an_error_span_and_the_next_caller_fetches(cache, otel):
    def broken(key):
        raise LookupError("backend down")

    with pytest.raises(LookupError):
        cache.get_or_fetch("f", broken)
    assert cache.get_or_fetch("f", lambda k: "ok") == "ok"
    failed, fetched = otel.spans()
    assert summary(failed) == ("vela.fetch", dict(common(cache, "fetch"), **{"error.type": "LookupError"}),
                               StatusCode.ERROR)
    assert failed.status.description == "backend down"
    assert summary(fetched) == ("vela.fetch", dict(common(cache, "fetch"), **{"vela.result": "fetched"}),
                                StatusCode.UNSET)


def test_the_span_of_a_call_is_a_child_of_the_callers_span(cache, otel):
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("request") as request:
        cache.put("k", 1)
    cache.get("k")                              # outside: a root span
    put, request_span, get = otel.spans()
    assert request_span.name == "request"
    assert put.parent.span_id == request.get_span_context().span_id
    assert put.context.trace_id == request.get_span_context().trace_id
    assert get.parent is None


def test_concurrent_asyncio_tasks_parent_their_own_fetch_spans(cache, otel):
    """Two tasks interleave inside aget_or_fetch (each fetch_fn awaits while the other
    runs): each vela.fetch span still has its own task's request span as parent."""
    tracer = otel.tracer_provider.get_tracer("app")
    both_inside = asyncio.Event()
    inside = []

    async def fetch(key):
        inside.append(key)
        if len(inside) == 2:
            both_inside.set()
        await both_inside.wait()
        return key.upper()

    async def request(key):
        with tracer.start_as_current_span(f"request {key}") as span:
            assert await cache.aget_or_fetch(key, fetch) == key.upper()
            return span.get_span_context().span_id

    async def main():
        return await asyncio.gather(request("a"), request("b"))

    ids = dict(zip("ab", asyncio.run(main())))
    fetches = [s for s in otel.spans() if s.name == "vela.fetch"]
    assert len(fetches) == 2
    assert inside == ["a", "b"]
    by_parent = {s.parent.span_id: s for s in fetches}
    assert set(by_parent) == set(ids.values())
    assert all(s.attributes["vela.result"] == "fetched" for s in fetches)
    # the fetches overlapped in time, and each span still covers its own call
    a, b = by_parent[ids["a"]], by_parent[ids["b"]]
    assert a.start_time < b.end_time and b.start_time < a.end_time


def test_only_caches_of_the_instrumented_prefix_make_spans(cache_name, otel):
    mine = Otel(prefix=("myapp", "cache"))
    try:
        with vela.Cache(cache_name, capacity="8MiB", telemetry_prefix=("myapp", "cache")) as c:
            c.put("k", 1)
            assert c.get("k") == 1
        assert [s.name for s in mine.spans()] == ["vela.put", "vela.get"]
        assert otel.spans() == []
    finally:
        mine.close()


def test_instrument_refuses_a_bad_prefix():
    for bad in ("vela", (), ("vela", 1)):
        with pytest.raises(vela.OptionError, match="prefix must be a non-empty tuple of str"):
            vela.contrib.otel.instrument(prefix=bad)


# --------------------------------------------------------------------------------------
# metrics


def test_duration_histogram_and_hit_miss_counters(cache, otel):
    cache.put("a", 1)
    cache.get("a")
    cache.get("zz")
    cache.get_many(["a", "zz", "yy"])
    cache.get_or_fetch("f", lambda k: 1)       # a miss: this call fetched
    cache.get_or_fetch("f", lambda k: 2)       # a hit
    with pytest.raises(vela.ValueTooLarge):
        cache.put("big", BIG)
    cache.delete("a")
    base = {("db.system.name", "vela"), ("db.namespace", cache.name)}

    def attrs(op, **more):
        return frozenset(base | {("db.operation.name", op)} | set(more.items()))

    got = otel.metrics()
    counters = {k: v for k, v in got.items() if k[0] in ("vela.cache.hits", "vela.cache.misses")}
    assert counters == {
        ("vela.cache.hits", attrs("get")): 2,      # get "a", and "a" of get_many
        ("vela.cache.misses", attrs("get")): 3,    # get "zz", "zz" and "yy" of get_many
        ("vela.cache.hits", attrs("fetch")): 1,
        ("vela.cache.misses", attrs("fetch")): 1,
    }
    histograms = {k[1]: v for k, v in got.items() if k[0] == "db.client.operation.duration"}
    assert {a: p.count for a, p in histograms.items()} == {
        attrs("put"): 1,
        attrs("put", **{"error.type": "vela.errors.ValueTooLarge"}): 1,
        attrs("get"): 3,
        attrs("fetch"): 2,
        attrs("delete"): 1,
    }
    point = histograms[attrs("get")]
    assert tuple(point.explicit_bounds) == vela.contrib.otel.DURATION_BUCKETS
    assert 0 < point.sum < 10      # seconds, not nanoseconds
    # every span's duration went into its histogram
    spans = otel.spans()
    get_seconds = sum(s.end_time - s.start_time for s in spans if s.name == "vela.get") / 1e9
    assert point.sum == pytest.approx(get_seconds, rel=1e-6, abs=1e-9)


# --------------------------------------------------------------------------------------
# uninstrument, and the untraced hot path


def test_uninstrument_stops_spans_and_metrics(cache):
    o = Otel()
    try:
        cache.put("k", 1)
        assert o.instrumentation.uninstrument() is True
        assert o.instrumentation.uninstrument() is False
        assert vela.telemetry.list_handlers() == {}
        cache.get("k")
        cache.put("k", 2)
        assert [s.name for s in o.spans()] == ["vela.put"]
        assert {name for name, _ in o.metrics()} == {"db.client.operation.duration"}
    finally:
        o.close()


def test_with_no_handler_get_is_the_bare_store_method(cache):
    """No handler: the handle's get is the store's own (on a local table the native
    method: no Python frame, no flag check); instrumenting swaps in the traced get,
    uninstrumenting swaps it back."""
    assert cache.__dict__["get"] == cache._store.get
    assert type(cache.get).__name__ == "builtin_function_or_method"
    o = Otel()
    try:
        assert "get" not in cache.__dict__
        assert cache.get.__func__ is vela.Cache.get
        cache.get("k")
        assert [s.name for s in o.spans()] == ["vela.get"]
    finally:
        o.close()
    assert cache.__dict__["get"] == cache._store.get


# --------------------------------------------------------------------------------------
# the start and exception telemetry events (vela.telemetry.span)


def test_start_stop_and_exception_events_with_exact_metadata(cache):
    ops = ("get", "put", "delete", "fetch", "invalidate_tag", "flush")
    with recorder([ev(op, end) for op in ops for end in ("start", "stop", "exception")]) as got:
        before = time.time_ns()
        cache.put("a", 1, ttl=30)
        after = time.time_ns()
        assert cache.get("a") == 1
        with pytest.raises(vela.ValueTooLarge) as raised:
            cache.put("big", BIG)
        assert cache.invalidate_tag("none") == 0
    name = cache.name
    assert [(e, md) for e, _, md in got] == [
        (ev("put", "start"), {"cache": name, "key": "a", "ttl": 30}),
        (ev("put", "stop"), {"cache": name, "key": "a", "ttl": 30}),
        (ev("get", "start"), {"cache": name, "key": "a"}),
        (ev("get", "stop"), {"cache": name, "key": "a", "result": "hit"}),
        (ev("put", "start"), {"cache": name, "key": "big", "ttl": None}),
        (ev("put", "exception"), {"cache": name, "key": "big", "ttl": None, "kind": vela.ValueTooLarge,
                                  "reason": raised.value}),
        (ev("invalidate_tag", "start"), {"cache": name, "tag": "none"}),
        (ev("invalidate_tag", "stop"), {"cache": name, "tag": "none"}),
    ]
    assert got[5][2]["reason"] is raised.value
    measurements = [m for _, m, _ in got]
    assert [sorted(m) for m in measurements] == [["system_time"], ["duration"]] * 2 + [
        ["system_time"], ["duration"], ["system_time"], ["count", "duration"]]
    assert before <= measurements[0]["system_time"] <= after
    assert all(type(m.get("duration", 1)) is int and m.get("duration", 1) > 0 for m in measurements)
    assert measurements[7]["count"] == 0


def test_fetch_start_and_exception_events_async(cache):
    async def broken(key):
        await asyncio.sleep(0)
        raise LookupError("backend down")

    with recorder([ev("fetch", end) for end in ("start", "stop", "exception")]) as got:
        with pytest.raises(LookupError) as raised:
            asyncio.run(cache.aget_or_fetch("f", broken))
        assert asyncio.run(cache.aget_or_fetch("f", lambda k: 7)) == 7
    name = cache.name
    assert [(e, md) for e, _, md in got] == [
        (ev("fetch", "start"), {"cache": name, "key": "f"}),
        (ev("fetch", "exception"), {"cache": name, "key": "f", "kind": LookupError, "reason": raised.value}),
        (ev("fetch", "start"), {"cache": name, "key": "f"}),
        (ev("fetch", "stop"), {"cache": name, "key": "f", "result": "fetched"}),
    ]


def test_a_call_refused_by_its_argument_checks_emits_nothing(cache):
    with recorder([ev("put", end) for end in ("start", "stop", "exception")]) as got:
        with pytest.raises(ValueError):
            cache.put("k", 1, ttl=-1)
    assert got == []


def test_a_start_handler_that_raises_is_detached_and_the_call_completes(cache):
    def bad(event, measurements, metadata):
        raise RuntimeError("handler bug")

    vela.telemetry.attach("bad-start", [ev("put", "start")], bad)
    try:
        with recorder([ev("put", "stop")]) as stops:
            cache.put("k", 1)
            cache.put("k", 2)
        assert "bad-start" not in vela.telemetry.list_handlers()
        assert [md["key"] for _, _, md in stops] == ["k", "k"]
        assert cache.get("k") == 2
    finally:
        vela.telemetry.detach("bad-start")


def test_without_the_api_the_import_names_the_extra():
    code = ("import sys; sys.modules['opentelemetry.trace'] = None\n"
            "try:\n    import vela.contrib.otel\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout == ("vela.contrib.otel needs the Python package opentelemetry-api, which is not "
                          "installed: pip install 'vela[otel]'\n"), out.stderr


# --------------------------------------------------------------------------------------
# the README


def test_readme_example_runs_as_written():
    code = readme.python_blocks("OpenTelemetry")[0]
    name = f"readme{uuid.uuid4().hex[:10]}"
    try:
        readme.run_snippet(code.replace('"shop"', repr(name)), {})
    finally:
        vela.destroy(name)
    assert vela.telemetry.list_handlers() == {}
