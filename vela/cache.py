"""Cache: the public handle on a cache, whatever store holds its entries.

One class, one implementation of the API: options, argument checks (once, before
any lock or request), telemetry events, stats, the stampede protocol of
``get_or_fetch``, batches and async. What holds the entries is a *store*
(vela.stores: local, replicated, partitioned, redis, and the near cache wrapping
a remote one), chosen from what the segment records, so every handle on a segment
behaves alike whatever options it omitted.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any, Final, NoReturn, Optional, ParamSpec, Tuple, TypeVar, Union, overload

from . import _native, options, refresh, serializers, telemetry, waits
from ._extras import need
from .errors import OptionError
from .locks import Lock, Throttle
from .memoize import Memoized, memoize
from .segments import table as _tables
from .stamp import Stamped
from .stores import open_store
from .stores.base import BUSY, HIT, MISSING

__all__ = ["Cache", "destroy"]

#: A key: str, bytes, int (bool counts as the int it equals) or a tuple of keys.
Key = Union[str, bytes, int, Tuple["Key", ...]]
KeyT = TypeVar("KeyT", bound=Key)
V = TypeVar("V")
P = ParamSpec("P")


class _Adopt(enum.Enum):
    """The default of a layout option: adopt the segment's value (or Vela's default
    when this call creates the segment)."""

    ADOPT = "adopt"

    def __repr__(self) -> str:
        return "ADOPT"


ADOPT: Final = _Adopt.ADOPT

TOPOLOGIES = {"local": _native.TOPOLOGY_LOCAL, "replicated": _native.TOPOLOGY_REPLICATED,
              "partitioned": _native.TOPOLOGY_PARTITIONED}

# Open handles: their get is rebound when telemetry handlers come and go.
_live: "weakref.WeakSet[Cache]" = weakref.WeakSet()


class Cache:
    """A cache shared by every process of the host that opens the same name.

    ``Cache(name, **options)`` attaches to the segment of that name, or creates
    it. Options that shape the segment (capacity, stripes, max_size,
    max_entry_size, eviction_policy, backend, topology) must agree between processes: an
    omitted one adopts the segment's value, a different one raises
    :class:`vela.LayoutMismatch`. Every other option belongs to this handle.

    A layout option left at ``ADOPT`` takes the segment's value, or Vela's default
    when this call creates the segment (capacity 64 MiB, stripes by capacity,
    max_size unbounded, max_entry_size capacity // 64, eviction "lru", topology
    "local").

    :param name: ``[A-Za-z0-9_.-]{1,200}``, not starting with ``.``.
    :param backend: "shm" (the default), "file" (``backend_opts={"data_dir": ...}``) or "redis".
    :param topology: "local", "replicated" or "partitioned" (with a ``vela-bridge`` per host).
    :param topology_opts: e.g. ``{"secret_file": ..., "timeout": 3.0}`` for the cluster topologies.
    :param capacity: bytes of the whole segment (int, or a string like "256MiB").
    :param stripes: lock stripes, a power of two 1..4096.
    :param max_size: at most this many entries (None: unbounded).
    :param max_entry_size: bytes of the largest entry (int or a string like "1MiB").
    :param eviction_policy: "lru", "lfu" or "ttl_only".
    :param default_ttl: seconds an entry lives when put without ``ttl`` (None: forever).
    :param stampede_protection: one caller of the host fetches a missing key, the others wait.
    :param stampede_timeout: seconds a waiter waits for another's fetch.
    :param stats_enabled: count hits, misses, writes... (``stats()``).
    :param telemetry_prefix: the first words of this handle's telemetry events.
    :param sweep_interval: seconds between sweeps of expired entries (None: no sweep).
    :param near_cache: keep copies of remote values in the host's table (redis, partitioned).
    :param near_cache_l1_ttl: seconds a near-cache copy lives at most.
    :param serializer: "pickle", "json", "msgpack" or an object with ``dumps``/``loads``.
    :param lock_timeout: seconds a call waits for a stripe lock before ``LockTimeout``.
    :param local_objects: keep decoded values in this process (True: up to 4096, or how
        many): a read (``get``, ``get_many``, a hit of ``get_or_fetch``) of a key whose
        entry has not changed since returns the same object, without copying or
        unpickling (local and replicated topologies).
    :raises vela.OptionError: an unknown option or a bad value (the message names it).
    :raises vela.LayoutMismatch: a layout option differs from the segment's.
    """

    name: str
    near_cache: bool
    default_ttl: Optional[float]
    stampede_protection: bool
    stampede_timeout: float
    sweep_interval: Optional[float]
    telemetry_prefix: Tuple[str, ...]

    def __init__(self, name: str, *, backend: str = "shm", backend_opts: Optional[Mapping[str, Any]] = None,
                 topology: Union[str, _Adopt] = ADOPT, topology_opts: Optional[Mapping[str, Any]] = None,
                 capacity: Union[int, str, _Adopt] = ADOPT, stripes: Union[int, _Adopt] = ADOPT,
                 max_size: Union[int, None, _Adopt] = ADOPT, max_entry_size: Union[int, str, _Adopt] = ADOPT,
                 eviction_policy: Union[str, _Adopt] = ADOPT, default_ttl: Optional[float] = None,
                 stampede_protection: bool = True, stampede_timeout: float = 5.0, stats_enabled: bool = True,
                 telemetry_prefix: Tuple[str, ...] = ("vela", "cache"), sweep_interval: Optional[float] = 30.0,
                 near_cache: bool = False, near_cache_l1_ttl: float = 60.0, serializer: Any = "pickle",
                 lock_timeout: float = 10.0, local_objects: Union[bool, int] = False,
                 **unknown: NoReturn) -> None:
        self._store: Any = None
        if unknown:
            raise OptionError(f"unknown option{'s' if len(unknown) > 1 else ''}: "
                              f"{', '.join(sorted(unknown))}")
        self.name = options.check_name(name)
        self.default_ttl = options.seconds("default_ttl", default_ttl)
        self.stampede_protection = bool(stampede_protection)
        self.stampede_timeout = options.seconds("stampede_timeout", stampede_timeout, allow_none=False,
                                                allow_inf=False)
        self._budget_ns = int(self.stampede_timeout * 1e9)
        self.sweep_interval = options.seconds("sweep_interval", sweep_interval, allow_inf=False)
        self.telemetry_prefix = telemetry.check_prefix("telemetry_prefix", telemetry_prefix)
        if not isinstance(near_cache, bool):
            raise OptionError(f"near_cache must be True or False, not {near_cache!r}")
        self.near_cache = near_cache
        l1_ttl = options.seconds("near_cache_l1_ttl", near_cache_l1_ttl, allow_none=False, allow_inf=False)
        serializers.resolve(serializer)  # (refused here, before anything is opened)
        lock_timeout = options.seconds("lock_timeout", lock_timeout, allow_none=False, allow_inf=False)
        kept_objects = options.local_objects(local_objects)
        if topology is not ADOPT and (not isinstance(topology, str) or topology not in TOPOLOGIES):
            raise OptionError(f"topology={topology!r}: must be one of local, replicated, partitioned")
        layout = {}
        if capacity is not ADOPT:
            layout["capacity"] = options.capacity(capacity)
        if stripes is not ADOPT:
            layout["stripes"] = options.stripes(stripes)
        if max_size is not ADOPT:
            layout["max_size"] = options.positive_int("max_size", max_size, allow_none=True) or 0
        if max_entry_size is not ADOPT:
            layout["max_entry_size"] = options.parse_size("max_entry_size", max_entry_size)
        if eviction_policy is not ADOPT:
            layout["eviction"] = options.eviction_policy(eviction_policy)
        self._store = open_store(
            self.name, backend=backend, backend_opts=backend_opts,
            topology=None if topology is ADOPT else TOPOLOGIES[topology], topology_opts=topology_opts,
            layout=layout, near_l1_ttl=l1_ttl if near_cache else None, serializer=serializer,
            stats_enabled=bool(stats_enabled), lock_timeout=lock_timeout, sweep_interval=self.sweep_interval,
            stampede_timeout=self.stampede_timeout, local_objects=kept_objects)
        # The host's table, and where it lives (vela.inspect and the tools read them).
        self._table = self._store.table
        self._segment = getattr(self._store, "segment", None)
        _live.add(self)
        self._bind_get(telemetry.active)

    def _bind_get(self, traced):
        """With no telemetry handler attached, ``get`` is the store's own (on a local
        table, the native method itself: no Python frame, no flag check); with one,
        the traced method of the class."""
        if traced:
            self.__dict__.pop("get", None)
        else:
            self.get = self._store.get

    def _traced(self, op: str, meta: dict[str, Any]) -> telemetry.span:
        """The telemetry of one call of ``op``: ``with self._traced(op, meta) as call:``
        emits start, then stop (with what the block adds to ``call.metadata`` and
        ``call.measurements``) or exception. Callers check ``telemetry.active`` first,
        so a handle with no handler pays one flag check."""
        meta["cache"] = self.name
        return telemetry.span(self.telemetry_prefix + (op,), meta)

    # ---- reading ----------------------------------------------------------------

    def get(self, key: Key, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` when absent or expired."""
        if not telemetry.active:
            return self._store.get(key, default)
        with self._traced("get", {"key": key}) as call:
            value = self._store.get(key, MISSING)
            call.metadata["result"] = "miss" if value is MISSING else "hit"
        return default if value is MISSING else value

    def __getitem__(self, key: Key) -> Any:
        value = self.get(key, MISSING)
        if value is MISSING:
            raise KeyError(key)
        return value

    def exists(self, key: Key) -> bool:
        """True when a live entry is stored under ``key`` (not counted as a hit or miss)."""
        return self._store.contains(key)

    __contains__ = exists

    def ttl(self, key: Key) -> Optional[float]:
        """Remaining seconds of ``key``; None when it never expires.

        :raises KeyError: when the key is absent.
        """
        found, remaining = self._store.ttl(key)
        if not found:
            raise KeyError(key)
        return None if remaining < 0 else remaining / 1e9

    # ---- writing ----------------------------------------------------------------

    def put(self, key: Key, value: Any, ttl: Optional[float] = None, tags: Iterable[str] = ()) -> None:
        """Store ``value`` under ``key``.

        :param ttl: seconds to live; None uses ``default_ttl``; ``math.inf`` never expires.
        :param tags: iterable of str; ``invalidate_tag`` removes every entry carrying one.
        :raises TypeError: the key type is unsupported or the serializer rejects the value.
        :raises vela.ValueTooLarge: the entry is bigger than ``max_entry_size``.
        :raises vela.CacheFull: no room and ``eviction_policy="ttl_only"``.
        """
        if _tables.resume_due:
            _tables.resume_if_due()
        ns = options.ttl_ns(ttl, self.default_ttl)
        tags = options.tags(tags)
        if telemetry.active:
            with self._traced("put", {"key": key, "ttl": ttl}):
                self._store.put(key, value, ns, tags)
            return
        self._store.put(key, value, ns, tags)

    def add(self, key: Key, value: Any, ttl: Optional[float] = None, tags: Iterable[str] = ()) -> bool:
        """Store ``value`` under ``key`` only if no live entry has the key; True when stored.

        Atomic where the key lives: of concurrent callers (on any host, for a store
        that spans hosts), exactly one stores. Raises as :meth:`put` does.
        """
        return self._put_if(self._store.add, key, ttl, value, options.ttl_ns(ttl, self.default_ttl),
                            options.tags(tags))

    def replace(self, key: Key, value: Any, ttl: Optional[float] = None, tags: Iterable[str] = ()) -> bool:
        """Store ``value`` under ``key`` only if a live entry has the key; True when stored.

        The check and the store are one step where the key lives (the stripe lock of
        the host table, the owner's bridge, one Redis script). Raises as :meth:`put` does.
        """
        return self._put_if(self._store.replace, key, ttl, value, options.ttl_ns(ttl, self.default_ttl),
                            options.tags(tags))

    def cas(self, key: Key, expected: Any, new: Any, ttl: Optional[float] = None) -> bool:
        """Compare and set: store ``new`` only if the live value of ``key`` equals
        ``expected``; True when stored.

        Values are compared as stored: ``expected`` is encoded as a put would encode it
        (``bytes``/``str``/``int`` as themselves, anything else by the serializer) and
        compared byte for byte with the stored value, so two equal objects whose
        pickles differ (a dict built in another order) do not match. The entry keeps
        its tags and takes ``ttl`` as :meth:`put` does (None: ``default_ttl``).

        Atomic on the host for the shared table (every process), at the key's owner for
        a partitioned cache and in Redis for the Redis store. A replicated cache decides
        on each host: concurrent ``cas`` calls on two hosts may both succeed, and the
        last writer wins when their copies meet (see the README).

        :raises TypeError: the key type is unsupported or the serializer rejects a value.
        :raises vela.ValueTooLarge: the entry is bigger than ``max_entry_size``.
        """
        return self._put_if(self._store.cas, key, ttl, expected, new, options.ttl_ns(ttl, self.default_ttl))

    def _put_if(self, store_call, key, ttl, *args):
        """A conditional store (add, replace, cas) of ``key``: ``store_call(key, *args)``,
        traced as a ``put`` whose ``result`` is whether it stored."""
        if _tables.resume_due:
            _tables.resume_if_due()
        if not telemetry.active:
            return store_call(key, *args)
        with self._traced("put", {"key": key, "ttl": ttl}) as call:
            stored = call.metadata["result"] = store_call(key, *args)
        return stored

    def __setitem__(self, key: Key, value: Any) -> None:
        self.put(key, value)

    def delete(self, key: Key) -> bool:
        """Remove ``key``; True when something was removed."""
        if _tables.resume_due:
            _tables.resume_if_due()
        if telemetry.active:
            with self._traced("delete", {"key": key}) as call:
                removed = call.metadata["result"] = self._store.delete(key)
            return removed
        return self._store.delete(key)

    def __delitem__(self, key: Key) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def touch(self, key: Key, ttl: Optional[float] = None) -> bool:
        """Give ``key`` a new time to live (None: default_ttl); True when it exists."""
        if _tables.resume_due:
            _tables.resume_if_due()
        return self._store.touch(key, options.ttl_ns(ttl, self.default_ttl))

    def incr(self, key: Key, delta: int = 1, ttl: Optional[float] = None, *, initial: int = 0) -> int:
        """Add ``delta`` to the integer under ``key`` atomically (across processes; for a
        store that spans hosts, at the key's owner); the new value.

        A missing key starts at ``initial`` (so the first call returns ``initial + delta``)
        and takes ``ttl``; an existing counter keeps its expiry.

        :raises TypeError: the stored value is not an integer, or delta/initial is not an int.
        :raises OverflowError: delta, initial or the result leaves the signed 64-bit range.
        """
        if _tables.resume_due:
            _tables.resume_if_due()
        _int64("delta", delta)
        _int64("initial", initial)
        return self._store.incr(key, delta, options.ttl_ns(ttl, self.default_ttl), initial)

    def decr(self, key: Key, delta: int = 1, ttl: Optional[float] = None, *, initial: int = 0) -> int:
        """``incr(key, -delta, ttl, initial=initial)``."""
        return self.incr(key, -delta, ttl, initial=initial)

    # ---- get_or_fetch: the stampede protocol ----------------------------------------

    def get_or_fetch(self, key: KeyT, fetch_fn: Callable[[KeyT], V], ttl: Optional[float] = None,
                     tags: Iterable[str] = (), *, stale_ttl: Optional[float] = None,
                     early: Union[float, bool, None] = None, stale_if_error: Optional[float] = None) -> V:
        """The cached value of ``key``, or ``fetch_fn(key)`` stored and returned.

        With stampede protection (the default), one caller runs ``fetch_fn`` for a
        key while every other caller, in any process or thread of the host (of the
        cluster, for a partitioned or Redis store), waits for its value. A fetch
        that raises reaches its caller and one waiter retries; a waiter never waits
        past ``stampede_timeout`` (then it fetches itself); a holder that dies is
        replaced at once. No lock is held while ``fetch_fn`` runs. A value that
        cannot be stored (``ttl_only`` and full) is still returned.

        :param stale_ttl: seconds past ``ttl`` the value is still returned at once while
            one caller of the host (of the cluster, for a partitioned or Redis store)
            refreshes it in a background thread.
        :param early: XFetch beta (``True``: 1.0): before ``ttl`` ends, a caller refreshes
            the value in the background when ``now - fetch_seconds * beta * log(random())``
            passes the fresh-until time (``fetch_seconds``: how long the value's fetch took).
        :param stale_if_error: seconds past ``ttl`` a fetch that raises returns the stale
            value instead of the exception.
        :raises vela.OptionError: a bad refresh option, or one without a finite ttl.
        """
        ns = options.ttl_ns(ttl, self.default_ttl)
        tags = options.tags(tags)
        if stale_ttl is None and early is None and stale_if_error is None:  # (the hot path)
            plan = None
            hit = self._store.hit
            if hit is not None and not telemetry.active:
                value = hit(key, MISSING)  # a hit in this host's table: no lease to take
                if value is not MISSING:
                    return value
        else:
            plan = refresh.plan(ns, stale_ttl, early, stale_if_error)
        if not telemetry.active:
            return self._fetch(key, fetch_fn, ns, tags, plan)[0]
        with self._traced("fetch", {"key": key}) as call:
            value, call.metadata["result"] = self._fetch(key, fetch_fn, ns, tags, plan)
        return value

    def _fetch(self, key, fetch_fn, ns, tags, plan):
        """``get_or_fetch`` after its argument checks: (value, "hit" | "waited" | "fetched"
        | "stale" | "stale_on_error")."""
        store = self._store
        if plan is None:
            status, value, lease, waited = store.fetch_begin(key, self.stampede_protection, self._budget_ns)
        else:
            status, value, lease, waited = self._begin(key, self._budget_ns, plan)
        if status == HIT:
            result = "waited" if waited else "hit"
            if plan is not None and type(value) is Stamped:
                value, result = self._judged(key, value, fetch_fn, plan, tags, result)
        else:
            if _tables.resume_due:
                _tables.resume_if_due()
            try:
                value, took = refresh.timed(fetch_fn, key)
            except BaseException:
                store.fetch_abort(key, lease)
                raise
            self._complete(key, lease, value, took, ns, tags, plan)
            result = "fetched"
        return value, result

    def _begin(self, key, budget_ns, plan):
        """``fetch_begin`` of the key; with a refresh plan, a stamped value comes as its Stamped."""
        if plan is None:
            return self._store.fetch_begin(key, self.stampede_protection, budget_ns)
        return refresh.begin(self._store, key, self.stampede_protection, budget_ns)

    def _complete(self, key, lease, value, took, ns, tags, plan):
        """Store a fetched value (stamped with a refresh plan) and release the lease."""
        if plan is None:
            self._store.fetch_complete(key, lease, value, ns, tags)
        else:
            refresh.store_fetched(self._store, key, lease, value, took, plan, tags)

    def _judged(self, key, found, fetch_fn, plan, tags, result):
        """(value, telemetry result) of a stamped value found by get_or_fetch."""
        now = time.time_ns()
        verdict = plan.judge(found, now)
        if verdict == refresh.FRESH:
            return found.value, result
        if verdict == refresh.REFRESH:
            refresh.start_thread(self._store, key, found, fetch_fn, plan, tags)
            return found.value, "stale" if now >= found.fresh_until else result
        return self._refetch(key, found, fetch_fn, plan, tags)

    def _refetch(self, key, found, fetch_fn, plan, tags):
        """A value too old to serve: fetch it now, one caller at a time (the others wait
        on the refresh lease, then take what it stored); the stale value if the fetch
        raises within ``stale_if_error``."""
        store = self._store
        rkey = refresh.refresh_key(key)
        _, _, lease, _ = store.fetch_begin(rkey, self.stampede_protection, self._budget_ns)
        try:
            current = refresh.read(store, key)
            if refresh.usable(found, current, plan):
                return (current.value if type(current) is Stamped else current), "waited"
            try:
                value, took = refresh.timed(fetch_fn, key)
            except refresh.NotStored:
                raise
            except Exception:
                if plan.may_serve_on_error(found, time.time_ns()):
                    return found.value, "stale_on_error"
                raise
            refresh.store_fetched(store, key, None, value, took, plan, tags)
            return value, "fetched"
        finally:
            store.fetch_abort(rkey, lease)

    @overload
    async def aget_or_fetch(self, key: KeyT, fetch_fn: Callable[[KeyT], Awaitable[V]],
                            ttl: Optional[float] = None, tags: Iterable[str] = (), *,
                            stale_ttl: Optional[float] = None, early: Union[float, bool, None] = None,
                            stale_if_error: Optional[float] = None) -> V: ...

    @overload
    async def aget_or_fetch(self, key: KeyT, fetch_fn: Callable[[KeyT], V], ttl: Optional[float] = None,
                            tags: Iterable[str] = (), *, stale_ttl: Optional[float] = None,
                            early: Union[float, bool, None] = None, stale_if_error: Optional[float] = None) -> V: ...

    async def aget_or_fetch(self, key: Any, fetch_fn: Callable[[Any], Any], ttl: Optional[float] = None,
                            tags: Iterable[str] = (), *, stale_ttl: Optional[float] = None,
                            early: Union[float, bool, None] = None, stale_if_error: Optional[float] = None) -> Any:
        """``get_or_fetch`` for asyncio: ``fetch_fn(key)`` may be a coroutine function.

        Waiting for another caller's fetch, and every call to a remote store, happens
        in a worker thread, so the event loop keeps running. A task cancelled at any
        await releases the lease it held or was about to get. With ``stale_ttl`` or
        ``early``, the background refresh is a task of the running loop.
        """
        ns = options.ttl_ns(ttl, self.default_ttl)
        tags = options.tags(tags)
        plan = refresh.plan(ns, stale_ttl, early, stale_if_error)
        if not telemetry.active:
            return (await self._afetch(key, fetch_fn, ns, tags, plan))[0]
        with self._traced("fetch", {"key": key}) as call:
            value, call.metadata["result"] = await self._afetch(key, fetch_fn, ns, tags, plan)
        return value

    async def _afetch(self, key, fetch_fn, ns, tags, plan):
        """``aget_or_fetch`` after its argument checks: (value, telemetry result)."""
        store = self._store
        loop = asyncio.get_running_loop()
        if store.remote:
            status, value, lease, waited = await self._begin_off_loop(loop, key, plan)
        else:
            status, value, lease, waited = self._begin(key, 0, plan)
            if status == BUSY:  # someone else fetches: wait off the loop
                status, value, lease, waited = await self._begin_off_loop(loop, key, plan)
        if status == HIT:
            result = "waited" if waited else "hit"
            if plan is not None and type(value) is Stamped:
                value, result = await self._ajudged(key, value, fetch_fn, plan, tags, result)
        else:
            try:
                value, took = await refresh.atimed(fetch_fn, key)
            except BaseException:
                self._release(loop, key, lease)
                raise
            if _tables.resume_due:
                _tables.resume_if_due()
            await refresh.off_loop(store, self._complete, key, lease, value, took, ns, tags, plan)
            result = "fetched"
        return value, result

    async def _ajudged(self, key, found, fetch_fn, plan, tags, result):
        """``_judged`` for asyncio: the background refresh is a task."""
        now = time.time_ns()
        verdict = plan.judge(found, now)
        if verdict == refresh.FRESH:
            return found.value, result
        if verdict == refresh.REFRESH:
            refresh.start_task(self._store, key, found, fetch_fn, plan, tags)
            return found.value, "stale" if now >= found.fresh_until else result
        return await self._arefetch(key, found, fetch_fn, plan, tags)

    async def _arefetch(self, key, found, fetch_fn, plan, tags):
        """``_refetch`` for asyncio: waits for the refresh lease off the loop."""
        store = self._store
        loop = asyncio.get_running_loop()
        rkey = refresh.refresh_key(key)
        if store.remote:
            _, _, lease, _ = await self._begin_off_loop(loop, rkey)
        else:
            status, _, lease, _ = store.fetch_begin(rkey, self.stampede_protection, 0)
            if status == BUSY:
                _, _, lease, _ = await self._begin_off_loop(loop, rkey)
        try:
            current = await refresh.off_loop(store, refresh.read, store, key)
            if refresh.usable(found, current, plan):
                return (current.value if type(current) is Stamped else current), "waited"
            try:
                value, took = await refresh.atimed(fetch_fn, key)
            except refresh.NotStored:
                raise
            except Exception:
                if plan.may_serve_on_error(found, time.time_ns()):
                    return found.value, "stale_on_error"
                raise
            await refresh.off_loop(store, refresh.store_fetched, store, key, None, value, took, plan, tags)
            return value, "fetched"
        finally:
            refresh.release(loop, store, rkey, lease)

    async def _begin_off_loop(self, loop, key, plan=None):
        """``fetch_begin`` in a worker thread; a task cancelled meanwhile releases the
        lease the thread then takes (else the next caller waits a whole stampede_timeout)."""
        store = self._store
        lock = threading.Lock()
        outcome: dict[str, Any] = {"abandoned": False, "result": None}

        def begin():
            result = self._begin(key, self._budget_ns, plan)
            with lock:
                if not outcome["abandoned"]:
                    outcome["result"] = result
                    return result
            store.fetch_abort(key, result[2])
            return result

        try:
            return await waits.run(begin)
        except asyncio.CancelledError:
            with lock:
                outcome["abandoned"] = True
                result = outcome["result"]
            if result is not None:
                self._release(loop, key, result[2])
            raise

    def _release(self, loop, key, lease):
        """Release a lease without blocking the loop (a remote store's release is a request)."""
        refresh.release(loop, self._store, key, lease)

    def memoize(self, ttl: Optional[float] = None, tags: Iterable[str] = (),
                key: Optional[Callable[..., Key]] = None, *, prefix: Optional[str] = None,
                version: Union[int, str, None] = None, typed: bool = False,
                ignore: Optional[Collection[str]] = None,
                unless: Optional[Callable[[Any], bool]] = None, stale_ttl: Optional[float] = None,
                early: Union[float, bool, None] = None,
                stale_if_error: Optional[float] = None) -> Callable[[Callable[P, V]], Memoized[P, V]]:
        """Decorator: cache the results of a function or ``async def`` with ``get_or_fetch``
        (one caller computes a missing result, the others wait for it).

        The key hashes the bound arguments (stable across processes and hosts);
        ``fn.key(*args, **kwargs)`` is a call's key, ``fn.invalidate(*args, **kwargs)``
        drops its result. See :func:`vela.memoize.memoize` for every parameter.
        """
        return memoize(self, ttl, tags, key, prefix=prefix, version=version, typed=typed, ignore=ignore,
                       unless=unless, stale_ttl=stale_ttl, early=early, stale_if_error=stale_if_error)

    # ---- batches --------------------------------------------------------------------

    def get_many(self, keys: Iterable[Key]) -> dict[Any, Any]:
        """``{key: value}`` for the keys that are present (absent keys are left out)."""
        keys = list(keys)
        if telemetry.active:
            with self._traced("get", {"keys": len(keys)}) as call:
                found = self._store.get_many(keys)
                call.metadata["hits"] = len(found)
            return found
        return self._store.get_many(keys)

    def put_many(self, mapping: Union[Mapping[Any, Any], Iterable[Tuple[Key, Any]]], ttl: Optional[float] = None,
                 tags: Iterable[str] = ()) -> None:
        """Store every item of ``mapping`` (a dict or (key, value) pairs).

        Every item is checked before the first is stored: a bad key or value stores
        nothing. Where one host holds the keys (local, replicated) a batch that raises
        stores nothing; where it spans owners (partitioned) or Redis, the exception is
        a :class:`vela.PartialWrite` naming the keys stored (``.stored``) and not (``.failed``).
        """
        if _tables.resume_due:
            _tables.resume_if_due()
        items = _items(mapping)
        ns = options.ttl_ns(ttl, self.default_ttl)
        tags = options.tags(tags)
        if telemetry.active:
            with self._traced("put", {"keys": len(items), "ttl": ttl}):
                self._store.put_many(items, ns, tags)
            return
        self._store.put_many(items, ns, tags)

    def delete_many(self, keys: Iterable[Key]) -> int:
        """Remove the keys; returns how many were removed."""
        if _tables.resume_due:
            _tables.resume_if_due()
        keys = list(keys)
        if not telemetry.active:
            return self._store.delete_many(keys)
        with self._traced("delete", {"keys": len(keys)}) as call:
            removed = call.metadata["result"] = self._store.delete_many(keys)
        return removed

    # ---- every entry ------------------------------------------------------------------

    def invalidate_tag(self, tag: str) -> int:
        """Remove every entry carrying ``tag``; returns how many live entries were removed.

        Cluster-wide: on a replicated cache every live member applies it before this
        returns and the count is the keys removed (each host removes the same ones),
        not a sum over hosts; on a partitioned one, the sum over owners.

        :raises ValueError: the tag is not 1 to 255 bytes of UTF-8 (as for ``put``).
        """
        tag = options.tag(tag)
        if _tables.resume_due:
            _tables.resume_if_due()
        if not telemetry.active:
            return self._store.invalidate_tag(tag)
        with self._traced("invalidate_tag", {"tag": tag}) as call:
            count = call.measurements["count"] = self._store.invalidate_tag(tag)
        return count

    def flush(self) -> int:
        """Remove every entry; returns how many distinct live entries were removed."""
        if _tables.resume_due:
            _tables.resume_if_due()
        if not telemetry.active:
            return self._store.flush()
        with self._traced("flush", {}) as call:
            count = call.measurements["count"] = self._store.flush()
        return count

    def expire(self) -> int:
        """Reclaim expired entries now; returns how many."""
        if _tables.resume_due:
            _tables.resume_if_due()
        return self._store.expire()

    # ---- about the cache -----------------------------------------------------------

    def size(self) -> int:
        """Entries stored (an expired entry counts until it is reclaimed)."""
        return self._store.size()

    def __len__(self) -> int:
        return self._store.size()

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Counters summed over every process of the host (every member, for a
        partitioned cache), plus size and memory.

        :param reset: zero the counters after reading them.
        """
        counters = self._store.stats(reset)
        lookups = counters.get("hits", 0) + counters.get("misses", 0)
        counters["hit_ratio"] = counters.get("hits", 0) / lookups if lookups else 0.0
        return counters

    def reset_stats(self) -> None:
        """Zero the counters (``stats(reset=True)`` without the figures)."""
        self._store.reset_stats()

    def info(self) -> dict[str, Any]:
        """The segment's layout (the options agreed between processes) and memory figures."""
        return self._store.info()

    def check(self) -> list[str]:
        """Verify every invariant of the table; [] when sound, else one line per problem."""
        return self._store.check()

    def cluster(self) -> Optional[dict[str, Any]]:
        """The cluster view the host's bridge publishes (members, epoch, ready), or None."""
        raw = self._store.table.cluster()
        return json.loads(raw) if raw else None

    def release_leases(self, pid: int) -> int:
        """Release the stampede leases the host table holds for process ``pid`` (it died);
        returns how many."""
        return self._store.table.release_leases(pid)

    # ---- lifetime -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` (or :meth:`destroy`) was called on this handle."""
        return self._store is None or self._store.closed

    def flush_to_disk(self) -> None:
        """Make every write so far durable (file backend: msync; others: nothing to do)."""
        self._store.sync()

    def close(self) -> None:
        """Release this handle (the cache itself stays for other processes)."""
        if self._store is not None:
            self._store.close()
        _live.discard(self)

    def destroy(self) -> bool:
        """Close this handle and remove the cache (its segment; its entries in Redis);
        True when it existed."""
        _live.discard(self)
        return self._store.destroy()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- asyncio ----------------------------------------------------------------------
    # The same checks, counters and events as the sync methods; only the store call
    # differs: a store's async variant (``a<op>``: Redis through redis.asyncio, a
    # partitioned cache through asyncio streams, a replicated flush waiting on its
    # bridge) when it has one, else its sync method inline (a shared-memory call takes
    # microseconds). Every call is cancel-safe: cancelled at its await, it leaves no
    # half-written entry, connection or lease behind (vela/stores: each async variant
    # says how).

    def _astore(self, op: str) -> Callable[..., Any]:
        store = self._store
        if store.closed:  # (its sync method raises CacheClosed, as the sync call does)
            return _inline(getattr(store, op))
        return getattr(store, "a" + op, None) or _inline(getattr(store, op))

    async def aget(self, key: Key, default: Any = None) -> Any:
        """:meth:`get` for asyncio: the value stored under ``key``, or ``default``."""
        if not telemetry.active:
            value = await self._astore("get")(key, MISSING)
            return default if value is MISSING else value
        with self._traced("get", {"key": key}) as call:
            value = await self._astore("get")(key, MISSING)
            call.metadata["result"] = "miss" if value is MISSING else "hit"
        return default if value is MISSING else value

    async def aexists(self, key: Key) -> bool:
        """:meth:`exists` for asyncio (not counted as a hit or miss)."""
        return await self._astore("contains")(key)

    async def aput(self, key: Key, value: Any, ttl: Optional[float] = None, tags: Iterable[str] = ()) -> None:
        """:meth:`put` for asyncio; takes and raises what :meth:`put` does."""
        if _tables.resume_due:
            _tables.resume_if_due()
        ns = options.ttl_ns(ttl, self.default_ttl)
        tags = options.tags(tags)
        if not telemetry.active:
            await self._astore("put")(key, value, ns, tags)
            return
        with self._traced("put", {"key": key, "ttl": ttl}):
            await self._astore("put")(key, value, ns, tags)

    async def adelete(self, key: Key) -> bool:
        """:meth:`delete` for asyncio: True when something was removed."""
        if _tables.resume_due:
            _tables.resume_if_due()
        if not telemetry.active:
            return await self._astore("delete")(key)
        with self._traced("delete", {"key": key}) as call:
            removed = call.metadata["result"] = await self._astore("delete")(key)
        return removed

    async def aget_many(self, keys: Iterable[Key]) -> dict[Any, Any]:
        """:meth:`get_many` for asyncio: ``{key: value}`` for the keys present."""
        keys = list(keys)
        if not telemetry.active:
            return await self._astore("get_many")(keys)
        with self._traced("get", {"keys": len(keys)}) as call:
            found = await self._astore("get_many")(keys)
            call.metadata["hits"] = len(found)
        return found

    async def aput_many(self, mapping: Union[Mapping[Any, Any], Iterable[Tuple[Key, Any]]],
                        ttl: Optional[float] = None, tags: Iterable[str] = ()) -> None:
        """:meth:`put_many` for asyncio: every item is checked before the first is stored;
        raises what :meth:`put_many` does (``vela.PartialWrite`` where a batch spans owners)."""
        if _tables.resume_due:
            _tables.resume_if_due()
        items = _items(mapping)
        ns = options.ttl_ns(ttl, self.default_ttl)
        tags = options.tags(tags)
        if not telemetry.active:
            await self._astore("put_many")(items, ns, tags)
            return
        with self._traced("put", {"keys": len(items), "ttl": ttl}):
            await self._astore("put_many")(items, ns, tags)

    async def ainvalidate_tag(self, tag: str) -> int:
        """:meth:`invalidate_tag` for asyncio: how many live entries were removed.

        Waiting for the other members (replicated, partitioned) or hosts (a near cache)
        never blocks the event loop. Cancelled while it waits, the removal stands where
        it was made and still reaches the members (as when they do not answer in time).
        """
        tag = options.tag(tag)
        if _tables.resume_due:
            _tables.resume_if_due()
        if not telemetry.active:
            return await self._astore("invalidate_tag")(tag)
        with self._traced("invalidate_tag", {"tag": tag}) as call:
            count = call.measurements["count"] = await self._astore("invalidate_tag")(tag)
        return count

    async def aflush(self) -> int:
        """:meth:`flush` for asyncio: how many distinct live entries were removed (waits
        as :meth:`ainvalidate_tag` does)."""
        if _tables.resume_due:
            _tables.resume_if_due()
        if not telemetry.active:
            return await self._astore("flush")()
        with self._traced("flush", {}) as call:
            count = call.measurements["count"] = await self._astore("flush")()
        return count

    async def __aenter__(self) -> Cache:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Closes the handle (as ``with``; the async stores' connections of this handle go too)."""
        aclose = getattr(self._store, "aclose", None)
        if aclose is not None and not self.closed:
            await aclose()
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self._store.describe()
        return f"<vela.Cache {self.name!r} ({state})>"

    # help(vela.Cache) and inspect.signature(vela.Cache) show the options of __init__;
    # unknown option names are taken only to be refused with a clear OptionError.
    __signature__ = inspect.signature(__init__).replace(
        parameters=[p for p in list(inspect.signature(__init__).parameters.values())[1:]
                    if p.kind is not p.VAR_KEYWORD],
        return_annotation=inspect.Signature.empty)

    # ---- locks and rate limits (vela/locks.py: built on add/get/touch/delete/incr) -----------

    def lock(self, name: str, ttl: float = 30.0, timeout: Optional[float] = None) -> Lock:
        """A lock shared by every process (and host) of this cache: ``with cache.lock("job",
        ttl=60, timeout=5): ...`` or ``async with``; entering raises ``vela.LockTimeout`` after
        ``timeout`` seconds (None: waits on). See :class:`vela.locks.Lock`."""
        return Lock(self, name, ttl, timeout)

    def throttle(self, name: str, rate: int, per: float = 1.0, burst: Optional[int] = None) -> Throttle:
        """A token bucket shared by every process: ``rate`` tokens per ``per`` seconds,
        ``burst`` (default ``rate``) at most; ``cache.throttle("api", 100, per=60).allow()``.
        See :class:`vela.locks.Throttle`."""
        return Throttle(self, name, rate, per, burst)



def _int64(name, value):
    """Refuse an argument that is no int of the signed 64-bit range (naming it)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not -(1 << 63) <= value < (1 << 63):
        raise OverflowError(f"{name} leaves the signed 64-bit range")


def _items(mapping: Any) -> list[Any]:
    """The (key, value) pairs of a put_many: a dict's items, or the pairs given."""
    return list(mapping.items()) if hasattr(mapping, "items") else [tuple(p) for p in mapping]


def _inline(method: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """The sync store call as a coroutine function that runs it at once (a local call)."""
    async def call(*args: Any) -> Any:
        return method(*args)
    return call


def _telemetry_changed(active):
    for cache in list(_live):
        cache._bind_get(active)


telemetry._listeners.append(_telemetry_changed)


def destroy(name: str, backend: str = "shm", backend_opts: Optional[Mapping[str, Any]] = None,
            **_ignored: Any) -> bool:
    """Remove the cache ``name`` from the host; True when it existed.

    Takes the same backend options as :class:`Cache` (a file-backed cache needs its
    ``data_dir``; a Redis one its ``url``: its entries are removed from Redis).
    Handles still open keep working on the removed segment until they close; new
    handles get a fresh one.
    """
    options.check_name(name)
    if backend == "redis":
        need("redis", "backend='redis'")
        from .stores.redis import destroy as destroy_redis

        return destroy_redis(name, backend_opts)
    return _tables.backend_module(backend).destroy(name, backend_opts)
