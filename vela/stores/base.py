"""The store interface: what ``vela.Cache`` asks of whatever holds its entries.

``vela.Cache`` checks every argument once, before any store is called (keys are
checked by the store's first encoding of them, before any lock or request), keeps
the options of the handle, emits the telemetry events and runs the stampede
protocol; a store only stores. So every method takes **checked** arguments:

- ``key``: a Python key (str, bytes, int, tuples of them), encoded by the store;
- ``value``: a Python object, serialized by the store (the handle's serializer);
- ``ns``: the time to live in nanoseconds, 0 = never (``vela.options.ttl_ns``);
- ``tags``: a tuple of distinct str, each 1 to 255 bytes of UTF-8, at most
  ``_native.MAX_TAGS`` of them (``vela.options.tags``).

and returns plain results: what the public method returns, before telemetry.
Every store counts its own hits, misses and writes where its counters live (the
host table, or every owner's). Errors are the public ones (``vela.errors``).

The stores: ``local`` (the host's table), ``replicated`` (the same, plus the
bridge's cluster-wide totals), ``partitioned`` (each key on its owner's host),
``redis`` (Redis holds the entries) and ``near`` (L1 copies in the host table in
front of the Redis store: it wraps it; the partitioned store keeps its L1 copies in
its own routing, with the same ``near.NearCache``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Protocol

from .. import _native

__all__ = ["Store", "Lease", "MISSING", "HIT", "MINE", "TIMEOUT", "ALONE", "BUSY", "count_lookups"]

#: The sentinel of "no value" on every store path (distinct from None, a value).
MISSING: Any = object()

# fetch_begin statuses: the C core's (native/vela.h, vela_fetch_status).
HIT, MINE, TIMEOUT, ALONE, BUSY = (_native.FETCH_HIT, _native.FETCH_MINE, _native.FETCH_TIMEOUT,
                                   _native.FETCH_ALONE, _native.FETCH_BUSY)

#: What ``fetch_begin`` hands the caller to ``fetch_complete``/``fetch_abort`` (store-specific).
Lease = Any


class Store(Protocol):
    """A place that holds a cache's entries (see the module's doc for the arguments).

    A store whose calls may wait (on a bridge, on Redis) also has async variants of
    them, ``async def a<name>`` with the same arguments and results (``aget``,
    ``acontains``, ``aput``, ``aput_many``, ``adelete``, ``aget_many``,
    ``ainvalidate_tag``, ``aflush``; ``aclose`` for its event-loop clients): vela.Cache's
    async methods call them, and run the sync method inline where a store has none
    (a call into the host's table takes microseconds). Each must be cancel-safe.
    """

    #: The host's native table (entries, leases, counters; L1 copies for a remote store).
    table: Any
    #: True when a call may wait on the network: ``aget_or_fetch`` runs it in a thread.
    remote: bool

    # ---- reading --------------------------------------------------------------------

    def get(self, key: Any, default: Any = None) -> Any:
        """The value, or ``default``; counts a hit or a miss."""

    def get_many(self, keys: Sequence[Any]) -> dict[Any, Any]:
        """``{key: value}`` of the keys present; counts hits and misses."""

    def contains(self, key: Any) -> bool:
        """True when a live entry has the key (counts nothing)."""

    def ttl(self, key: Any) -> tuple[bool, int]:
        """(found, remaining nanoseconds; negative when it never expires)."""

    # ---- writing --------------------------------------------------------------------

    def put(self, key: Any, value: Any, ns: int, tags: tuple[str, ...]) -> None:
        """Store the entry. :raises ValueTooLarge, CacheFull, TypeError, BridgeUnavailable,
        BackendUnavailable:"""

    def add(self, key: Any, value: Any, ns: int, tags: tuple[str, ...]) -> bool:
        """Store only if no live entry has the key (atomic where the key lives); True when stored."""

    def replace(self, key: Any, value: Any, ns: int, tags: tuple[str, ...]) -> bool:
        """Store only if a live entry has the key (atomic where the key lives); True when stored."""

    def cas(self, key: Any, expected: Any, new: Any, ns: int) -> bool:
        """Store ``new`` only if the live entry's encoded value is ``expected``'s encoding
        (compared where the key lives, in one step with the store); the entry keeps its
        tags. True when stored, counted as a write."""

    def put_many(self, items: Sequence[tuple[Any, Any]], ns: int, tags: tuple[str, ...]) -> None:
        """Store every item; a store whose keys live on one host stores all or none,
        one that spans owners raises ``vela.PartialWrite`` naming what was stored."""

    def delete(self, key: Any) -> bool:
        """Remove the key; True when a live entry was removed."""

    def delete_many(self, keys: Sequence[Any]) -> int:
        """Remove the keys; how many live entries were removed."""

    def touch(self, key: Any, ns: int) -> bool:
        """A new time to live; True when the key exists."""

    def incr(self, key: Any, delta: int, ns: int, initial: int = 0) -> int:
        """Add ``delta`` (a checked int64) atomically; the new value. A missing key starts at
        ``initial`` (a checked int64) and takes ``ns``."""

    # ---- get_or_fetch: the stampede protocol (vela.Cache runs it) -------------------

    #: ``hit(key, missing)``: the value of a live entry this process reads from its own
    #: host's table with no lease or round trip (counted as a hit), else ``missing``;
    #: get_or_fetch tries it before fetch_begin. None for a store whose reads need more.
    hit: Optional[Callable[[Any, Any], Any]]

    def fetch_begin(self, key: Any, protect: bool, budget_ns: int) -> tuple[int, Any, Lease, bool]:
        """(status, value, lease, waited): ``HIT`` with the value (counted as a hit);
        ``MINE``: this caller fetches and holds the lease; ``ALONE``/``TIMEOUT``: it
        fetches without one; ``BUSY`` (budget 0 only): another caller fetches now.
        Without ``protect``, never waits. ``waited``: another's fetch was waited for."""

    def fetch_complete(self, key: Any, lease: Lease, value: Any, ns: int, tags: tuple[str, ...]) -> None:
        """Store the fetched value (counted as a fetch) and release the lease; a value that
        cannot be stored (``CacheFull``) is not an error."""

    def fetch_abort(self, key: Any, lease: Lease) -> None:
        """The fetch raised or was cancelled: release the lease (waiters retry)."""

    # ---- every entry ----------------------------------------------------------------

    def invalidate_tag(self, tag: str) -> int:
        """Remove the entries carrying ``tag``, everywhere the store spans; how many distinct keys."""

    def flush(self) -> int:
        """Remove every entry, everywhere the store spans; how many distinct live keys."""

    def expire(self) -> int:
        """Reclaim expired entries now; how many."""

    def size(self) -> int:
        """Entries stored (every owner's, for a store that spans hosts)."""

    def stats(self, reset: bool) -> dict[str, Any]:
        """The counters (hits, misses, writes, ...) with size, memory_used and capacity
        (vela.Cache adds hit_ratio); ``reset`` zeroes the counters after reading them."""

    def reset_stats(self) -> None:
        """Zero the counters."""

    def info(self) -> dict[str, Any]:
        """The host table's layout and memory figures (and where the entries live)."""

    def check(self) -> list[str]:
        """Problems found ([] when sound)."""

    def sync(self) -> None:
        """Make what was written durable, as far as the store can."""

    # ---- lifetime -------------------------------------------------------------------

    closed: bool

    def close(self) -> None:
        """Release what this process holds; the entries stay."""

    def destroy(self) -> bool:
        """Close and remove the cache's entries and segment; True when something existed."""

    def describe(self) -> str:
        """A few words for ``repr`` (the store and its state)."""



def count_lookups(count, keys, found):
    """Count the hits and misses of a batch read (``count(counter, n)``: a store that
    counts in Python, where the C core does not count for it)."""
    hits = sum(1 for k in keys if k in found)
    if hits:
        count("hits", hits)
    if len(keys) - hits:
        count("misses", len(keys) - hits)
