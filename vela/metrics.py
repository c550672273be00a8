"""The host's cache figures in the Prometheus text format.

The counters live in the shared segment and are already the sums over every
process of the host, so any one process can report them: a gunicorn worker's
``/metrics`` view, a sidecar, or ``prometheus_client``'s multiprocess registry
(register :class:`VelaCollector` next to its ``MultiProcessCollector``; it needs
no multiprocess aggregation). Reading never waits for a lock.

    import vela.metrics
    text = vela.metrics.exposition([cache])           # str, text format 0.0.4

    from prometheus_client import REGISTRY
    REGISTRY.register(vela.metrics.VelaCollector(cache))

Both are built from :func:`families`, so they always agree; the bridge's
endpoint is meant to serve the same text.
"""

import math
import threading

__all__ = ["METRICS", "families", "exposition", "VelaCollector", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name, type, help, where the value comes from: stats() key or a function of (stats, info, stripes))
METRICS = [
    ("up", "gauge", "1 when the cache could be read, 0 when it is absent or unreadable", None),
    ("hits", "counter", "Lookups that found a live entry", "hits"),
    ("misses", "counter", "Lookups that found nothing (absent or expired)", "misses"),
    ("writes", "counter", "Entries stored (put, put_many, incr, fetch results)", "writes"),
    ("deletes", "counter", "Explicit deletes that removed an entry", "deletes"),
    ("evictions", "counter", "Live entries evicted to make room", "evictions"),
    ("expirations", "counter", "Expired entries reclaimed", "expirations"),
    ("invalidations", "counter", "Entries removed by invalidate_tag", "invalidations"),
    ("fetches", "counter", "fetch_fn calls made by get_or_fetch", "fetches"),
    ("stampede_waits", "counter", "get_or_fetch calls that waited for another caller's fetch",
     "stampede_waits"),
    ("stampede_timeouts", "counter", "Waits that reached stampede_timeout and fetched themselves",
     "stampede_timeouts"),
    ("lock_recoveries", "counter", "Stripe locks repaired after their holder died", "lock_recoveries"),
    ("entries", "gauge", "Entries stored", "size"),
    ("memory_used_bytes", "gauge", "Bytes of the segment's heap in use", "memory_used"),
    ("capacity_bytes", "gauge", "Size of the shared segment in bytes", "capacity"),
    ("hit_ratio", "gauge", "hits / (hits + misses) since the counters were last reset", "hit_ratio"),
    ("leases_held", "gauge", "Stampede leases held (fetches in progress)",
     lambda stats, info, stripes: info["leases_held"]),
    ("locks_held", "gauge", "Stripe and heap locks held at the moment of the scrape",
     lambda stats, info, stripes: sum(1 for s in stripes if s[3]) + (1 if info["heap_lock_holder"] else 0)),
    ("poisoned", "gauge", "1 when a failed repair marked the table broken (destroy and recreate it)",
     lambda stats, info, stripes: 1 if info["poisoned"] else 0),
]


def _handle(cache, opened):
    """A Cache for ``cache`` (a Cache, or a name opened once as an observer)."""
    if not isinstance(cache, str):
        return cache.name, cache
    if cache not in opened or opened[cache].closed:
        from .inspect import attach
        opened[cache] = attach(cache)  # never creates a segment that does not exist
    return cache, opened[cache]


def families(caches, namespace="vela_cache", _opened=None):
    """The metric families for ``caches`` (Cache objects or names).

    :returns: list of (name, type, help, [(cache name, value)]); a counter's
        name has no ``_total`` suffix (the renderers add it).
    """
    opened = {} if _opened is None else _opened
    rows = []
    seen = set()
    try:
        for cache in caches:
            label = cache if isinstance(cache, str) else getattr(cache, "name", "?")
            if label in seen:  # one series per cache, even when named twice
                continue
            seen.add(label)
            try:
                name, handle = _handle(cache, opened)
                stats = handle.stats()
                info = handle._table.info()
                stripes = handle._table.stripes_info()
            except Exception:  # absent, closed, poisoned: reported as up 0, never a failed scrape
                rows.append((label, None))
                continue
            rows.append((name, (stats, info, stripes)))
    finally:
        if _opened is None:  # handles opened by name for this call only
            for handle in opened.values():
                handle.close()
    out = []
    for metric, kind, help_text, source in METRICS:
        samples = []
        for name, data in rows:
            if metric == "up":
                samples.append((name, 0 if data is None else 1))
            elif data is not None:
                value = source(*data) if callable(source) else data[0][source]
                samples.append((name, value))
        out.append((f"{namespace}_{metric}", kind, help_text, samples))
    return out


def _escape_label(value):
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text):
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _number(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def exposition(caches, namespace="vela_cache"):
    """The figures of ``caches`` (Cache objects or names) in the Prometheus text
    exposition format, version 0.0.4 (serve it with :data:`CONTENT_TYPE`)."""
    lines = []
    for name, kind, help_text, samples in families(caches, namespace):
        full = f"{name}_total" if kind == "counter" else name
        lines.append(f"# HELP {full} {_escape_help(help_text)}")
        lines.append(f"# TYPE {full} {kind}")
        for cache, value in samples:
            lines.append(f'{full}{{cache="{_escape_label(cache)}"}} {_number(value)}')
    return "\n".join(lines) + "\n"


class VelaCollector:
    """A ``prometheus_client`` collector of the host's figures for some caches.

    :param caches: Cache objects or cache names (a name is opened once, as an
        observer; a cache that does not exist reports ``up 0``, it is not created).
    :param namespace: prefix of every metric name.
    """

    def __init__(self, *caches, namespace="vela_cache"):
        self.caches = list(caches)
        self.namespace = namespace
        self._opened = {}
        self._lock = threading.Lock()

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            fams = families(self.caches, self.namespace, self._opened)
        for name, kind, help_text, samples in fams:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = cls(name, help_text, labels=["cache"])
            for cache, value in samples:
                family.add_metric([cache], value)
            yield family

    def describe(self):
        """The families without samples, so registering does not read the caches."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for metric, kind, help_text, _ in METRICS:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield cls(f"{self.namespace}_{metric}", help_text, labels=["cache"])

    def close(self):
        """Close the handles this collector opened by name."""
        with self._lock:
            for handle in self._opened.values():
                handle.close()
            self._opened.clear()
