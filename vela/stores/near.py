"""Near cache: the host's shared table as L1 in front of a remote store (L2).

Read flow (every worker of the host shares L1)::

    L1 hit  -> return
    L1 miss -> token = reserve(key) -> L2 read -> fill(key, value, token)

``fill`` stores only when no invalidation hit the key's stripe since the
reservation, so a read of L2 that raced a write elsewhere cannot leave the old
value in L1 (the invalidation of that write voids the token).

Coherence: every writer publishes an invalidation message after its write to L2
(in the same atomic step as the write). One listener per host, elected through a
lock beside the segment, applies those messages to L1 for all workers at once.
While no healthy listener exists (it lost L2, died, or stalls), L1 copies are
capped to a short age (``degraded_ttl``); the listener drops all of L1 whenever it
(re)subscribes, since it may have missed messages. Every L1 copy has a maximum age
(``l1_ttl``) even when its entry never expires.

:class:`NearStore` is the store vela.Cache sits on with ``near_cache=True`` on
Redis: it wraps the store that holds the entries (the L2), reads L1 first and
drops this host's copies after every write it makes through it. The partitioned
store keeps its L1 copies in its own routing (a partition this host owns is read
in place, another one's copies are L1), with the same :class:`NearCache`.

A copy carries the tags of its entry, so a tag's copies can be dropped without
knowing their keys. Invalidation messages are numbered per origin (:class:`Numbering`):
a receiver that finds one missing drops every copy the origin could have
invalidated. invalidate_tag and flush wait until every host has dropped its copies
(vela.stores.redis_listener, vela.stores.partitioned say how).

The L2 is an interface (:class:`L2`), so the same code sits in front of Redis now
and of the partitioned topology later; the message format (:func:`encode_keys`,
:data:`FLUSH_ALL`) is the one any L2 publishes.
"""

import errno
import fcntl
import logging
import os

import posix_ipc

from .. import _native
from ..errors import CacheFull, ValueTooLarge
from ..stamp import as_read, reading_stamps
from .base import HIT, MISSING, count_lookups

__all__ = ["L2", "NearCache", "NearStore", "HostElection", "Numbering", "encode_keys", "decode_message", "split_number",
           "copy_tag", "FLUSH_ALL", "MISSING"]

log = logging.getLogger("vela.near")

# Invalidation messages: b"*" drops all of L1; b"m" + (4-byte big-endian length +
# canonical key encoding)* drops those keys. Anything else is malformed, and a
# malformed message drops all of L1 (we cannot know what it meant to invalidate).
# A message may be numbered by its origin: b"#" + decimal number + b":" + message.
FLUSH_ALL = b"*"
_KEYS = b"m"[0]

# The listener's heartbeat lives in L1 under this key; its presence means "a
# listener is subscribed and healthy". Bytes no application uses in practice.
MARKER = b"\x00vela:near:listener\x00"


def copy_tag(tag_id):
    """The tag an L1 copy carries for the tag id ``tag_id`` of its entry (a store that
    keeps tag ids, not names: the partitioned topology). A tag of its own, so that
    dropping the copies of a tag never touches the entries a host owns."""
    return f"\x00near:{tag_id:x}"


class L2:
    """What the near cache needs from the store behind it.

    ``read(key) -> (value, remaining_ns, tags)``: the stored value (``MISSING`` when
    absent), its remaining lifetime in nanoseconds (0: never expires) and the tags
    its copy carries (str), so that a tag invalidation drops the copy too.
    ``read_many(keys) -> [(value, remaining_ns, tags), ...]`` in the order of ``keys``.
    Both raise :class:`vela.BackendUnavailable` when the store cannot be reached.
    """

    def read(self, key):
        raise NotImplementedError

    def read_many(self, keys):
        return [self.read(k) for k in keys]


def encode_keys(encoded_keys):
    """The invalidation message for these canonical key encodings."""
    parts = [b"m"]
    for enc in encoded_keys:
        parts.append(len(enc).to_bytes(4, "big"))
        parts.append(enc)
    return b"".join(parts)


def decode_message(data):
    """``None`` for "drop everything", else the list of keys the message names.

    :raises ValueError: the message is malformed.
    """
    if data == FLUSH_ALL:
        return None
    if not data or data[0] != _KEYS:
        raise ValueError("unknown invalidation message")
    keys, pos, end = [], 1, len(data)
    while pos < end:
        if pos + 4 > end:
            raise ValueError("truncated invalidation message")
        n = int.from_bytes(data[pos:pos + 4], "big")
        pos += 4
        if n == 0 or pos + n > end:
            raise ValueError("truncated invalidation message")
        keys.append(_native.decode_key(bytes(data[pos:pos + n])))
        pos += n
    return keys


def split_number(data):
    """(number, message) of a numbered message; (None, data) for one without a number."""
    if data[:1] == b"#":
        head, sep, rest = data[1:].partition(b":")
        if sep and head.isdigit() and len(head) <= 19:
            return int(head), rest
    return None, data


class Numbering:
    """The numbers of the invalidation messages each origin sent, as a receiver saw them.

    An origin numbers its messages 1, 2, ... per incarnation (a process that restarts
    is a new incarnation) and says now and then which number it sent last. A number
    skipped, a last number above the highest received, or an incarnation without
    numbers here (a first contact, a restart) means messages may have been lost: the
    receiver must then drop every L1 copy that origin could have invalidated, since
    what the lost ones named is unknown (Hazelcast's near cache repairs the same way).
    """

    def __init__(self):
        self.seen = {}   # origin -> (incarnation, highest number received or known sent)
        self.gaps = 0    # losses found in a known incarnation

    def start(self, origin, incarnation, last):
        """Everything up to ``last`` is accounted for (L1 was dropped meanwhile)."""
        self.seen[origin] = (incarnation, last)

    def received(self, origin, incarnation, number):
        """Message ``number`` arrived; True when some before it were lost."""
        return self._note(origin, incarnation, number, number - 1)

    def announced(self, origin, incarnation, last):
        """The origin sent up to ``last``, and all of it has arrived that is going to
        (the saying came after it, in order): True when some of those were lost."""
        return self._note(origin, incarnation, last, last)

    def counted(self, origin, incarnation, last):
        """The origin's count is ``last`` now (what is in flight may be above it): True
        when numbers above it were seen before, which were not of this numbering (a
        store that restarted empty, a forged message); the count goes on from ``last``."""
        known = self.seen.get(origin)
        if known is None or known[0] != incarnation or known[1] <= last:
            return False
        self.seen[origin] = (incarnation, last)
        self.gaps += 1
        return True

    def _note(self, origin, incarnation, number, due):
        known = self.seen.get(origin)
        if known is None or known[0] != incarnation:
            self.seen[origin] = (incarnation, number)
            return True
        lost = known[1] < due
        if lost:
            self.gaps += 1
        self.seen[origin] = (incarnation, max(known[1], number))
        return lost

    def highest(self, origin):
        known = self.seen.get(origin)
        return known[1] if known else 0


class NearCache:
    """L1 logic over a table handle (stats off: counting is the caller's business).

    :param table: the host table (vela._native.Table) holding L1 copies.
    :param l1_ttl: maximum age of an L1 copy, seconds (near_cache_l1_ttl).
    :param degraded_ttl: maximum age of a copy filled while no healthy listener exists.
    :param marker_ttl: how long a listener's heartbeat counts as alive, seconds.
    """

    def __init__(self, table, l1_ttl, degraded_ttl, marker_ttl):
        self.l1 = table
        self.l1_ttl_ns = int(l1_ttl * 1e9)
        self.degraded_ttl_ns = max(1, int(min(degraded_ttl, l1_ttl) * 1e9))
        self.marker_ttl_ns = int(marker_ttl * 1e9)
        self.applied = 0        # invalidation messages applied by this process
        self.malformed = 0      # malformed messages (each dropped all of L1)
        self.dropped_all = 0    # times this process dropped all of L1

    # ---- reads ------------------------------------------------------------------

    def load(self, key, l2):
        """L1 miss: read ``key`` from ``l2`` and keep a copy; returns the value or MISSING."""
        token = self.l1.reserve(key)
        with reading_stamps():  # (the copy keeps a stamped value's stamp)
            value, remaining_ns, tags = l2.read(key)
        if value is not MISSING:
            self.fill(token, key, value, remaining_ns, tags)
        return as_read(value)

    def load_many(self, keys, l2):
        """Like :meth:`load` for several keys, one L2 round trip; ``{key: value}`` of those found."""
        tokens = [self.l1.reserve(k) for k in keys]
        found = {}
        with reading_stamps():
            read = l2.read_many(keys)
        for key, token, (value, remaining_ns, tags) in zip(keys, tokens, read):
            if value is not MISSING:
                self.fill(token, key, value, remaining_ns, tags)
                found[key] = as_read(value)
        return found

    async def aload(self, key, l2):
        """:meth:`load` for asyncio (``l2.aread``). Cancelled, it keeps no copy."""
        token = self.l1.reserve(key)
        with reading_stamps():  # (this task only: the copy keeps a stamped value's stamp)
            value, remaining_ns, tags = await l2.aread(key)
        if value is not MISSING:
            self.fill(token, key, value, remaining_ns, tags)
        return as_read(value)

    async def aload_many(self, keys, l2):
        """:meth:`load_many` for asyncio (``l2.aread_many``)."""
        tokens = [self.l1.reserve(k) for k in keys]
        found = {}
        with reading_stamps():
            read = await l2.aread_many(keys)
        for key, token, (value, remaining_ns, tags) in zip(keys, tokens, read):
            if value is not MISSING:
                self.fill(token, key, value, remaining_ns, tags)
                found[key] = as_read(value)
        return found

    def fill(self, token, key, value, remaining_ns, tags=()):
        """Keep an L1 copy (with its entry's ``tags``) unless an invalidation voided
        ``token``; True when stored."""
        try:
            return self.l1.fill(key, value, self.copy_ttl_ns(remaining_ns), tags, token)
        except (CacheFull, ValueTooLarge):
            return False  # a copy is an optimisation: no room means no copy

    def copy_ttl_ns(self, remaining_ns):
        """Lifetime of a new L1 copy: the entry's own, capped by the maximum age."""
        cap = self.l1_ttl_ns if self.healthy() else self.degraded_ttl_ns
        return cap if remaining_ns <= 0 else min(cap, remaining_ns)

    def healthy(self):
        """True while a listener of this host is subscribed (its heartbeat is fresh)."""
        return self.l1.contains(MARKER)

    # ---- invalidation -----------------------------------------------------------

    def invalidate(self, key):
        """Drop the L1 copy of ``key`` and void the fills in flight on its stripe."""
        self.l1.invalidate(key)

    def drop_all(self, keep_marker=False):
        """Drop every L1 copy and void every fill in flight.

        Reservations are voided first: a fill whose L2 read predates the event
        that made us drop everything must not land after the flush.
        """
        marker_ns = 0
        if keep_marker:
            found, remaining = self.l1.ttl(MARKER)
            marker_ns = remaining if found and remaining > 0 else 0
        self.l1.invalidate_all()
        self.l1.flush()
        self.dropped_all += 1
        if marker_ns:
            self.l1.put(MARKER, os.getpid(), marker_ns, ())

    def apply(self, message):
        """Apply one invalidation message to L1 (a malformed one drops everything)."""
        try:
            keys = decode_message(message)
        except (ValueError, TypeError):
            self.malformed += 1
            if self.malformed == 1 or self.malformed % 1000 == 0:
                log.warning("malformed invalidation message (%d bytes, %d so far): dropping all of L1",
                            len(message), self.malformed)
            self.drop_all(keep_marker=True)
            return
        if keys is None:
            self.drop_all(keep_marker=True)  # the listener that applies it is still healthy
        else:
            invalidate = self.l1.invalidate
            for key in keys:
                invalidate(key)
        self.applied += 1

    # ---- the listener's heartbeat ---------------------------------------------

    def mark_healthy(self):
        self.l1.put(MARKER, os.getpid(), self.marker_ttl_ns, ())

    def mark_unhealthy(self):
        self.l1.delete(MARKER)


class HostElection:
    """One holder per host for a role (the invalidation listener), by flock.

    The lock is taken on a POSIX shared-memory object named after the segment
    (``/vela.<segment>.<role>``), so "host" means exactly the processes that share
    the segment. The kernel releases the lock when the holder dies; another process
    takes over at its next :meth:`try_acquire`.
    """

    def __init__(self, segment, role="listener"):
        self.shm_name = f"/vela.{segment}.{role}"
        self.fd = -1

    @property
    def held(self):
        return self.fd >= 0

    def try_acquire(self):
        """True when this handle holds the role (now or already)."""
        if self.fd >= 0:
            return True
        shm = posix_ipc.SharedMemory(self.shm_name, posix_ipc.O_CREAT, mode=0o600)
        try:
            fd = os.dup(shm.fd)  # not inheritable across exec; a fork child closes it
        finally:
            shm.close_fd()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self.fd = fd
        return True

    def release(self):
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)  # the lock goes with the last descriptor of this open file

    def forget_after_fork(self):
        """In a fork child: the inherited descriptor shares the parent's lock; drop it."""
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def destroy(self):
        try:
            posix_ipc.unlink_shared_memory(self.shm_name)
        except posix_ipc.ExistentialError:
            return False
        return True


class NearStore:
    """L1 copies in the host table in front of a remote store (see vela.stores.base.Store).

    :param inner: the store that holds the entries; it serves the :class:`L2` reads
        (``read``, ``read_many``: uncounted), counts (``count(counter, n)``), makes
        the :class:`NearCache` (``near_cache(l1_ttl)``: it knows how this host learns
        of the writes of others), and takes a ``reserve`` hook in ``fetch_begin`` and
        a ``drop_copies`` hook in ``invalidate_tag`` and ``flush``.
    """

    remote = True
    hit = None  # (every read needs the store's logic: vela.stores.base.Store.hit)

    def __init__(self, inner, l1_ttl):
        self.inner = inner
        self.table = inner.table
        self.near = inner.near_cache(l1_ttl)
        # What holds the entries, read past the copies (uncounted): vela.refresh checks
        # there whether a key was refreshed (a copy may not have heard of it yet).
        self.source = inner
        self._count = inner.count
        # Read through to the store that holds the entries: no copy to make or drop.
        self.ttl = inner.ttl
        self.expire = inner.expire
        self.size = inner.size
        self.stats = inner.stats
        self.reset_stats = inner.reset_stats
        self.info = inner.info
        self.check = inner.check
        self.sync = inner.sync
        self.fetch_abort = inner.fetch_abort
        self.close = inner.close
        self.destroy = inner.destroy
        self.describe = inner.describe

    @property
    def closed(self):
        return self.inner.closed

    # ---- reads: L1 first ------------------------------------------------------------

    def get(self, key, default=None):
        value = self.table.get(key, MISSING)
        if value is MISSING:
            value = self.near.load(key, self.inner)
            if value is MISSING:
                self._count("misses")
                return default
        self._count("hits")
        return value

    def get_many(self, keys):
        found = self.table.get_many(keys) if keys else {}
        missing = [k for k in keys if k not in found]
        if missing:
            found.update(self.near.load_many(missing, self.inner))
        count_lookups(self._count, keys, found)
        return found

    def contains(self, key):
        return self.table.contains(key) or self.inner.contains(key)

    # ---- writes: through to the store, then this host's copies go ---------------------
    # (every other host's listener drops its own when the write's invalidation arrives)

    def _dropped(self, keys):
        for key in keys:
            self.near.invalidate(key)

    def put(self, key, value, ns, tags):
        self.inner.put(key, value, ns, tags)
        self.near.invalidate(key)

    def add(self, key, value, ns, tags):
        stored = self.inner.add(key, value, ns, tags)
        if stored:
            self.near.invalidate(key)
        return stored

    def replace(self, key, value, ns, tags):
        stored = self.inner.replace(key, value, ns, tags)
        if stored:
            self.near.invalidate(key)
        return stored

    def cas(self, key, expected, new, ns):
        stored = self.inner.cas(key, expected, new, ns)
        if stored:
            self.near.invalidate(key)
        return stored

    def put_many(self, items, ns, tags):
        try:
            self.inner.put_many(items, ns, tags)
        finally:
            self._dropped(k for k, _ in items)

    def delete(self, key):
        try:
            return self.inner.delete(key)
        finally:
            self.near.invalidate(key)

    def delete_many(self, keys):
        try:
            return self.inner.delete_many(keys)
        finally:
            self._dropped(keys)

    def touch(self, key, ns):
        try:
            return self.inner.touch(key, ns)
        finally:
            self.near.invalidate(key)  # a copy must not outlive a shortened entry

    def incr(self, key, delta, ns, initial=0):
        value = self.inner.incr(key, delta, ns, initial)
        self.near.invalidate(key)
        return value

    # ---- get_or_fetch -----------------------------------------------------------------

    def fetch_begin(self, key, protect, budget_ns):
        if not protect:  # (with protection, the host lease's look at the table finds a copy)
            value = self.table.get(key, MISSING)
            if value is not MISSING:
                self._count("hits")
                return HIT, value, None, False
        return self.inner.fetch_begin(key, protect, budget_ns, reserve=lambda: self._reserve(key))

    def _reserve(self, key):
        """The fill of a copy of what is about to be read (voided by any invalidation
        of the key's stripe before it lands)."""
        token = self.table.reserve(key)
        return lambda value, remaining_ns, tags: self.near.fill(token, key, value, remaining_ns, tags)

    def fetch_complete(self, key, lease, value, ns, tags):
        try:
            self.inner.fetch_complete(key, lease, value, ns, tags)
        finally:
            self.near.invalidate(key)

    # ---- every entry --------------------------------------------------------------------

    def invalidate_tag(self, tag):
        return self.inner.invalidate_tag(tag, drop_copies=self._dropped)

    def flush(self):
        return self.inner.flush(drop_copies=lambda _all: self.near.drop_all(keep_marker=True))

    # ---- asyncio: L1 inline, the store that holds the entries through its async variants ----
    # A write cancelled while it waits still drops this host's copy (``finally``): it
    # may have reached the store.

    async def aget(self, key, default=None):
        value = self.table.get(key, MISSING)
        if value is MISSING:
            value = await self.near.aload(key, self.inner)
            if value is MISSING:
                self._count("misses")
                return default
        self._count("hits")
        return value

    async def aget_many(self, keys):
        found = self.table.get_many(keys) if keys else {}
        missing = [k for k in keys if k not in found]
        if missing:
            found.update(await self.near.aload_many(missing, self.inner))
        count_lookups(self._count, keys, found)
        return found

    async def acontains(self, key):
        return self.table.contains(key) or await self.inner.acontains(key)

    async def aput(self, key, value, ns, tags):
        try:
            await self.inner.aput(key, value, ns, tags)
        finally:
            self.near.invalidate(key)

    async def aput_many(self, items, ns, tags):
        try:
            await self.inner.aput_many(items, ns, tags)
        finally:
            self._dropped(k for k, _ in items)

    async def adelete(self, key):
        try:
            return await self.inner.adelete(key)
        finally:
            self.near.invalidate(key)

    async def ainvalidate_tag(self, tag):
        return await self.inner.ainvalidate_tag(tag, drop_copies=self._dropped)

    async def aflush(self):
        return await self.inner.aflush(drop_copies=lambda _all: self.near.drop_all(keep_marker=True))

    async def aclose(self):
        await self.inner.aclose()
