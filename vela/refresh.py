"""Stale-while-revalidate, early refresh and stale-if-error: the rules of
``get_or_fetch(..., stale_ttl=, early=, stale_if_error=)`` and its refreshes.

A value fetched with one of these options is stored stamped (vela.stamp: its
fresh-until time and how long its fetch took) for ``ttl + max(stale_ttl,
stale_if_error)``. A caller that finds it judges it (:meth:`Plan.judge`):

- fresh: it is returned; with ``early`` (XFetch), the caller may start a refresh;
- stale, less than ``stale_ttl`` past its fresh-until time: it is returned at once
  and a refresh runs in the background;
- older: the caller fetches as for a miss (one fetches, the others wait); if the
  fetch raises less than ``stale_if_error`` past the fresh-until time, the stale
  value is returned instead.

One refresher at a time: a refresh holds the stampede lease (``fetch_begin`` of the
store, taken without waiting) of the key's *refresh key*, a key that never holds a
value, so the lease works as it does for a miss: per host table with dead-holder
take-over, at the refresh key's owner for a partitioned cache, in Redis across hosts. Once it
holds the lease the refresher reads the key again: a refresh that another caller
completed meanwhile is not run twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

from . import _native, options, waits
from .errors import OptionError
from .stamp import Stamped, reading_stamps
from .stores.base import MINE, MISSING

__all__ = ["Plan", "plan", "refresh_key", "NotStored", "FRESH", "REFRESH", "FETCH", "MAX_BACKGROUND"]

log = logging.getLogger("vela.refresh")

# What a caller does with a stamped value it found.
FRESH, REFRESH, FETCH = "fresh", "refresh", "fetch"

#: Background refreshes one process runs at a time; past it, a stale read starts none
#: (the value stays served; a later read starts the refresh).
MAX_BACKGROUND = 32

# XFetch's random draws (tests seed it to make early refresh deterministic).
_random = random.Random()


class NotStored(Exception):
    """Raised by a fetch function to return ``value`` without storing it (memoize's
    ``unless=``): never taken for a failed fetch (no stale value is served for it)."""

    def __init__(self, value: Any) -> None:
        super().__init__("result not stored")
        self.value = value


class Plan:
    """The refresh options of one call, checked, in nanoseconds."""

    __slots__ = ("fresh_ns", "stale_ns", "error_ns", "beta")

    def __init__(self, fresh_ns: int, stale_ns: int, error_ns: int, beta: float) -> None:
        self.fresh_ns, self.stale_ns, self.error_ns, self.beta = fresh_ns, stale_ns, error_ns, beta

    @property
    def store_ns(self) -> int:
        """The entry's real time to live: fresh, then as long as a stale copy may serve."""
        return self.fresh_ns + max(self.stale_ns, self.error_ns)

    def stamp(self, value: Any, fetch_ns: int) -> Stamped:
        """``value`` just fetched (in ``fetch_ns``), fresh for the plan's ttl from now."""
        return Stamped(value, time.time_ns() + self.fresh_ns, fetch_ns)

    def judge(self, found: Stamped, now_ns: int) -> str:
        """FRESH, REFRESH (serve it, refresh in the background) or FETCH (fetch now)."""
        past = now_ns - found.fresh_until
        if past < 0:
            # XFetch (Vattani et al., VLDB 2015): refresh when
            # now - delta * beta * log(random()) >= expiry; 1 - random() is in (0, 1].
            if self.beta and found.fetch_ns * self.beta * -math.log(1.0 - _random.random()) >= -past:
                return REFRESH
            return FRESH
        return REFRESH if past < self.stale_ns else FETCH

    def may_serve_on_error(self, found: Stamped, now_ns: int) -> bool:
        """True when a fetch that raised may return ``found`` instead (stale_if_error)."""
        return now_ns - found.fresh_until < self.error_ns


def plan(ttl_ns: int, stale_ttl: Optional[float], early: Any, stale_if_error: Optional[float]) -> Optional[Plan]:
    """The checked plan of a call, or None when it asks for none of the options.

    :raises vela.OptionError: a bad value, or an option without a finite ttl.
    """
    if stale_ttl is None and early in (None, False) and stale_if_error is None:
        return None
    stale = options.seconds("stale_ttl", stale_ttl, allow_inf=False)
    error = options.seconds("stale_if_error", stale_if_error, allow_inf=False)
    if early is True:
        beta = 1.0
    elif early in (None, False):
        beta = 0.0
    elif isinstance(early, (int, float)) and math.isfinite(early) and early > 0:
        beta = float(early)
    else:
        raise OptionError(f"early must be True (beta 1.0), a positive beta such as 1.0, or None, not {early!r}")
    if ttl_ns == 0:
        raise OptionError("stale_ttl, early and stale_if_error need a finite ttl (give ttl=, or a "
                          "default_ttl to the cache): a value that never expires is never stale")
    return Plan(ttl_ns, int((stale or 0) * 1e9), int((error or 0) * 1e9), beta)


def refresh_key(key: Any) -> tuple[str, bytes]:
    """The key whose stampede lease a refresh of ``key`` holds (it never holds a value).
    Of fixed size, whatever the key's: a digest of its canonical encoding.

    :raises TypeError: ``key`` is not a valid key.
    """
    return ("vela.refresh", hashlib.blake2b(_native.encode_key(key), digest_size=16).digest())


def read(store: Any, key: Any) -> Any:
    """The value under ``key`` as stored (a :class:`Stamped` when stamped), or MISSING.
    Read where the entries are, past a near cache's copies: a copy may not have heard
    yet of the refresh this read looks for."""
    source = getattr(store, "source", None)
    with reading_stamps():
        return store.get(key, MISSING) if source is None else source.read(key)[0]


def begin(store: Any, key: Any, protect: bool, budget_ns: int) -> tuple[int, Any, Any, bool]:
    """``store.fetch_begin``, a stamped value read as its :class:`Stamped`."""
    with reading_stamps():
        began: tuple[int, Any, Any, bool] = store.fetch_begin(key, protect, budget_ns)
    return began


def store_fetched(store: Any, key: Any, lease: Any, value: Any, fetch_ns: int, plan: Plan,
                  tags: tuple[str, ...]) -> None:
    """Store ``value``, fetched in ``fetch_ns``, stamped for ``plan`` (and release ``lease``)."""
    store.fetch_complete(key, lease, plan.stamp(value, fetch_ns), plan.store_ns, tags)


def refreshed(found: Stamped, current: Any) -> bool:
    """True when ``current`` (what the key holds now) was written after the ``found`` stamp."""
    return current is not MISSING and (type(current) is not Stamped or current.fresh_until != found.fresh_until)


def usable(found: Stamped, current: Any, plan: Plan) -> bool:
    """True when a caller about to fetch (``found`` too old) may return ``current``
    instead: another caller wrote it meanwhile, and it is not too old itself."""
    return refreshed(found, current) and (type(current) is not Stamped
                                          or plan.judge(current, time.time_ns()) != FETCH)


def timed(fetch_fn: Callable[[Any], Any], key: Any) -> tuple[Any, int]:
    """(``fetch_fn(key)``, nanoseconds it took)."""
    start = time.perf_counter_ns()
    value = fetch_fn(key)
    return value, time.perf_counter_ns() - start


async def atimed(fetch_fn: Callable[[Any], Any], key: Any) -> tuple[Any, int]:
    """(``fetch_fn(key)``, awaited when it returns an awaitable; nanoseconds it took)."""
    start = time.perf_counter_ns()
    value = fetch_fn(key)
    if inspect.isawaitable(value):
        value = await value
    return value, time.perf_counter_ns() - start


async def off_loop(store: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``: inline on a local store (microseconds), in a worker thread on a
    remote one (a request)."""
    if store.remote:
        return await waits.run(fn, *args)
    return fn(*args)


def release(loop: asyncio.AbstractEventLoop, store: Any, key: Any, lease: Any) -> None:
    """Release a lease without blocking the loop (nor awaiting: also from a cancelled task)."""
    if lease is None:
        return
    if store.remote:
        loop.run_in_executor(waits.pool(), store.fetch_abort, key, lease)
    else:
        store.fetch_abort(key, lease)


# ---- background refreshes of this process -------------------------------------------------

# Refresh keys this process refreshes now (one refresh of a key at a time here, whatever
# the threads or tasks that find it stale); emptied in a forked child.
_running: set[tuple[int, Any]] = set()
_running_lock = threading.Lock()


def _forget_after_fork() -> None:
    global _running_lock
    _running.clear()
    _running_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def claim(store: Any, rkey: Any) -> Optional[tuple[int, Any]]:
    """A claim on the refresh of ``rkey`` in this process, or None when one runs here
    already (or too many run)."""
    claim_id = (id(store), rkey)
    with _running_lock:
        if claim_id in _running or len(_running) >= MAX_BACKGROUND:
            return None
        _running.add(claim_id)
    return claim_id


def unclaim(claim_id: tuple[int, Any]) -> None:
    with _running_lock:
        _running.discard(claim_id)


def refresh_once(store: Any, key: Any, rkey: Any, found: Stamped, fetch_fn: Callable[[Any], Any], plan: Plan,
                 tags: tuple[str, ...]) -> None:
    """The body of a background refresh (sync): take the refresh lease without waiting;
    if won and nobody refreshed meanwhile, fetch and store. A fetch that raises is
    logged; the stale value stays (until its ttl)."""
    status, _, lease, _ = store.fetch_begin(rkey, True, 0)
    if status != MINE:
        return  # another process (or host) refreshes it
    try:
        if refreshed(found, read(store, key)):
            return
        try:
            value, took = timed(fetch_fn, key)
        except NotStored:
            return
        except Exception:  # noqa: BLE001 - nobody waits for it: logged, the stale value stays
            log.warning("vela: background refresh of %r failed; the stale value stays", key, exc_info=True)
            return
        store_fetched(store, key, None, value, took, plan, tags)
    finally:
        store.fetch_abort(rkey, lease)


def start_thread(store: Any, key: Any, found: Stamped, fetch_fn: Callable[[Any], Any], plan: Plan,
                 tags: tuple[str, ...]) -> None:
    """Refresh ``key`` in a daemon thread, unless this process refreshes it already."""
    rkey = refresh_key(key)
    claim_id = claim(store, rkey)
    if claim_id is None:
        return

    def run() -> None:
        try:
            refresh_once(store, key, rkey, found, fetch_fn, plan, tags)
        except Exception:  # noqa: BLE001 - a store error in a thread nobody joins
            log.warning("vela: background refresh of %r failed", key, exc_info=True)
        finally:
            unclaim(claim_id)

    try:
        threading.Thread(target=run, name="vela-refresh", daemon=True).start()
    except BaseException:
        unclaim(claim_id)
        raise


async def arefresh_once(store: Any, key: Any, rkey: Any, found: Stamped, fetch_fn: Callable[[Any], Any],
                        plan: Plan, tags: tuple[str, ...]) -> None:
    """:func:`refresh_once` for asyncio (``fetch_fn`` may be a coroutine function)."""
    status, _, lease, _ = await off_loop(store, store.fetch_begin, rkey, True, 0)
    if status != MINE:
        return
    try:
        if refreshed(found, await off_loop(store, read, store, key)):
            return
        try:
            value, took = await atimed(fetch_fn, key)
        except NotStored:
            return
        except Exception:  # noqa: BLE001 - nobody waits for it: logged, the stale value stays
            log.warning("vela: background refresh of %r failed; the stale value stays", key, exc_info=True)
            return
        await off_loop(store, store_fetched, store, key, None, value, took, plan, tags)
    finally:
        release(asyncio.get_running_loop(), store, rkey, lease)


# The background tasks of this process (the loop keeps only weak references to tasks).
_tasks: set[asyncio.Task[None]] = set()


def start_task(store: Any, key: Any, found: Stamped, fetch_fn: Callable[[Any], Any], plan: Plan,
               tags: tuple[str, ...]) -> None:
    """Refresh ``key`` in a task of the running loop, unless this process refreshes it already."""
    rkey = refresh_key(key)
    claim_id = claim(store, rkey)
    if claim_id is None:
        return

    async def run() -> None:
        try:
            await arefresh_once(store, key, rkey, found, fetch_fn, plan, tags)
        except Exception:  # noqa: BLE001 - a store error in a task nobody awaits
            log.warning("vela: background refresh of %r failed", key, exc_info=True)
        finally:
            unclaim(claim_id)

    try:
        task = asyncio.get_running_loop().create_task(run())
    except BaseException:
        unclaim(claim_id)
        raise
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
