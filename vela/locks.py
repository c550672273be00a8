"""Locks and rate limits shared by every process that opens the cache (and every host,
where the store spans hosts), built on the public API of :class:`vela.Cache` alone:
``add``, ``get``, ``touch``, ``delete`` and ``cas``, each atomic on every store.

A lock is an entry ``("vela.lock", name)`` holding its holder's token: the host
(kernel boot and pid namespace), pid, process start time and a random part. It is
taken with ``add`` (of concurrent callers, exactly one stores) and lives ``ttl``
seconds at most, so a holder that dies on another host frees it when the ttl ends.
A holder that died on this host frees it at once: a waiter sees that the pid no
longer runs the process that took it (start time), and takes it over.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import secrets
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Optional

from . import _native, options
from .errors import LockTimeout, OptionError

if TYPE_CHECKING:
    from .cache import Cache

__all__ = ["Lock", "Throttle"]

# Waiting for a lock: first poll after this many seconds, doubling up to the maximum.
_FIRST_POLL = 0.001
_MAX_POLL = 0.05


def _host_identity() -> str:
    """What makes a pid meaningful: the same kernel boot and the same pid namespace."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""  # no /proc: holders are never judged by their pid
    return f"{boot}/{namespace}"


_HOST = _host_identity()


_holder = (0, "")  # (pid, the first parts of its tokens): the start time is read once per process


def _new_token() -> str:
    global _holder
    pid = os.getpid()
    if _holder[0] != pid:  # first call, or a forked child
        _holder = (pid, f"{_HOST}|{pid}|{_native.proc_start_time(pid)}|")
    return _holder[1] + secrets.token_hex(8)


def _holder_is_dead(token: object) -> bool:
    """True when ``token`` names a process of this host that is gone (its pid ended,
    or now runs another process). A holder on another host is never judged dead here:
    its entry's ttl frees the lock."""
    if not isinstance(token, str):
        return False
    parts = token.split("|")
    if len(parts) != 4 or not _HOST or parts[0] != _HOST:
        return False
    try:
        pid, started = int(parts[1]), int(parts[2])
    except ValueError:
        return False
    return started != 0 and _native.proc_start_time(pid) != started


def _wait_seconds(timeout: Optional[float]) -> Optional[float]:
    """A lock's wait: None (forever), 0 (one try) or positive seconds."""
    if timeout == 0 and not isinstance(timeout, bool):
        return 0.0
    return options.seconds("timeout", timeout, allow_inf=False)


class Lock:
    """A lock named ``name`` in ``cache``: ``with cache.lock("report"): ...`` or
    ``async with``. Not reentrant; one holder per ``Lock`` object at a time.

    :param ttl: seconds the lock lives at most (then it frees itself even if its
        holder is stuck, or died on another host): longer than the critical section,
        or call :meth:`extend` from it.
    :param timeout: seconds to wait for it when entering (None: forever, 0: one try);
        past it, entering raises :class:`vela.LockTimeout`.
    """

    def __init__(self, cache: Cache, name: str, ttl: float = 30.0, timeout: Optional[float] = None) -> None:
        if not isinstance(name, str) or not name:
            raise OptionError(f"lock name must be a non-empty str, not {name!r}")
        self.cache = cache
        self.name = name
        self.key = ("vela.lock", name)
        self.ttl = options.seconds("ttl", ttl, allow_none=False, allow_inf=False)
        self.timeout = _wait_seconds(timeout)
        self._token: Optional[str] = None

    # ---- one attempt -----------------------------------------------------------------

    def _try(self) -> bool:
        if self._token is not None:
            raise RuntimeError(f"lock {self.name!r} is already held by this Lock object (it is not reentrant)")
        token = _new_token()
        if self.cache.add(self.key, token, ttl=self.ttl):
            self._token = token
            return True
        holder = self.cache.get(self.key)
        if _holder_is_dead(holder) and self._take_over(holder):
            return self._try()
        return False

    def _take_over(self, dead: object) -> bool:
        """Remove the entry of a dead holder; True when it was removed here.

        One waiter per dead token wins the right to (``add`` of a reap entry). It then
        extends the entry (``touch``) before checking that it still holds the dead token,
        so the entry cannot expire, and be taken by a live process, between that check
        and the delete: the delete then removes the dead holder's entry and no other.
        """
        if not self.cache.add(("vela.lock.reap", self.name, str(dead)), os.getpid(), ttl=self.ttl):
            return False
        return (self.cache.touch(self.key, self.ttl) and self.cache.get(self.key) == dead
                and self.cache.delete(self.key))

    # ---- acquire and release --------------------------------------------------------------

    def acquire(self, blocking: bool = True, timeout: Optional[float] = None) -> bool:
        """Take the lock; True when taken. ``timeout`` (default: the lock's) bounds the
        wait; ``blocking=False`` tries once. Returns False when it was not taken in time
        (entering the context manager raises :class:`vela.LockTimeout` instead)."""
        pauses = self._pauses(blocking, timeout)
        while not self._try():
            pause = next(pauses, None)
            if pause is None:
                return False
            time.sleep(pause)
        return True

    async def acquire_async(self, blocking: bool = True, timeout: Optional[float] = None) -> bool:
        """:meth:`acquire` for asyncio: the waits are ``asyncio.sleep`` (the loop runs on)."""
        pauses = self._pauses(blocking, timeout)
        while not self._try():
            pause = next(pauses, None)
            if pause is None:
                return False
            await asyncio.sleep(pause)
        return True

    def _pauses(self, blocking: bool, timeout: Optional[float]) -> Iterator[float]:
        """The waits between attempts, growing, jittered (waiters in step would poll in
        step), until the deadline passes."""
        wait = 0.0 if not blocking else (self.timeout if timeout is None else _wait_seconds(timeout))
        deadline = None if wait is None else time.monotonic() + wait
        pause = _FIRST_POLL
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            jittered = pause * (0.5 + random.random())
            yield jittered if deadline is None else min(jittered, deadline - now)
            pause = min(pause * 2, _MAX_POLL)

    def release(self) -> None:
        """Free the lock. :raises RuntimeError: it is not held by this object (also when
        its ttl ran out and another process took it: that holder keeps it)."""
        token, self._token = self._token, None
        if token is None:
            raise RuntimeError(f"lock {self.name!r} is not held by this Lock object")
        # touch before checking: the entry checked is then the one deleted (it cannot
        # expire, and be taken by another process, in between)
        if not (self.cache.touch(self.key, self.ttl) and self.cache.get(self.key) == token):
            raise RuntimeError(f"lock {self.name!r} was lost: its ttl ({self.ttl} s) ran out while held")
        self.cache.delete(self.key)

    def extend(self, ttl: Optional[float] = None) -> None:
        """Give the held lock ``ttl`` (default: its own) more seconds from now.

        :raises RuntimeError: it is not held by this object, or its ttl already ran out.
        """
        if self._token is None:
            raise RuntimeError(f"lock {self.name!r} is not held by this Lock object")
        ttl = self.ttl if ttl is None else options.seconds("ttl", ttl, allow_none=False, allow_inf=False)
        if not (self.cache.touch(self.key, ttl) and self.cache.get(self.key) == self._token):
            self._token = None
            raise RuntimeError(f"lock {self.name!r} was lost: its ttl ran out while held")

    def locked(self) -> bool:
        """True when some process (this one or another) holds the lock."""
        return self.cache.exists(self.key)

    @property
    def held(self) -> bool:
        """True while this object holds the lock (as far as it knows)."""
        return self._token is not None

    # ---- context managers --------------------------------------------------------------

    def _timed_out(self) -> LockTimeout:
        return LockTimeout(f"lock {self.name!r} of cache {self.cache.name!r} not acquired within "
                           f"{self.timeout} s (another process holds it)")

    def __enter__(self) -> Lock:
        if not self.acquire():
            raise self._timed_out()
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.release()

    async def __aenter__(self) -> Lock:
        if not await self.acquire_async():
            raise self._timed_out()
        return self

    async def __aexit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                        tb: Optional[TracebackType]) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<vela.Lock {self.name!r} {'held' if self.held else 'not held'}>"


class Throttle:
    """A token bucket shared by every process (and host, where the store spans hosts):
    it holds ``burst`` tokens (``rate`` when omitted), gains ``rate`` tokens every
    ``per`` seconds, and ``allow(n)`` takes ``n`` of them when it holds that many.

    The bucket is one entry: the time at which it will be full again (the
    "theoretical arrival time" of GCRA, the rule of redis-cell and of ATM networks).
    Each event moves that time ``per / rate`` seconds later; an event that would move
    it more than ``burst * per / rate`` seconds past now does not fit. ``allow`` reads
    the entry and moves it with ``cas`` (``add`` when absent), retrying when another
    caller moved it first, so of concurrent callers exactly as many are admitted as
    there are tokens. The entry expires when the bucket is full again. Times are the
    hosts' wall clocks (keep them in sync across hosts).
    """

    def __init__(self, cache: Cache, name: str, rate: int, per: float = 1.0, burst: Optional[int] = None) -> None:
        if not isinstance(name, str) or not name:
            raise OptionError(f"throttle name must be a non-empty str, not {name!r}")
        burst = rate if burst is None else burst
        for option, value in (("rate", rate), ("burst", burst)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{option} must be an int >= 1, not {value!r}")
        self.cache = cache
        self.name = name
        self.rate = rate
        self.per = options.seconds("per", per, allow_none=False, allow_inf=False)
        self.burst = burst
        self._key = ("vela.throttle", name)
        self._interval_ns = self.per * 1e9 / rate  # one token's worth of time
        self._capacity_ns = burst * self._interval_ns

    def allow(self, n: int = 1) -> bool:
        """Take ``n`` tokens if the bucket holds them; True when it did."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, not {n!r}")
        cost = n * self._interval_ns
        if cost > self._capacity_ns:
            return False  # more than the bucket ever holds
        cache = self.cache
        while True:
            now = time.time_ns()
            current = cache.get(self._key)
            full_at = current if isinstance(current, int) and current > now else now
            moved = round(full_at + cost)
            if moved - now > self._capacity_ns:
                return False
            ttl = (moved - now) / 1e9
            if current is None:
                if cache.add(self._key, moved, ttl=ttl):
                    return True
            elif cache.cas(self._key, current, moved, ttl=ttl):
                return True
            # another caller moved it first: judge again against what it stored

    def used(self) -> int:
        """Tokens missing from the bucket now (0: full, ``burst``: empty)."""
        current = self.cache.get(self._key)
        if not isinstance(current, int):
            return 0
        return min(self.burst, max(0, math.ceil((current - time.time_ns()) / self._interval_ns)))

    def __repr__(self) -> str:
        return f"<vela.Throttle {self.name!r} {self.rate} per {self.per} s, burst {self.burst}>"
