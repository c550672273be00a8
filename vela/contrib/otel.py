"""OpenTelemetry: every cache call as a span, and its duration, hits and misses as metrics.

    import vela.contrib.otel

    instrumentation = vela.contrib.otel.instrument()   # the global tracer and meter providers
    ...
    instrumentation.uninstrument()

:func:`instrument` attaches one :mod:`vela.telemetry` handler to the ``stop`` and
``exception`` events of every traced call (``pip install 'vela[otel]'`` brings the
OpenTelemetry API; an SDK, or another implementation of it, decides where spans
and metrics go). Each call becomes one span named ``vela.<op>`` (``vela.get``,
``vela.put``, ``vela.fetch``, ``vela.delete``, ``vela.invalidate_tag``,
``vela.flush``), of kind CLIENT, with the attributes of OpenTelemetry's database
client conventions where they apply and ``vela.*`` ones for the rest:

=============================  ===================================================
``db.system.name``             ``"vela"``
``db.namespace``               the cache's name (``vela.cache.name`` too)
``db.operation.name``          the op: ``get``, ``put``, ``fetch``, ...
``db.operation.batch.size``    keys of a batch call of 2 keys or more (the
                               conventions never count a batch of one)
``vela.keys``                  keys of a batch call (``get_many``, ...), any number
``vela.result``                ``hit``/``miss`` (get), ``hit``/``waited``/``fetched`` (fetch)
``vela.hits``                  keys found by ``get_many``
``vela.stored``                whether ``add`` stored
``vela.removed``               entries removed by ``delete``/``delete_many``
``vela.count``                 entries removed by ``invalidate_tag``/``flush``
``vela.tag``                   the tag of ``invalidate_tag``
``vela.ttl``                   seconds of a ``put`` given ``ttl=``
``error.type``                 the exception's qualified class name, when the call raised
=============================  ===================================================

Keys are not recorded: they may hold personal data and are unbounded in number.
A call that raises ends its span with status ERROR (the description is the
exception's message) and an ``exception`` span event.

Metrics, with ``db.system.name``, ``db.namespace`` and ``db.operation.name`` (and
``error.type`` when the call raised) as attributes: the histogram
``db.client.operation.duration`` (seconds, one series per op and cache) and the
counters ``vela.cache.hits`` and ``vela.cache.misses`` (keys looked up by ``get``,
``get_many`` and ``get_or_fetch``; a fetch that waited for another caller's value
counts as a hit: this call did not run ``fetch_fn``). They count this process's
calls; ``Cache.stats()`` holds the sums over every process of the host.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

from .. import __version__, telemetry
from .._extras import need

need("opentelemetry.trace", "vela.contrib.otel")

from opentelemetry import metrics, trace  # noqa: E402  (after the check that names the extra)
from opentelemetry.trace import SpanKind, Status, StatusCode  # noqa: E402

__all__ = ["Instrumentation", "instrument", "OPS"]

#: The operations whose events a Cache emits (README, Telemetry).
OPS = ("get", "put", "fetch", "delete", "invalidate_tag", "flush")

SYSTEM = "vela"

# Cache calls take microseconds (a shared-memory get) to seconds (a fetch, a
# cluster call): the conventions' default buckets start at 5 ms and would put
# nearly every call in the first one.
DURATION_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# metadata key -> span attribute, for what is copied as it is (when present and not None)
_COPIED = {"hits": "vela.hits", "tag": "vela.tag", "ttl": "vela.ttl"}


class Instrumentation:
    """What :func:`instrument` attached; :meth:`uninstrument` detaches it."""

    def __init__(self, tracer: trace.Tracer, meter: metrics.Meter, prefix: tuple[str, ...]) -> None:
        self.prefix = prefix
        self._tracer = tracer
        self._duration = meter.create_histogram(
            "db.client.operation.duration", unit="s", description="Duration of Vela cache calls.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self._hits = meter.create_counter(
            "vela.cache.hits", unit="{key}", description="Keys looked up and found.")
        self._misses = meter.create_counter(
            "vela.cache.misses", unit="{key}", description="Keys looked up and not found.")
        self._handler_id = ("vela.contrib.otel", id(self))
        telemetry.attach(self._handler_id,
                         [prefix + (op, end) for op in OPS for end in ("stop", "exception")],
                         self._on_event)

    def uninstrument(self) -> bool:
        """Stop turning events into spans and metrics; True when it was still attached."""
        return telemetry.detach(self._handler_id)

    def _on_event(self, event: tuple[str, ...], measurements: dict[str, Any],
                  metadata: dict[str, Any]) -> None:
        # Handlers run after the call, in its thread and asyncio task: the span is
        # made whole here, with the call's own timing (end is now, start is now less
        # the duration), rather than begun on "start" and ended on "stop". That keeps
        # no state between events, so it is right whatever interleaves: threads,
        # tasks switching at an await inside aget_or_fetch, a handler attached or
        # detached in mid-call. The parent is the current span, which OpenTelemetry
        # keeps in a contextvar: the caller's span in this thread or task, as at the
        # start of the call. The cost: spans the fetch_fn of get_or_fetch makes are
        # the fetch span's siblings, not its children.
        end = time.time_ns()
        duration = measurements["duration"]
        op = event[-2]
        failure = event[-1] == "exception"
        # what the metrics carry too (bounded: a cache, an op, an error class)
        common = {"db.system.name": SYSTEM, "db.namespace": metadata["cache"], "db.operation.name": op}
        if failure:
            common["error.type"] = _qualified_name(metadata["kind"])
        span = self._tracer.start_span(f"vela.{op}", kind=SpanKind.CLIENT,
                                       attributes=dict(common, **_call_attributes(op, measurements, metadata)),
                                       start_time=end - duration)
        if failure:
            reason = metadata["reason"]
            span.record_exception(reason, timestamp=end)
            span.set_status(Status(StatusCode.ERROR, str(reason)))
        span.end(end_time=end)
        self._duration.record(duration / 1e9, common)
        if not failure:
            self._count_lookups(op, metadata, common)

    def _count_lookups(self, op: str, metadata: dict[str, Any], attributes: dict[str, Any]) -> None:
        if op == "get" and "keys" in metadata:
            hits, misses = metadata["hits"], metadata["keys"] - metadata["hits"]
        elif op in ("get", "fetch"):
            hit = metadata["result"] != "miss" and metadata["result"] != "fetched"
            hits, misses = int(hit), int(not hit)
        else:
            return
        if hits:
            self._hits.add(hits, attributes)
        if misses:
            self._misses.add(misses, attributes)


def _call_attributes(op: str, measurements: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """The span attributes of one call's event besides the common ones."""
    attributes: dict[str, Any] = {"vela.cache.name": metadata["cache"]}
    keys = metadata.get("keys")
    if keys is not None:
        attributes["vela.keys"] = keys
        if keys >= 2:
            attributes["db.operation.batch.size"] = keys
    for name, attribute in _COPIED.items():
        if metadata.get(name) is not None:
            attributes[attribute] = metadata[name]
    result = metadata.get("result")
    if isinstance(result, str):       # get, fetch
        attributes["vela.result"] = result
    elif result is not None and op == "put":     # add
        attributes["vela.stored"] = result
    elif result is not None and op == "delete":  # True/False, or a count for delete_many
        attributes["vela.removed"] = int(result)
    if "count" in measurements:
        attributes["vela.count"] = measurements["count"]
    return attributes


def _qualified_name(kind: type) -> str:
    """``vela.errors.ValueTooLarge``; a builtin is its bare name (``TypeError``)."""
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def instrument(tracer_provider: Optional[trace.TracerProvider] = None,
               meter_provider: Optional[metrics.MeterProvider] = None,
               prefix: Sequence[str] = ("vela", "cache")) -> Instrumentation:
    """Turn the telemetry events of the caches whose ``telemetry_prefix`` is ``prefix``
    into OpenTelemetry spans and metrics, until ``.uninstrument()``.

    :param tracer_provider: where spans go (None: the global one, as set later too).
    :param meter_provider: where metrics go (None: the global one).
    :param prefix: the ``telemetry_prefix`` of the caches to instrument.
    :raises vela.OptionError: ``prefix`` is not a non-empty tuple of str.
    """
    prefix = telemetry.check_prefix("prefix", prefix)
    tracer = trace.get_tracer(__name__, __version__, tracer_provider)
    meter = metrics.get_meter(__name__, __version__, meter_provider)
    return Instrumentation(tracer, meter, prefix)
