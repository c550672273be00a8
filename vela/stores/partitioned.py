"""The partitioned store: each key lives on one host, found through the partition table.

A worker finds a key's owner in the partition table its host's bridge writes
into the segment (no round trip): a key this host owns is read straight from
the shared table, lock-free, and put or deleted in place (Table.put_routed and
delete_routed: only while the table the worker routed by is the current one,
logged for the bridge's backup copies and invalidations). Everything else is a
request to the owner's bridge (vela.bridge.links), which makes those writes of
its partitions itself (vela.bridge.partitions).

Answers a worker may get besides the result: "moved" (the member no longer
owns the partition: ask the one named), "fb" (the owner is still receiving the
partition: read the old owner, named) and "retry" (wait a moment). All of them
are retried until the request's deadline (``topology_opts['timeout']``), after
which the call raises :class:`vela.BridgeUnavailable`; nothing waits longer.

A call that talks to bridges is written once, as steps (requests, pauses) that the
sync API runs on blocking sockets and the async API (``aget``, ``aput``, ...) on
asyncio streams to the same data ports (vela.bridge.alinks): see ``_drive``.

With ``near_cache=True``, values read from other hosts are kept in the local
table as L1 copies (vela.stores.near): the owner's bridge publishes the keys that
change and every bridge drops its host's copies of them.
"""

import asyncio
import json
import os
import socket
import threading
import time

from .. import _native
from ..bridge.alinks import AsyncLinks
from ..bridge.links import Links, bounded
from ..bridge.outcomes import ONCE
from ..bridge.presence import Presence
from ..errors import BridgeUnavailable, CacheFull, LockTimeout, PartialWrite, ValueTooLarge
from ..ring import partition_of
from ..segments.table import OpenTable
from ..stamp import as_read, reading_stamps
from .base import ALONE, BUSY, HIT, MINE, MISSING
from .near import NearCache, copy_tag

__all__ = ["PartitionedStore"]

_monotonic = time.monotonic

_ERRORS = {"CacheFull": CacheFull, "ValueTooLarge": ValueTooLarge, "LockTimeout": LockTimeout,
           "TypeError": TypeError, "OverflowError": OverflowError}
_REMOTE = object()  # get_routed: the owner must be asked
_REQ, _ALL, _SLEEP = "request", "request_all", "sleep"  # the steps of a call (see _drive)
# The reply for a key neither the new nor the old owner of a partition holds.
_RETRY_PAUSE = 0.002
_SLICE = 0.5  # seconds before a silent owner is looked up again


# One request carries at most this many keys and about this many bytes (the
# bridges' bounds: vela.bridge.protocol.MAX_BATCH_KEYS, dataport.MAX_REQUEST).
_BATCH_KEYS = 5000
_BATCH_BYTES = 4 << 20
_MAX_VALUE = 60 << 20  # under the bound of one message (vela.bridge.protocol.MAX_MESSAGE, 64 MiB)


def _batches(items, size_of):
    """``items`` cut into lists of at most _BATCH_KEYS items and about _BATCH_BYTES."""
    batch, size = [], 0
    for item in items:
        n = size_of(item)
        if batch and (len(batch) >= _BATCH_KEYS or size + n > _BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += n
    if batch:
        yield batch


class _View:
    """The partition table as the host's bridge last published it."""

    def __init__(self, raw):
        view = json.loads(raw) if raw else {}
        self.valid = view.get("topology") == "partitioned" and view.get("owners") is not None
        self.me = view.get("node_id")
        self.epoch = view.get("ring_epoch", 0)
        self.parts = view.get("partitions", 1)
        self.owners = view.get("owners") or []
        self.backups = view.get("backups") or [None] * len(self.owners)
        self.outgoing = set(view.get("outgoing") or ())
        self.incoming = {int(p) for p in (view.get("incoming") or {})}
        self.addrs = {int(n): a for n, a in (view.get("addrs") or {}).items()}
        self.published = view.get("published", 0.0)
        self.writable = view.get("writable", True)  # False: the bridge hears no majority
        # True: every write's reply waits for the backup copy, so none is made in place
        # (the bridge would hold nothing back from a write it never saw).
        self.sync_backups = view.get("sync_backups", False)
        # The bridge republishes at every heartbeat; a view much older means it is gone
        # (and, past half the failure timeout, the others may soon take its partitions:
        # its workers stop serving and writing them in place before that).
        self.max_age = min(3 * view.get("heartbeat", 1.0) + 1.0, view.get("failure_timeout", 10.0) / 2)
        self.members = sorted({o for o in self.owners})

    def fresh(self):
        return self.valid and time.time() - self.published < self.max_age

    def local(self, p):
        """True when this host owns partition p, holds all of it and may write it (its
        bridge hears a majority of the cluster: vela.bridge.quorum)."""
        return self.owners[p] == self.me and p not in self.incoming and self.writable

    def l1(self, p):
        """True when what this host keeps of partition p are L1 copies (the near cache):
        it neither owns the partition nor keeps its backup, nor is handing it off (its
        entries would go with it)."""
        return self.owners[p] != self.me and self.backups[p] != self.me and p not in self.outgoing


def _copy_tags(tag_ids):
    """The tags an L1 copy carries for its entry's tag ids (vela.stores.near.copy_tag)."""
    return [copy_tag(t) for t in tag_ids]


class _OwnerReads:
    """The owners of the keys, read past this host's L1 copies (uncounted): where
    vela.refresh checks whether a key was refreshed (see NearStore.source)."""

    def __init__(self, store):
        self.store = store

    def read(self, key):
        store = self.store
        enc = _native.encode_key(key)
        reply = store._key_request("get", enc, partition_of(enc, store._view().parts))
        if reply.get("miss"):
            return MISSING, 0, ()
        return store._decode(reply), reply["ttl"], _copy_tags(reply.get("tags", ()))


class _ClusterNear(NearCache):
    """L1 copies are healthy while the host's bridge publishes (it applies invalidations)."""

    def __init__(self, cache, l1_ttl):
        super().__init__(cache._table, l1_ttl, degraded_ttl=1.0, marker_ttl=1.0)
        self._cache = cache

    def healthy(self):
        return self._cache._view().fresh()


class PartitionedStore:
    """A cache whose keys are spread over the hosts of a cluster (topology="partitioned";
    see vela.stores.base.Store). ``topology_opts`` (vela.bridge.links.Links): ``timeout``
    (seconds a call may wait for the bridges, default 3), ``secret_file`` and
    ``curve_key_file`` (the cluster's, when its bridges use them: workers talk to
    every bridge).
    """

    remote = True
    hit = None  # (every read needs the store's logic: vela.stores.base.Store.hit)

    def __init__(self, name, opened: OpenTable, links: Links, near_l1_ttl=None):
        self.name = name
        self._links = links
        self._opened = opened
        self.segment = opened.segment
        self.table = self._table = opened.table
        self._near = _ClusterNear(self, near_l1_ttl) if near_l1_ttl is not None else None
        self.source = _OwnerReads(self) if self._near is not None else None
        self._alinks = None  # the asyncio requests' links (vela.bridge.alinks), made on first use
        self._seq = None
        self._cached_view = None
        # (routes, view seq, monotonic deadline) for the one-call get: see _view
        self._route = (b"\x00", 0, 0.0)
        self._presence = Presence(self.name)
        self._holder_base = f"{socket.gethostname()[:32]}:{os.getpid()}"

    # ---- routing ------------------------------------------------------------------

    def _view(self):
        seq = self._table.cluster_seq()
        if seq != self._seq:
            view = self._cached_view = _View(self._table.cluster())
            self._seq = seq
            if view.valid:
                # Per partition, where a get looks first (Table.get_routed): 1 here (ours),
                # 2 here then the owner (an L1 copy may be here), 0 the owner (a backup
                # copy here is not read: it may lag the owner's writes and invalidations).
                routes = bytes(1 if view.local(p) else 2 if self._copies(view, p) else 0
                               for p in range(view.parts))
                until = time.monotonic() + view.max_age - (time.time() - view.published)
                self._route = (routes, seq, until)
        return self._cached_view

    # ---- the steps of a call ----------------------------------------------------------
    # A call that talks to bridges is written once, as a generator of steps: it yields
    # (_REQ, addr, fields, epoch, deadline) for a request (sent back: the reply, or the
    # BridgeUnavailable thrown in), (_ALL, [(addr, fields)], epoch, deadline) for requests
    # to several bridges at once (sent back: replies or BridgeUnavailables), and
    # (_SLEEP, seconds). ``_drive`` runs them on this thread's blocking sockets (the sync
    # API), ``_adrive`` on asyncio streams (the async API, vela.bridge.alinks). Every
    # ``*_steps`` takes the call's deadline (monotonic) last.

    def _drive(self, steps):
        """The result of a call's steps, run with blocking sockets."""
        links = self._links
        reply, error = None, None
        try:
            while True:
                try:
                    step = steps.send(reply) if error is None else steps.throw(error)
                except StopIteration as done:
                    return done.value
                reply, error = None, None
                if step[0] is _SLEEP:
                    time.sleep(step[1])
                elif step[0] is _REQ:
                    try:
                        reply = links.request(*step[1:])
                    except BridgeUnavailable as exc:
                        error = exc
                else:
                    reply = links.request_all(*step[1:])
        finally:
            steps.close()

    async def _adrive(self, steps):
        """The result of a call's steps, run on asyncio streams. A cancelled call closes
        its steps (their ``finally`` clauses run: L1 copies of what may have been written
        are dropped) and the connection of the request in flight (AsyncLinks)."""
        alinks = self._alinks
        if alinks is None:
            alinks = self._alinks = AsyncLinks(self._links)
        reply, error = None, None
        try:
            while True:
                try:
                    step = steps.send(reply) if error is None else steps.throw(error)
                except StopIteration as done:
                    return done.value
                reply, error = None, None
                if step[0] is _SLEEP:
                    await asyncio.sleep(step[1])
                elif step[0] is _REQ:
                    try:
                        reply = await alinks.request(*step[1:])
                    except BridgeUnavailable as exc:
                        error = exc
                else:
                    reply = await alinks.request_all(*step[1:])
        finally:
            steps.close()

    def _arun(self, steps_of, *args):
        """``steps_of(*args, deadline)`` run on asyncio streams, the deadline the call's timeout from now."""
        return self._adrive(steps_of(*args, _monotonic() + self._links.timeout))

    def _view_steps(self, deadline):
        """The view, once there is one to route by (waits for the bridge up to the deadline)."""
        while True:
            view = self._view()
            if view.fresh():
                return view
            if time.monotonic() >= deadline:
                raise BridgeUnavailable(
                    f"cache {self.name!r}: the vela-bridge of this host publishes no partition table "
                    f"(not running, or not ready yet; waited {self._links.timeout:g} s)")
            yield _SLEEP, 0.02

    def _routable_view(self, deadline):
        return self._drive(self._view_steps(deadline))

    def _locate_steps(self, key, deadline):
        """(encoded key, partition, view, True when this host serves the key itself)."""
        enc = _native.encode_key(key)
        view = self._view()
        if not view.fresh():
            view = yield from self._view_steps(deadline)
        p = partition_of(enc, view.parts)
        return enc, p, view, view.local(p)

    def _locate(self, key):
        return self._drive(self._locate_steps(key, self._links.deadline()))

    def _key_steps(self, op, enc, p, fields, deadline):
        """A request about one key, to its owner, following moved/fallback/retry answers."""
        view = yield from self._view_steps(deadline)
        addr = view.addrs.get(view.owners[p])
        fields = dict(fields, op=op, k=enc, clk=self._table.next_version())  # (see _checked)
        # An owner that does not answer may be gone: look at the table again every slice.
        # An incr, add, replace or cas is not repeated at the same owner while it may still
        # answer, and every try carries one request id: a member asked again for a change
        # it (or the owner it took over from) made answers what was made, not twice
        # (vela.bridge.outcomes).
        once = op in ONCE
        if once:
            fields["rid"] = os.urandom(12)
        unanswered = None  # when a try left that got no answer: the next ones say how long ago
        while True:
            if addr is None:  # (an owner the table names before its address: ask again)
                yield from self._pause_steps(deadline, BridgeUnavailable(
                    f"cache {self.name!r}: no address for the owner of partition {p}"))
                view = yield from self._view_steps(deadline)
                addr = view.addrs.get(view.owners[p])
                continue
            if once:
                sent = time.monotonic()
                if unanswered is not None:
                    fields["again"] = int((sent - unanswered) * 1000) + 1
            try:
                reply = yield (_REQ, addr, fields, view.epoch,
                               deadline if once else min(deadline, time.monotonic() + _SLICE))
            except BridgeUnavailable as exc:
                if once and unanswered is None and getattr(exc, "sent", True):
                    unanswered = sent  # (it may have been made: vela.bridge.outcomes)
                yield from self._pause_steps(deadline, exc)  # (a refused connection fails at once)
                view = yield from self._view_steps(deadline)
                addr = view.addrs.get(view.owners[p])
                continue
            if "moved" in reply:
                addr = reply["moved"]  # the table changed: ask the owner the answering member knows
            elif "fb" in reply:
                try:
                    fb = yield (_REQ, reply["fb"], dict(fields, fb=True), view.epoch,
                                min(deadline, time.monotonic() + _SLICE))
                except BridgeUnavailable:
                    if time.monotonic() >= deadline:
                        raise
                    fb = {"retry": "the old owner does not answer"}  # the new owner decides, next turn
                if "moved" not in fb and "retry" not in fb:
                    return self._checked(fb)
                if "moved" in fb:
                    # The former holder no longer holds the partition (handed over, or never
                    # taken: a member back from a fast restart): the owner's copy is the one.
                    fields["own"] = True
                    continue
            elif "retry" in reply:
                pass
            else:
                return self._checked(reply)
            if time.monotonic() >= deadline:
                raise BridgeUnavailable(f"cache {self.name!r}: the owner of partition {p} was not found within "
                                        f"{self._links.timeout:g} s (the partition table keeps changing?)")
            yield _SLEEP, _RETRY_PAUSE
            view = self._view()
            if "moved" not in reply and view.fresh():
                addr = view.addrs.get(view.owners[p], addr)

    def _key_request(self, op, enc, p, **fields):
        return self._drive(self._key_steps(op, enc, p, fields, self._links.deadline()))

    def _checked(self, reply):
        # Requests carry this table's clock ("clk") and replies the owner's ("ver"): each
        # side's clock observes the other's, so a write that follows another one of this
        # worker, wherever it was made, gets a newer version whatever the wall clocks say.
        ver = reply.get("ver")
        if type(ver) is int and 0 < ver < 2**64:
            self._table.observe(ver)  # the owner's clock: a write made here next is newer (HLC)
        err = reply.get("err")
        if err is not None:
            raise _ERRORS.get(err, BridgeUnavailable)(reply.get("msg", err))
        return reply

    def _everyone_steps(self, op, fields, deadline):
        """The same request to every member of the ring; their replies. A member that does
        not answer is asked again while the partition table still names it (one that died
        leaves the table within the failure timeout), up to the call's deadline."""
        replies = {}
        while True:
            view = yield from self._view_steps(deadline)
            members = [n for n in view.members if n in view.addrs and n not in replies]
            fields["clk"] = self._table.next_version()
            results = yield (_ALL, [(view.addrs[n], dict(fields, op=op)) for n in members], view.epoch,
                             deadline)
            results = [self._unsettled(n, r) for n, r in zip(members, results)]
            failed = [r for r in results if isinstance(r, BridgeUnavailable)]
            replies.update((n, self._checked(r)) for n, r in zip(members, results) if isinstance(r, dict))
            if not failed:
                return list(replies.values())
            yield from self._pause_steps(deadline, failed[0])

    def _everyone(self, op, deadline=None, **fields):
        return self._drive(self._everyone_steps(op, fields, deadline or self._links.deadline()))

    def _unsettled(self, node, reply):
        """A member's reply to a request about many keys or a total; a BridgeUnavailable
        (asked again, by a fresh table, until the deadline) when it answered "retry" (no
        partition table yet) or "moved" (the table changed under the request): such a
        reply carries no result and must never count as one."""
        if isinstance(reply, dict) and ("retry" in reply or "moved" in reply):
            return BridgeUnavailable(f"cache {self.name!r}: member {node} could not answer yet: "
                                     f"{reply.get('retry') or 'its partition table changed'}")
        return reply

    def _pause_steps(self, deadline, error):
        """Before asking again: a short pause, or ``error`` once the deadline has passed."""
        if time.monotonic() >= deadline:
            raise error
        yield _SLEEP, _RETRY_PAUSE

    def _per_owner_steps(self, items, size_of, request_of, answered, deadline):
        """``items`` (tuples, the encoded key second) sent to their owners: one request per
        owner and batch (request_of(batch) its fields), all at once; [(batch, reply)]. The
        items of an owner that cannot be reached are sent again by a fresh look at the
        partition table (a dead owner is replaced within the failure timeout), up to the
        call's deadline. ``answered``: the caller's list (what was answered if this raises)."""
        pending = items
        while pending:
            view = yield from self._view_steps(deadline)
            by_owner = {}
            for item in pending:
                by_owner.setdefault(view.owners[partition_of(item[1], view.parts)], []).append(item)
            batches = [(n, batch) for n, its in by_owner.items() for batch in _batches(its, size_of)]
            reachable = [(n, batch) for n, batch in batches if n in view.addrs]
            clk = self._table.next_version()
            results = yield (_ALL, [(view.addrs[n], dict(request_of(batch), clk=clk)) for n, batch in reachable],
                             view.epoch, deadline)
            pending, error = [], None
            for (n, batch), reply in zip(reachable, results):
                reply = self._unsettled(n, reply)
                if isinstance(reply, BridgeUnavailable):
                    pending += batch
                    error = reply
                else:
                    answered.append((batch, self._checked(reply)))
            for n, batch in batches:
                if n not in view.addrs:
                    pending += batch
                    error = error or BridgeUnavailable(f"cache {self.name!r}: no address for member {n}")
            if pending:
                yield from self._pause_steps(deadline, error)
        return answered

    def _encoded(self, value):
        """(bytes, codec) of a value, refused here when no request could carry it."""
        val, codec = self._table.encode_value(value)
        if len(val) > _MAX_VALUE:
            raise ValueTooLarge(f"a value of {len(val)} bytes is more than a request to a bridge carries "
                                f"({_MAX_VALUE >> 20} MiB)")
        return val, codec

    def _decode(self, reply):
        return self._table.decode_value(reply["val"], reply["codec"])

    def _encode_tags(self, tags):
        return [_native.tag_hash(t) for t in tags]

    # ---- reading ------------------------------------------------------------------

    def _here(self, key):
        """The value of a key this host holds (MISSING when absent), else _REMOTE."""
        routes, seq, until = self._route
        if until > _monotonic():  # a key this host holds: one native call
            return self._table.get_routed(key, routes, seq, MISSING, _REMOTE)
        return _REMOTE

    def get(self, key, default=None):
        """The value stored under ``key`` (on its owner), or ``default``."""
        value = self._here(key)
        if value is _REMOTE:
            value = self._lookup(key)
        return default if value is MISSING else value

    async def aget(self, key, default=None):
        value = self._here(key)
        if value is _REMOTE:
            value = await self._arun(self._lookup_steps, key)
        return default if value is MISSING else value

    def _lookup_steps(self, key, deadline):
        enc, p, view, local = yield from self._locate_steps(key, deadline)
        if local:
            return self._table.get(key, MISSING)
        if self._copies(view, p):
            value = self._table.get_hit(key, MISSING)  # an L1 copy
            if value is not MISSING:
                return value
            # A near-cache miss (vela.stores.near.NearCache.load): reserve, read the
            # owner, keep the copy unless an invalidation voided the reservation.
            token = self._table.reserve(key)
            reply = yield from self._key_steps("get", enc, p, {}, deadline)
            if reply.get("miss"):
                return MISSING
            with reading_stamps():  # (a copy keeps a stamped value's stamp)
                value = self._decode(reply)
            self._near.fill(token, key, value, reply["ttl"], _copy_tags(reply.get("tags", ())))
            return as_read(value)
        reply = yield from self._key_steps("get", enc, p, {}, deadline)
        return MISSING if reply.get("miss") else self._decode(reply)

    @bounded
    def _lookup(self, key):
        return self._drive(self._lookup_steps(key, self._links.deadline()))

    def _contains_steps(self, key, deadline):
        enc, p, view, local = yield from self._locate_steps(key, deadline)
        if local:
            return self._table.contains(key)
        return bool((yield from self._key_steps("has", enc, p, {}, deadline))["ok"])

    @bounded
    def contains(self, key):
        return self._drive(self._contains_steps(key, self._links.deadline()))

    def acontains(self, key):
        return self._arun(self._contains_steps, key)

    @bounded
    def ttl(self, key):
        enc, p, view, local = self._locate(key)
        if local:
            found, remaining = self._table.ttl(key)
        else:
            reply = self._key_request("ttl", enc, p)
            found, remaining = reply["ok"], reply.get("ttl", -1)
        return found, remaining

    def _grouped_steps(self, op, keys, deadline):
        """One ``op`` request per owner for the keys, sent at once: ``{key: reply item}``;
        keys an owner could not simply serve are left out (the caller asks for them one
        by one)."""
        items = [(key, _native.encode_key(key)) for key in keys]
        out = {}
        answered = yield from self._per_owner_steps(
            items, lambda item: len(item[1]), lambda batch: {"op": op, "ks": [enc for _, enc in batch]}, [],
            deadline)
        for batch, reply in answered:
            redo = set(reply.get("redo", ()))
            out.update((key, item) for i, ((key, _), item) in enumerate(zip(batch, reply["ok"]))
                       if i not in redo)
        return out

    def _get_many_steps(self, keys, deadline):
        """``{key: value}`` for the keys present; one request per owner, sent together."""
        found, remote = {}, []
        view = yield from self._view_steps(deadline)
        for key in keys:
            p = partition_of(_native.encode_key(key), view.parts)
            local = view.local(p)
            if local or self._copies(view, p):
                # an owned entry, or an L1 copy (a near-cache miss is read from its owner)
                value = self._table.get(key, MISSING) if local else self._table.get_hit(key, MISSING)
                if value is not MISSING:
                    found[key] = value
                if local:
                    continue
            if key not in found:
                remote.append(key)
        # Near cache: reserve before the owners are read, so a copy whose read raced an
        # invalidation is not kept (vela.stores.near).
        tokens = {key: self._table.reserve(key) for key in remote
                  if self._copies(view, partition_of(_native.encode_key(key), view.parts))}
        answered = yield from self._grouped_steps("getm", remote, deadline)
        for key in remote:
            if key not in answered:
                value = yield from self._lookup_steps(key, deadline)  # moved, or in a partition being handed over
                if value is not MISSING:
                    found[key] = value
            elif answered[key] is not None:
                raw, codec, remaining_ns, tag_ids = answered[key]
                with reading_stamps():  # (a copy keeps a stamped value's stamp)
                    value = self._table.decode_value(raw, codec)
                if key in tokens:
                    self._near.fill(tokens[key], key, value, remaining_ns, _copy_tags(tag_ids))
                found[key] = as_read(value)
        return found

    @bounded
    def get_many(self, keys):
        return self._drive(self._get_many_steps(keys, self._links.deadline()))

    def aget_many(self, keys):
        return self._arun(self._get_many_steps, keys)

    # ---- writing ------------------------------------------------------------------

    def put(self, key, value, ns, tags):
        """Store ``value`` under ``key`` on the key's owner (see :meth:`vela.Cache.put`)."""
        tag_ids = self._encode_tags(tags)
        val, codec = self._encoded(value)
        if not self._put_here(key, val, codec, ns, tag_ids):
            self._put_remote(key, val, codec, ns, tag_ids)

    async def aput(self, key, value, ns, tags):
        tag_ids = self._encode_tags(tags)
        val, codec = self._encoded(value)
        if not self._put_here(key, val, codec, ns, tag_ids):
            await self._arun(self._put_remote_steps, key, val, codec, ns, tag_ids)

    @bounded
    def add(self, key, value, ns, tags):
        """Store ``value`` under ``key`` only if absent, decided at the key's owner; True when stored."""
        return self._put_at_owner("add", key, value, ns, tags)

    @bounded
    def replace(self, key, value, ns, tags):
        """Store ``value`` under ``key`` only if present, decided at the key's owner; True when stored."""
        return self._put_at_owner("repl", key, value, ns, tags)

    @bounded
    def cas(self, key, expected, new, ns):
        """Store ``new`` only if the value is ``expected`` (as encoded here), decided at the
        key's owner; True when stored."""
        xval, xcodec = self._encoded(expected)
        return self._put_at_owner("cas", key, new, ns, (), xval=xval, xcodec=xcodec)

    def _put_at_owner(self, op, key, value, ns, tags, **fields):
        """A conditional put, made by the owner's bridge in one step under the key's stripe
        lock there (one request of any host at a time for the key); True when stored."""
        tag_ids = self._encode_tags(tags)
        val, codec = self._encoded(value)
        enc, p, view, local = self._locate(key)
        stored = bool(self._key_request(op, enc, p, val=val, codec=codec, ttl=ns, tags=tag_ids, **fields)["ok"])
        if stored:
            self._written((key,))
        return stored

    def _written(self, keys):
        """Owners have written ``keys``: this host's L1 copies of them go at once (its
        bridge drops them too when the owners' invalidations arrive), so a read here
        after the write returned never finds the value it replaced."""
        if self._near is None:
            return
        view = self._view()
        if view.valid:
            for key in keys:
                if self._copies(view, partition_of(_native.encode_key(key), view.parts)):
                    self._table.invalidate(key)

    def _copies(self, view, p):
        """True when this host may keep L1 copies of partition p's keys (vela.stores.near)."""
        return self._near is not None and view.l1(p)

    def _put_remote_steps(self, key, val, codec, ns, tag_ids, deadline):
        try:
            enc, p, view, local = yield from self._locate_steps(key, deadline)
            yield from self._key_steps("put", enc, p, dict(val=val, codec=codec, ttl=ns, tags=tag_ids), deadline)
        finally:  # (also when it failed or was cancelled: the owner may have written it)
            self._written((key,))

    @bounded
    def _put_remote(self, key, val, codec, ns, tag_ids):
        self._drive(self._put_remote_steps(key, val, codec, ns, tag_ids, self._links.deadline()))

    def _routes(self):
        """(routes, view seq) to write in place by, or None while the view is too old or
        the host's bridge is not running (vela.bridge.presence: a killed one is known at
        once; nothing written here would reach the backup), or when writes wait for the
        backup (the bridge makes them)."""
        if self._view().sync_backups:
            return None
        routes, seq, until = self._route
        return (routes, seq) if until > _monotonic() and self._presence.running() else None

    def _put_here(self, key, val, codec, ns, tag_ids, routes=None):
        """True when ``key`` is in a partition this host owns and the put was made in
        place (Table.put_routed: only while the view it was routed by is current)."""
        routes = routes or self._routes()
        return routes is not None and self._table.put_routed(key, val, codec, ns, tag_ids, *routes)

    @bounded
    def put_many(self, items, ns, tags):
        """Store every item; each is checked before any is sent. One request per owner
        (and per 5,000 items or 4 MiB), all sent at once."""
        self._drive(self._put_many_steps(items, ns, tags, self._links.deadline()))

    def aput_many(self, items, ns, tags):
        return self._arun(self._put_many_steps, items, ns, tags)

    def _put_many_steps(self, items, ns, tags, deadline):
        tag_ids = self._encode_tags(tags)
        encoded = [(k, _native.encode_key(k)) + self._encoded(v) for k, v in items]
        self._check_sizes(encoded, len(tag_ids))  # before anything is stored
        routes = self._routes()
        if routes is not None:  # the items of partitions this host owns: in place
            encoded = [item for item in encoded
                       if not self._put_here(item[0], item[2], item[3], ns, tag_ids, routes)]
        answered, stored_again = [], []
        try:
            yield from self._per_owner_steps(
                encoded, lambda item: len(item[1]) + len(item[2]),
                lambda batch: {"op": "putm", "items": [[e, v, c] for _, e, v, c in batch], "ttl": ns,
                               "tags": tag_ids}, answered, deadline)
            again = [batch[i] for batch, reply in answered for i in reply.get("redo", ())]
            for k, enc, val, codec in again:
                yield from self._key_steps("put", enc, partition_of(enc, self._view().parts),
                                           dict(val=val, codec=codec, ttl=ns, tags=tag_ids), deadline)
                stored_again.append(k)
        except BridgeUnavailable as exc:
            partial = self._partial(items, encoded, answered, stored_again, exc)
            if not partial.stored:
                raise  # nothing was written: the owners' unavailability is the whole story
            raise partial from exc
        finally:  # (also when cancelled: owners may have written some)
            self._written(item[0] for item in encoded)

    def _check_sizes(self, encoded, ntags):
        """ValueTooLarge for the first item bigger than max_entry_size (as the owner's table would say)."""
        most = self._table.info()["max_entry_size"]
        for i, (_, enc, val, _codec) in enumerate(encoded):
            size = _native.entry_size(len(enc), len(val), ntags)
            if size == 0 or size > most:
                raise ValueTooLarge(f"entry of {size or 'too many'} bytes for item {i} is larger than "
                                    f"max_entry_size ({most} bytes)")

    @staticmethod
    def _partial(items, remote, answered, stored_again, exc):
        """The PartialWrite of a put_many some owners did not answer: the keys made in
        place, by the owners that answered and by the retries, and the others."""
        remote_keys = {item[0] for item in remote}
        stored = {k for k, _ in items if k not in remote_keys} | set(stored_again)
        for batch, reply in answered:
            redo = set(reply.get("redo", ()))
            stored |= {item[0] for i, item in enumerate(batch) if i not in redo}
        failed = {k for k, _ in items} - stored
        return PartialWrite(f"put_many stored {len(stored)} of {len(stored) + len(failed)} keys: {exc} "
                            "(.stored and .failed name them)", stored, failed)

    def _delete_here(self, key):
        """True/False when ``key`` is in a partition of this host (deleted in place), else None."""
        routes = self._routes()
        return self._table.delete_routed(key, *routes) if routes is not None else None

    def delete(self, key):
        removed = self._delete_here(key)
        if removed is None:  # not a partition of this host: its owner deletes
            removed = self._delete_remote(key)
        return removed

    async def adelete(self, key):
        removed = self._delete_here(key)
        if removed is None:
            removed = await self._arun(self._delete_remote_steps, key)
        return removed

    def _delete_remote_steps(self, key, deadline):
        try:
            enc, p, view, local = yield from self._locate_steps(key, deadline)
            return bool((yield from self._key_steps("del", enc, p, {}, deadline))["ok"])
        finally:
            self._written((key,))

    @bounded
    def _delete_remote(self, key):
        return self._drive(self._delete_remote_steps(key, self._links.deadline()))

    @bounded
    def delete_many(self, keys):
        """Remove the keys (those of this host's partitions in place, the others with one
        request per owner); returns how many were removed."""
        keys = list(dict.fromkeys(keys))
        routes = self._routes()
        removed, remote = 0, []
        for key in keys:
            here = self._table.delete_routed(key, *routes) if routes is not None else None
            if here is None:
                remote.append(key)
            else:
                removed += here
        answered = self._drive(self._grouped_steps("delm", remote, self._links.deadline()))
        self._written(remote)
        removed += sum(bool(answered[k]) if k in answered else self._delete_one(k) for k in remote)
        return removed

    def _delete_one(self, key):
        return self._delete_remote(key)

    @bounded
    def touch(self, key, ns):
        enc, p, view, local = self._locate(key)
        found = bool(self._key_request("touch", enc, p, ttl=ns)["ok"])
        self._written((key,))
        return found

    @bounded
    def incr(self, key, delta, ns, initial=0):
        """Add ``delta`` atomically on the key's owner (see :meth:`vela.Cache.incr`)."""
        enc, p, view, local = self._locate(key)
        value = self._key_request("incr", enc, p, delta=delta, ttl=ns, init=initial)["ok"]
        self._written((key,))
        return value

    # ---- get_or_fetch: one fetch per key in the whole cluster --------------------------

    def _holder(self):
        return f"{self._holder_base}:{threading.get_ident() % 1_000_000_007}"

    @bounded
    def fetch_begin(self, key, protect, budget_ns):
        """(HIT, value, None, False) | (MINE, None, holder, False): we hold the owner's
        lease | (ALONE, None, None, False): waited ``budget_ns``, fetch without it |
        (BUSY, None, None, False): budget 0 and another caller holds the lease.
        Waits (polling the owner) while another caller anywhere fetches the key."""
        enc, p, view, local = self._locate(key)
        if local or self._copies(view, p):  # an owned entry or an L1 copy: no round trip
            value = self._table.get_hit(key, MISSING)
            if value is not MISSING:
                return HIT, value, None, False
        if not protect:
            value = self._lookup(key)
            return (HIT, value, None, False) if value is not MISSING else (ALONE, None, None, False)
        holder = self._holder()
        give_up = time.monotonic() + budget_ns / 1e9
        pause = 0.001
        while True:
            reply = self._key_request("fetch", enc, p, holder=holder)
            if "val" in reply:
                return HIT, self._decode(reply), None, False
            if reply.get("lease"):
                return MINE, None, holder, False  # (released by whichever thread completes)
            if budget_ns == 0:
                return BUSY, None, None, False
            if time.monotonic() >= give_up:
                return ALONE, None, None, False
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    @bounded
    def fetch_complete(self, key, lease, value, ns, tags):
        tag_ids = self._encode_tags(tags)
        val, codec = self._encoded(value)
        enc, p, view, local = self._locate(key)
        try:  # the holder marks a fetched value (counted), and releases our lease if we hold it
            self._key_request("put", enc, p, val=val, codec=codec, ttl=ns, tags=tag_ids,
                              holder=lease or self._holder())
        except CacheFull:
            pass

    @bounded
    def fetch_abort(self, key, lease):
        if lease is None:
            return
        enc, p, view, local = self._locate(key)
        try:
            self._key_request("abort", enc, p, holder=lease)
        except BridgeUnavailable:
            pass  # the lease expires on its own

    # ---- every member ---------------------------------------------------------------------

    # invalidate_tag and flush run on every member and return the total. Then, once
    # every owner has removed its entries, every member drops its host's L1 copies of
    # them ("near"): a copy read from an owner before that owner's step would
    # otherwise land after a member dropped its copies, and outlive the call.

    # Both steps share the call's deadline.

    def _total_steps(self, op, fields, deadline):
        removed = sum(r["ok"] for r in (yield from self._everyone_steps(op, dict(fields), deadline)))
        yield from self._everyone_steps("near", dict(fields), deadline)
        return removed

    @bounded
    def invalidate_tag(self, tag):
        return self._drive(self._total_steps("tag", {"tag": self._encode_tags([tag])[0]}, self._links.deadline()))

    def ainvalidate_tag(self, tag):
        return self._arun(self._total_steps, "tag", {"tag": self._encode_tags([tag])[0]})

    @bounded
    def flush(self):
        return self._drive(self._total_steps("flush", {}, self._links.deadline()))

    def aflush(self):
        return self._arun(self._total_steps, "flush", {})

    @bounded
    def expire(self):
        """Reclaim expired entries on every member now; returns how many (the sum over owners)."""
        return sum(r["ok"] for r in self._everyone("expire"))

    @bounded
    def size(self):
        """Entries stored in the cluster (each counted on its owner)."""
        return sum(r["ok"] for r in self._everyone("size"))

    @bounded
    def stats(self, reset):
        """Counters summed over every member (each member's over all its processes)."""
        total = {}
        for r in self._everyone("stats", reset=bool(reset)):
            for k, v in r["ok"].items():
                total[k] = total.get(k, 0) + v
        return total

    def reset_stats(self):
        self.stats(reset=True)

    # ---- this host's table ----------------------------------------------------------------

    def info(self):
        return self._table.info()

    def check(self):
        return self._table.check()

    def sync(self):
        self._opened.sync()

    @property
    def closed(self):
        return self._opened.closed

    def close(self):
        try:
            self._opened.close()
        finally:
            self._links.close()
            if self._alinks is not None:
                self._alinks.close()

    def destroy(self):
        self.close()
        return self._opened.destroy()

    def describe(self):
        return f"partitioned, node {self._view().me}"
