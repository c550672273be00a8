"""Cache: the public handle on a shared table."""

from __future__ import annotations

import enum
import inspect
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any, Final, NoReturn, Optional, ParamSpec, Tuple, TypeVar, Union, overload

from . import _native, options, serializers, telemetry
from ._extras import need
from .backends import file, shm
from .bridge.client import BridgeClient
from .errors import CacheFull, OptionError
from .locks import Lock, Throttle
from .memoize import Memoized, memoize

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
_UNSET = ADOPT  # (the name the other topologies import)
_MISSING = object()

# fetch_begin statuses (native/vela.h, vela_fetch_status)
_HIT, _MINE, _TIMEOUT, _ALONE, _BUSY = 0, 1, 2, 3, 4
# A waiter checks at least this often that the lease holder still lives.
_POLL_NS = 20_000_000
# How long a fork waits for a maintenance job in progress to end (seconds).
_FORK_JOIN_TIMEOUT = 2.0
# How long it then waits for the OS threads of the joined ones to end (seconds).
_OS_THREAD_EXIT_WAIT = 0.05
# True after a fork, in the parent, until its next write restarts its maintenance
# (every writing method of Cache checks it first: see _after_fork_in_parent).
_resume_due = False

# Segment backends; backend="redis" is served by RedisCache (see _implementation).
_BACKENDS = {"shm": shm, "file": file}

# Open handles: their background thread restarts in a forked child, and their
# get is rebound when telemetry handlers come and go.
_live = weakref.WeakSet()
# The maintenance threads not joined yet: a fork waits for them to end. (Strong
# references: a thread that left Python can still be running in the OS, which is
# what Python 3.12+ counts when it warns, and only join() waits for that.)
_threads: set[threading.Thread] = set()


def _implementation(args, kwargs):
    """The Cache class that serves these options (an ImportError naming the extra to
    install when a package they need is missing). A handle that omits ``topology``
    gets the one its segment records, so every handle on a segment routes alike."""
    if kwargs.get("topology", ADOPT) is ADOPT and kwargs.get("backend", "shm") in _BACKENDS:
        name = args[0] if args else kwargs.get("name")
        if isinstance(name, str) and options.NAME.match(name):
            recorded = _BACKENDS[kwargs.get("backend", "shm")].peek_topology(name, kwargs.get("backend_opts"))
            if recorded == _native.TOPOLOGY_PARTITIONED:
                kwargs = dict(kwargs, topology="partitioned")
    if kwargs.get("topology") in ("replicated", "partitioned"):
        for module in ("zmq", "msgpack"):
            need(module, f"topology={kwargs['topology']!r}")
    if kwargs.get("backend") == "redis":
        need("redis", "backend='redis'")
        from .redis_cache import RedisCache  # imports redis-py only when used

        return RedisCache
    if kwargs.get("topology") == "partitioned":
        from .partitioned import PartitionedCache

        return PartitionedCache
    return Cache


def _backend_module(backend):
    if isinstance(backend, str) and backend in _BACKENDS:
        return _BACKENDS[backend]
    raise OptionError(f"backend must be one of {', '.join(_BACKENDS)} or redis, not {backend!r}")


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
    :raises vela.OptionError: an unknown option or a bad value (the message names it).
    :raises vela.LayoutMismatch: a layout option differs from the segment's.
    """

    name: str
    default_ttl: Optional[float]
    stampede_protection: bool
    stampede_timeout: float
    sweep_interval: Optional[float]
    telemetry_prefix: Tuple[str, ...]

    def __new__(cls, *args: Any, **kwargs: Any) -> Cache:
        # A cache whose entries live elsewhere (Redis) is served by a subclass with
        # the same API; vela.Cache(...) picks it from the options.
        if cls is Cache:
            cls = _implementation(args, kwargs)
        return super().__new__(cls)

    def __init__(self, name: str, *, backend: str = "shm", backend_opts: Optional[Mapping[str, Any]] = None,
                 topology: Union[str, _Adopt] = ADOPT, topology_opts: Optional[Mapping[str, Any]] = None,
                 capacity: Union[int, str, _Adopt] = ADOPT, stripes: Union[int, _Adopt] = ADOPT,
                 max_size: Union[int, None, _Adopt] = ADOPT, max_entry_size: Union[int, str, _Adopt] = ADOPT,
                 eviction_policy: Union[str, _Adopt] = ADOPT, default_ttl: Optional[float] = None,
                 stampede_protection: bool = True, stampede_timeout: float = 5.0, stats_enabled: bool = True,
                 telemetry_prefix: Tuple[str, ...] = ("vela", "cache"), sweep_interval: Optional[float] = 30.0,
                 near_cache: bool = False, near_cache_l1_ttl: float = 60.0, serializer: Any = "pickle",
                 lock_timeout: float = 10.0, **unknown: NoReturn) -> None:
        if unknown:
            raise OptionError(f"unknown option{'s' if len(unknown) > 1 else ''}: "
                              f"{', '.join(sorted(unknown))}")
        self._table = None
        self.name = options.check_name(name)
        self._backend = _backend_module(backend)
        self._backend_opts = dict(backend_opts or {})
        if topology is _UNSET:
            replicated = -1  # adopt the segment's (local when creating)
            self._bridge = None
        elif topology == "local":
            replicated = 0
            self._bridge = None
        elif topology == "replicated":
            replicated = 1
            self._bridge = BridgeClient(self.name, topology_opts)
        elif topology == "partitioned" and type(self) is not Cache:
            replicated = 2  # PartitionedCache: its requests go to the bridges themselves
            self._bridge = None
        else:
            raise OptionError(f"topology={topology!r}: must be one of local, replicated, partitioned")
        if topology in (_UNSET, "local") and topology_opts not in (None, {}):
            raise OptionError(f"topology_opts: the local topology takes no options, got {topology_opts!r}")
        if near_cache:
            raise OptionError("near_cache=True needs a remote store behind the table: "
                              "backend='redis' or topology='partitioned'")
        options.seconds("near_cache_l1_ttl", near_cache_l1_ttl, allow_none=False, allow_inf=False)
        self._handle_options(default_ttl, stampede_protection, stampede_timeout, sweep_interval,
                             telemetry_prefix)
        dumps, codec, loaders = serializers.resolve(serializer)
        lock_timeout = options.seconds("lock_timeout", lock_timeout, allow_none=False, allow_inf=False)

        layout = dict(
            backend=self._backend.KIND,
            capacity=-1 if capacity is _UNSET else options.capacity(capacity),
            stripes=-1 if stripes is _UNSET else options.stripes(stripes),
            max_size=-1 if max_size is _UNSET else (options.positive_int("max_size", max_size,
                                                                         allow_none=True) or 0),
            max_entry_size=-1 if max_entry_size is _UNSET
            else options.parse_size("max_entry_size", max_entry_size),
            eviction=-1 if eviction_policy is _UNSET else options.eviction_policy(eviction_policy),
            replicated=replicated,
        )
        segment = self._backend.open_segment(self.name, self._backend_opts)

        def make_table(fd, lock_fd, reinit_unready):
            try:
                return _native.Table(fd=fd, lock_fd=lock_fd, reinit_unready=reinit_unready, dumps=dumps,
                                     dumps_codec=codec, loaders=loaders, **layout)
            except BaseException:
                os.close(fd)
                raise

        try:
            self._table = segment.open_table(make_table)
        except BaseException:
            segment.failed()  # nothing half-made stays behind
            raise
        segment.attached(self._table)
        self._segment = segment
        self._table.stats_enabled = bool(stats_enabled)
        self._table.lock_timeout = lock_timeout
        self._stop = None
        self._start_maintenance()
        _live.add(self)
        self._bind_get(telemetry.active)

    def _bind_get(self, traced):
        """With no telemetry handler attached, ``get`` is the native method itself
        (no Python frame, no flag check); with one, the traced method of the class."""
        if traced or type(self) is not Cache:
            self.__dict__.pop("get", None)
        else:
            self.get = self._table.get

    def _handle_options(self, default_ttl, stampede_protection, stampede_timeout, sweep_interval,
                        telemetry_prefix):
        """Validate and keep the options that belong to this handle (every backend)."""
        self.default_ttl = options.seconds("default_ttl", default_ttl)
        self.stampede_protection = bool(stampede_protection)
        self.stampede_timeout = options.seconds("stampede_timeout", stampede_timeout, allow_none=False,
                                                allow_inf=False)
        self._budget_ns = int(self.stampede_timeout * 1e9)
        self.sweep_interval = options.seconds("sweep_interval", sweep_interval, allow_inf=False)
        if (not isinstance(telemetry_prefix, (tuple, list)) or not telemetry_prefix
                or not all(isinstance(p, str) for p in telemetry_prefix)):
            raise OptionError(f"telemetry_prefix must be a non-empty tuple of str, not {telemetry_prefix!r}")
        self.telemetry_prefix = tuple(telemetry_prefix)
        self._events = {op: self.telemetry_prefix + (op, "stop")
                        for op in ("get", "put", "fetch", "delete", "invalidate_tag", "flush")}

    # ---- reading ----------------------------------------------------------------

    def get(self, key: Key, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` when absent or expired."""
        if telemetry.active:
            return self._traced_get(key, default)
        return self._table.get(key, default)

    def _traced_get(self, key, default):
        start = time.perf_counter_ns()
        value = self._table.get(key, _MISSING)
        telemetry.execute(self._events["get"], {"duration": time.perf_counter_ns() - start},
                          {"cache": self.name, "key": key,
                           "result": "miss" if value is _MISSING else "hit"})
        return default if value is _MISSING else value

    def __getitem__(self, key: Key) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def exists(self, key: Key) -> bool:
        """True when a live entry is stored under ``key`` (not counted as a hit or miss)."""
        return self._table.contains(key)

    __contains__ = exists

    def ttl(self, key: Key) -> Optional[float]:
        """Remaining seconds of ``key``; None when it never expires.

        :raises KeyError: when the key is absent.
        """
        found, remaining = self._table.ttl(key)
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
        if _resume_due:
            _resume_maintenance()
        ns = options.ttl_ns(ttl, self.default_ttl)
        if telemetry.active:
            start = time.perf_counter_ns()
            self._table.put(key, value, ns, tags)
            telemetry.execute(self._events["put"], {"duration": time.perf_counter_ns() - start},
                              {"cache": self.name, "key": key, "ttl": ttl})
            return
        self._table.put(key, value, ns, tags)

    def add(self, key: Key, value: Any, ttl: Optional[float] = None, tags: Iterable[str] = ()) -> bool:
        """Store ``value`` under ``key`` only if no live entry has the key; True when stored.

        Atomic across the processes of the host: of concurrent callers, exactly one stores.
        Raises as :meth:`put` does.
        """
        if _resume_due:
            _resume_maintenance()
        ns = options.ttl_ns(ttl, self.default_ttl)
        start = time.perf_counter_ns() if telemetry.active else 0
        stored = self._table.add(key, value, ns, tags)
        if telemetry.active:
            telemetry.execute(self._events["put"], {"duration": time.perf_counter_ns() - start},
                              {"cache": self.name, "key": key, "ttl": ttl, "result": stored})
        return stored

    def __setitem__(self, key: Key, value: Any) -> None:
        self.put(key, value)

    def delete(self, key: Key) -> bool:
        """Remove ``key``; True when something was removed."""
        if _resume_due:
            _resume_maintenance()
        if telemetry.active:
            start = time.perf_counter_ns()
            removed = self._table.delete(key)
            telemetry.execute(self._events["delete"], {"duration": time.perf_counter_ns() - start},
                              {"cache": self.name, "key": key, "result": removed})
            return removed
        return self._table.delete(key)

    def __delitem__(self, key: Key) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def touch(self, key: Key, ttl: Optional[float] = None) -> bool:
        """Give ``key`` a new time to live (None: default_ttl); True when it exists."""
        if _resume_due:
            _resume_maintenance()
        return self._table.touch(key, options.ttl_ns(ttl, self.default_ttl))

    def incr(self, key: Key, delta: int = 1, ttl: Optional[float] = None) -> int:
        """Add ``delta`` to the integer under ``key`` atomically across processes.

        A missing key starts at 0 and takes ``ttl``; an existing counter keeps its expiry.

        :raises TypeError: the stored value is not an integer.
        :raises OverflowError: the result leaves the signed 64-bit range.
        """
        if _resume_due:
            _resume_maintenance()
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise TypeError(f"delta must be an int, not {type(delta).__name__}")
        return self._table.incr(key, delta, options.ttl_ns(ttl, self.default_ttl))

    def decr(self, key: Key, delta: int = 1, ttl: Optional[float] = None) -> int:
        """``incr(key, -delta, ttl)``."""
        return self.incr(key, -delta, ttl)

    def get_or_fetch(self, key: KeyT, fetch_fn: Callable[[KeyT], V], ttl: Optional[float] = None,
                     tags: Iterable[str] = ()) -> V:
        """The cached value of ``key``, or ``fetch_fn(key)`` stored and returned.

        With stampede protection (the default), one caller on the host runs
        ``fetch_fn`` for a key while every other caller, in any process or
        thread, waits for its value. A fetch that raises reaches its caller and
        one waiter retries; a waiter never waits past ``stampede_timeout``
        (then it fetches itself); a holder that dies is replaced at once.
        No lock is held while ``fetch_fn`` runs. A value that cannot be stored
        (``ttl_only`` and full) is still returned.
        """
        ns = options.ttl_ns(ttl, self.default_ttl)
        start = time.perf_counter_ns() if telemetry.active else 0
        value = self._table.get_hit(key, _MISSING)  # lock-free; a hit ends here
        if value is not _MISSING:
            status, token, waited = _HIT, None, False
        elif self.stampede_protection:
            status, value, token, waited = self._table.fetch_begin(key, self._budget_ns, _POLL_NS)
        else:
            self._table.bump("misses")
            status, token, waited = _ALONE, None, False
        if status == _HIT:
            result = "waited" if waited else "hit"
        else:
            value = self._fetch(key, fetch_fn, token, ns, tags)
            result = "fetched"
        if telemetry.active:
            telemetry.execute(self._events["fetch"], {"duration": time.perf_counter_ns() - start},
                              {"cache": self.name, "key": key, "result": result})
        return value

    def _fetch(self, key, fetch_fn, token, ns, tags):
        """Run the fetch, store its value and release the lease (if we hold one)."""
        if _resume_due:
            _resume_maintenance()
        try:
            value = fetch_fn(key)
        except BaseException:
            if token is not None:
                self._table.fetch_abort(token)
            raise
        self._table.bump("fetches")
        try:
            if token is not None:
                self._table.fetch_complete(token, key, value, ns, tags)
            else:
                self._table.put(key, value, ns, tags)
        except CacheFull:
            pass
        return value

    @overload
    async def aget_or_fetch(self, key: KeyT, fetch_fn: Callable[[KeyT], Awaitable[V]],
                            ttl: Optional[float] = None, tags: Iterable[str] = ()) -> V: ...

    @overload
    async def aget_or_fetch(self, key: KeyT, fetch_fn: Callable[[KeyT], V], ttl: Optional[float] = None,
                            tags: Iterable[str] = ()) -> V: ...

    async def aget_or_fetch(self, key: Any, fetch_fn: Callable[[Any], Any], ttl: Optional[float] = None,
                            tags: Iterable[str] = ()) -> Any:
        """``get_or_fetch`` for asyncio: ``fetch_fn(key)`` may be a coroutine function.

        Waiting for another process's fetch happens in a worker thread, so the
        event loop keeps running.
        """
        import asyncio
        import inspect

        ns = options.ttl_ns(ttl, self.default_ttl)
        if self.stampede_protection:
            status, value, token, _ = self._table.fetch_begin(key, 0, _POLL_NS)
            if status == _BUSY:  # someone else fetches: wait off the loop
                status, value, token, _ = await self._await_lease(key)
        else:
            value = self._table.get(key, _MISSING)
            status, token = (_HIT if value is not _MISSING else _ALONE), None
        if status == _HIT:
            return value
        try:
            value = fetch_fn(key)
            if inspect.isawaitable(value):
                value = await value
        except BaseException:
            if token is not None:
                self._table.fetch_abort(token)
            raise
        return self._fetch(key, lambda _key: value, token, ns, tags)

    async def _await_lease(self, key):
        """``fetch_begin`` in a worker thread; a task cancelled meanwhile releases the
        lease the thread then takes (else the next caller waits a whole stampede_timeout)."""
        import asyncio

        lock = threading.Lock()
        outcome = {"abandoned": False, "result": None}

        def wait():
            result = self._table.fetch_begin(key, self._budget_ns, _POLL_NS)
            with lock:
                if not outcome["abandoned"]:
                    outcome["result"] = result
                    return result
            if result[2] is not None:
                self._table.fetch_abort(result[2])
            return result

        try:
            return await asyncio.get_running_loop().run_in_executor(None, wait)
        except asyncio.CancelledError:
            with lock:
                outcome["abandoned"] = True
                result = outcome["result"]
            if result is not None and result[2] is not None:
                self._table.fetch_abort(result[2])
            raise

    def memoize(self, ttl: Optional[float] = None, tags: Iterable[str] = (),
                key: Optional[Callable[..., Key]] = None, *, prefix: Optional[str] = None,
                version: Union[int, str, None] = None, typed: bool = False,
                ignore: Optional[Collection[str]] = None,
                unless: Optional[Callable[[Any], bool]] = None) -> Callable[[Callable[P, V]], Memoized[P, V]]:
        """Decorator: cache the results of a function or ``async def`` with ``get_or_fetch``
        (one caller computes a missing result, the others wait for it).

        The key hashes the bound arguments (stable across processes and hosts);
        ``fn.key(*args, **kwargs)`` is a call's key, ``fn.invalidate(*args, **kwargs)``
        drops its result. See :func:`vela.memoize.memoize` for every parameter.
        """
        return memoize(self, ttl, tags, key, prefix=prefix, version=version, typed=typed, ignore=ignore,
                       unless=unless)

    # ---- batches: one native call each ------------------------------------------------

    def get_many(self, keys: Iterable[Key]) -> dict[Any, Any]:
        """``{key: value}`` for the keys that are present (absent keys are left out)."""
        keys = list(keys)
        if telemetry.active:
            start = time.perf_counter_ns()
            found = self._table.get_many(keys)
            telemetry.execute(self._events["get"], {"duration": time.perf_counter_ns() - start},
                              {"cache": self.name, "keys": len(keys), "hits": len(found)})
            return found
        return self._table.get_many(keys)

    def put_many(self, mapping: Union[Mapping[Any, Any], Iterable[Tuple[Key, Any]]], ttl: Optional[float] = None,
                 tags: Iterable[str] = ()) -> None:
        """Store every item of ``mapping`` (a dict or (key, value) pairs).

        Every item is checked before the first is stored: a bad key or value stores nothing.
        """
        if _resume_due:
            _resume_maintenance()
        items = list(mapping.items()) if hasattr(mapping, "items") else [tuple(p) for p in mapping]
        ns = options.ttl_ns(ttl, self.default_ttl)
        start = time.perf_counter_ns() if telemetry.active else 0
        self._table.put_many(items, ns, tags)
        if telemetry.active:
            telemetry.execute(self._events["put"], {"duration": time.perf_counter_ns() - start},
                              {"cache": self.name, "keys": len(items), "ttl": ttl})

    def delete_many(self, keys: Iterable[Key]) -> int:
        """Remove the keys; returns how many were removed."""
        if _resume_due:
            _resume_maintenance()
        keys = list(keys)
        start = time.perf_counter_ns() if telemetry.active else 0
        removed = self._table.delete_many(keys)
        if telemetry.active:
            telemetry.execute(self._events["delete"], {"duration": time.perf_counter_ns() - start},
                              {"cache": self.name, "keys": len(keys), "result": removed})
        return removed

    def cluster(self) -> Optional[dict[str, Any]]:
        """The cluster view the host's bridge publishes (members, epoch, ready), or None."""
        import json

        raw = self._table.cluster()
        return json.loads(raw) if raw else None

    def release_leases(self, pid: int) -> int:
        """Release the stampede leases held by process ``pid`` (it died); returns how many."""
        return self._table.release_leases(pid)

    def invalidate_tag(self, tag: str) -> int:
        """Remove every entry carrying ``tag``; returns how many live entries were removed.

        On a replicated cache the host's bridge asks every live member to apply the
        invalidation before this returns; the count is the keys removed (each host
        removes the same ones), not a sum over hosts.

        :raises ValueError: the tag is not 1 to 255 bytes of UTF-8 (as for ``put``).
        """
        options.tag(tag)
        if _resume_due:
            _resume_maintenance()
        start = time.perf_counter_ns() if telemetry.active else 0
        count = self._invalidate_tag_counted(tag)
        if telemetry.active:
            telemetry.execute(self._events["invalidate_tag"],
                              {"duration": time.perf_counter_ns() - start, "count": count},
                              {"cache": self.name, "tag": tag})
        return count

    def flush(self) -> int:
        """Remove every entry; returns how many distinct live entries were removed."""
        if _resume_due:
            _resume_maintenance()
        start = time.perf_counter_ns() if telemetry.active else 0
        count = self._flush_counted()
        if telemetry.active:
            telemetry.execute(self._events["flush"],
                              {"duration": time.perf_counter_ns() - start, "count": count},
                              {"cache": self.name})
        return count

    # What invalidate_tag and flush remove, and count (a topology counts its way).

    def _invalidate_tag_counted(self, tag):
        if self._bridge is None:
            return self._table.invalidate_tag(tag)
        # Every live member applies it before we return; each removes the same keys,
        # so the count is this host's (a sum over replicas would count a key per host).
        count, version, tag_id = self._table.invalidate_tag_versioned(tag)
        self._bridge.total({"op": "tag", "tag": tag_id, "version": version})
        return count

    def _flush_counted(self):
        if self._bridge is None:
            return self._table.flush()
        count, version = self._table.flush_versioned()
        self._bridge.total({"op": "flush", "version": version})
        return count

    def expire(self) -> int:
        """Reclaim expired entries now; returns how many."""
        if _resume_due:
            _resume_maintenance()
        return self._table.expire()

    # ---- about the cache -----------------------------------------------------------

    def size(self) -> int:
        """Entries stored (an expired entry counts until it is reclaimed)."""
        return self._table.size()

    def __len__(self) -> int:
        return self._table.size()

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Counters summed over every process of the host, plus size and memory.

        :param reset: zero the counters after reading them.
        """
        counters = self._table.stats(reset)
        info = self._table.info()
        lookups = counters["hits"] + counters["misses"]
        counters.update(size=info["entries"], memory_used=info["memory_used"],
                        capacity=info["capacity"],
                        hit_ratio=counters["hits"] / lookups if lookups else 0.0)
        return counters

    def reset_stats(self) -> None:
        """Zero the counters of every process of the host (``stats(reset=True)`` without the figures)."""
        self._table.stats(True)

    def info(self) -> dict[str, Any]:
        """The segment's layout (the options agreed between processes) and memory figures."""
        return self._table.info()

    def check(self) -> list[str]:
        """Verify every invariant of the table; [] when sound, else one line per problem."""
        return self._table.check()

    # ---- lifetime -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` (or :meth:`destroy`) was called on this handle."""
        return self._table is None or self._table.closed

    def flush_to_disk(self) -> None:
        """Make every write so far durable (file backend: msync; others: nothing to do)."""
        self._segment.sync(self._table)

    def close(self) -> None:
        """Release this handle (the cache itself stays for other processes)."""
        if self._stop is not None:
            self._stop.set()
        if self._table is not None and not self._table.closed:
            try:
                self._segment.closing(self._table)
            finally:
                self._table.close()
        _live.discard(self)

    def destroy(self) -> bool:
        """Close this handle and remove the cache's segment; True when it existed."""
        self.close()
        return self._backend.destroy(self.name, self._backend_opts)

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_stop", None) is not None:
            self._stop.set()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.size()} entries"
        return f"<vela.Cache {self.name!r} ({state})>"

    # help(vela.Cache) and inspect.signature(vela.Cache) show the options of __init__
    # (__new__, which only picks the implementation, would show as (*args, **kwargs)).
    # Unknown option names are taken only to be refused with a clear OptionError.
    __signature__ = inspect.signature(__init__).replace(
        parameters=[p for p in list(inspect.signature(__init__).parameters.values())[1:]
                    if p.kind is not p.VAR_KEYWORD],
        return_annotation=inspect.Signature.empty)

    # ---- background work -----------------------------------------------------------

    def _start_maintenance(self):
        """One thread per handle runs the periodic jobs: the sweep (only in the host's
        elected sweeper) and the backend's own (the file backend's msync)."""
        if self._stop is not None and not self._stop.is_set():
            return  # running
        jobs = list(self._segment.periodic())
        if self.sweep_interval is not None:
            stale_ns = int(self.sweep_interval * 3e9)

            def sweep(table):
                if table.sweeper_elect(stale_ns):
                    table.expire()

            jobs.append((self.sweep_interval, sweep))
        if not jobs:
            return
        stop = self._stop = threading.Event()
        thread = threading.Thread(target=_maintenance_loop, args=(weakref.ref(self), stop, jobs),
                                  name=f"vela-maintenance-{self.name}", daemon=True)
        _join_ended_threads(0.0)
        _threads.add(thread)
        thread.start()

    # ---- locks and rate limits (vela/locks.py: built on add/get/touch/delete/incr) -----------

    def lock(self, name: str, ttl: float = 30.0, timeout: Optional[float] = None) -> Lock:
        """A lock shared by every process (and host) of this cache: ``with cache.lock("job",
        ttl=60, timeout=5): ...`` or ``async with``; entering raises ``vela.LockTimeout`` after
        ``timeout`` seconds (None: waits on). See :class:`vela.locks.Lock`."""
        return Lock(self, name, ttl, timeout)

    def throttle(self, name: str, rate: int, per: float = 1.0) -> Throttle:
        """At most ``rate`` events in any ``per`` seconds, counted by every process:
        ``cache.throttle("api", 100, per=60).allow()``. See :class:`vela.locks.Throttle`."""
        return Throttle(self, name, rate, per)


def _maintenance_loop(ref, stop, jobs):
    due = [time.monotonic() + interval for interval, _ in jobs]
    while not stop.wait(max(0.0, min(due) - time.monotonic())):
        cache = ref()
        if cache is None or cache.closed:
            return
        try:
            now = time.monotonic()
            for i, (interval, job) in enumerate(jobs):
                if now >= due[i]:
                    job(cache._table)
                    due[i] = time.monotonic() + interval
        except Exception:  # a closed or broken handle: the jobs end, calls report it
            return
        finally:
            del cache


def _telemetry_changed(active):
    for cache in list(_live):
        cache._bind_get(active)


telemetry._listeners.append(_telemetry_changed)


def _before_fork():
    """Stop the maintenance threads before a fork (they start again after it): a
    process that forks with threads running risks its child, and Python 3.12+ warns
    about it. A job in progress (a sweep) is waited for, a couple of seconds at most;
    so are the threads of handles closed just before, which are on their way out."""
    running = _os_thread_count()
    for cache in list(_live):
        if cache._stop is not None:
            cache._stop.set()
    joined = _join_ended_threads(_FORK_JOIN_TIMEOUT)
    if running is not None and joined:
        # join() returns once a thread has left Python; its OS thread ends a moment
        # later, and that is what Python 3.12+ counts when it warns: wait for it too.
        deadline = time.monotonic() + _OS_THREAD_EXIT_WAIT
        while (_os_thread_count() or 0) > running - joined and time.monotonic() < deadline:
            time.sleep(0.0002)


def _os_thread_count():
    """The threads of this process as the OS counts them (None where /proc is not)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def _join_ended_threads(timeout):
    """Join the maintenance threads that end within ``timeout`` seconds (0: those
    already told to stop and gone from Python), and forget them; how many."""
    deadline = time.monotonic() + timeout
    joined = 0
    for thread in list(_threads):
        if thread is threading.current_thread() or (not timeout and thread.is_alive()):
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if not thread.is_alive():
            _threads.discard(thread)
            joined += 1
    return joined


def _after_fork_in_parent():
    # The parent's threads start again at its next write, not here: Python 3.13+
    # counts the threads after these hooks run, and would warn about one started now.
    # (A process that forks workers and writes no more needs no sweeps of its own.)
    global _resume_due
    _resume_due = True


def _resume_maintenance():
    global _resume_due
    _resume_due = False
    for cache in list(_live):
        if not cache.closed:
            cache._start_maintenance()


def _after_fork_in_child():
    global _resume_due
    _resume_due = False
    for cache in list(_live):
        if not cache.closed:
            cache._segment.after_fork()
            cache._start_maintenance()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def open_table(name: str, backend: str = "shm", backend_opts: Optional[Mapping[str, Any]] = None) -> Cache:
    """Internal (the bridge's): a handle on the segment's table as it is, whatever
    topology the segment records (never the store a worker would get)."""
    handle = object.__new__(Cache)
    Cache.__init__(handle, name, backend=backend, backend_opts=backend_opts, sweep_interval=None)
    return handle


def segment_topology(name: str, backend: str = "shm", backend_opts: Optional[Mapping[str, Any]] = None):
    """The topology (a _native.TOPOLOGY_* value) a ready segment records, or None."""
    return _backend_module(backend).peek_topology(name, backend_opts)


def destroy(name: str, backend: str = "shm", backend_opts: Optional[Mapping[str, Any]] = None,
            **_ignored: Any) -> bool:
    """Remove the cache ``name`` from the host; True when it existed.

    Takes the same backend options as :class:`Cache` (a file-backed cache needs its
    ``data_dir``). Handles still open keep working on the removed segment until
    they close; new handles get a fresh one.
    """
    options.check_name(name)
    if backend == "redis":
        from .redis_cache import destroy as destroy_redis

        return destroy_redis(name, backend_opts)
    return _backend_module(backend).destroy(name, backend_opts)
