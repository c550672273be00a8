"""One partitioned cache as its host's bridge serves it.

The owner's host makes every write to a key. Workers of that host write a
partition it owns in place (``Table.put_routed``/``delete_routed``): the write
is made under the key's stripe lock only while the cluster view the worker
routed by is still the current one, and logged; the bridge reads the log
(``pump_local``) for the backup copies and near-cache invalidations. Every
other write -- from other hosts, for partitions in transit, get_or_fetch,
incr/touch -- is made by the owner's bridge. A handoff starts only after the
bridge has published the table that no longer names this host the owner, and
copies stripe by stripe under the same locks, so a write made in place is in
the copy or was refused. A backup copy receives the owner's writes in the order
they were made (one ZeroMQ pipe), and a member that no longer owns a partition
refuses its requests with "moved".

The table of this host holds three kinds of entries, told apart by partition:
the partitions it owns, the backup copies of partitions whose backup it is
(``backups=1``), and, with the near cache, L1 copies of the others.

Ring changes (``set_ring``): for every partition whose owner changes, the old
owner streams it to the new one ("hand" messages, then an ack); meanwhile the
new owner serves the keys written or deleted since (the "touched" keys) and
tells readers of the others to read the old owner (fallback). When the old
owner is gone, its backup is promoted in place, or streams its copy to the new
owner when another member took the partition. Every entry carries its version,
so two copies of a key that meet keep the newest.
"""

import itertools
import logging
import time

from .. import _native
from ..errors import CacheFull, LockTimeout, ValueTooLarge
from ..near import Numbering, copy_tag
from ..ring import PARTITIONS, assign, partition_of
from .protocol import PUT

log = logging.getLogger("vela.bridge")

CHUNK = 2000            # entries per handoff message
LOG_BATCH = 5000        # change log records read per loop turn
RESEND = 2.0            # seconds without an ack before a stream is sent again from the start
STREAM_STALL = 30.0     # seconds a stream may go unacknowledged, or an incoming partition unfed
INVAL_BATCH = 10_000    # keys per invalidation message


class Stream:
    """A handoff in progress: the partitions ``ps`` of this table, to ``target``."""

    def __init__(self, sid, target, role, ps):
        self.sid = sid
        self.target = target
        self.role = role          # "own": the target becomes the owner; "backup": it keeps a copy
        self.ps = set(ps)
        self.cursor = 0           # table scan position; None once everything was sent
        self.sent_at = self.started = time.monotonic()


class Incoming:
    """A partition this host owns now and whose entries are still on their way."""

    def __init__(self, source, wait=STREAM_STALL, settling=False):
        self.source = source      # node id the entries come from (None: nobody to read from)
        self.settling = settling  # a new table's guess: whoever hands the partition over completes it
        self.touched = set()      # keys written or deleted here since: theirs lose
        self.dead_tags = set()    # tags invalidated here since: entries with them are dropped
        self.flushed = False      # flushed here since: every incoming entry is dropped
        self.deadline = time.monotonic() + wait


class Partitions:
    def __init__(self, name, cache, node, backups=0, parts=PARTITIONS):
        self.name = name
        self.cache = cache
        self.table = cache._table
        self.node = node
        self.me = node.node_id
        self.backups = backups
        self.parts = parts
        self.owners = None
        self.backup_of = [None] * parts
        self.ring_members = ()
        self.incoming = {}          # partition -> Incoming
        self.outgoing = {}          # partition -> sid of the stream handing it to its new owner
        self.streams = []           # Stream objects being sent or awaiting their ack
        self.backup_in = set()      # sids of backup streams we started receiving (dropped first)
        self.backup_synced = {}     # partition -> node that holds our full backup copy
        self.brecs = {}             # backup node -> records not sent yet
        self.invals = []            # keys changed, not published yet: L1 copies elsewhere drop
        self.inval_seq = 0          # invalidation messages sent (they are numbered from 1)
        self.numbering = Numbering()  # the invalidation messages received from each member
        self.outbound_at = 0.0      # when brecs/invals were last sent
        state = self.table.log_state()
        self.log_pos = state["bridge_pos"]  # the writes workers made in place: resume there
        self.log_dropped = state["dropped"]
        self.leases = {}            # key -> (holder, deadline, connection): get_or_fetch in progress
        self.conn_id = None         # the data port connection of the request being served
        self.sids = itertools.count(1)
        self.lease_ttl = 30.0        # a holder alive but stuck; a dead one is seen at once (its connection)
        self.stats = {"requests": 0, "moved": 0, "fallbacks": 0, "handed_out": 0, "handed_in": 0,
                      "dropped": 0, "promoted": 0, "lost": 0, "backup_records": 0, "errors": 0,
                      "local_writes": 0, "log_lapped": 0, "inval_gaps": 0}

    # ---- the ring ----------------------------------------------------------------

    def mine(self, p):
        return self.owners is not None and self.owners[p] == self.me

    def flags(self, pick):
        """bytes of one flag per partition, set where pick(p) is true."""
        return bytes(1 if pick(p) else 0 for p in range(self.parts))

    def set_ring(self, members, reachable, settle=0.0):
        """Adopt the partition table of ``members`` (node ids in the ring); ``reachable``:
        the members that can still stream (the ring plus any member that is leaving).

        The first table of a bridge (which may be back from the dead, with a table
        others changed meanwhile) starts empty and takes for ``settle`` seconds
        whatever the previous owners hand back."""
        members = tuple(sorted(members))
        if members == self.ring_members and self.owners is not None:
            return False
        owners, backup_of = assign(members, self.parts, self.backups)
        old_owners, old_backups = self.owners, self.backup_of
        if old_owners is None and settle > 0 and len(members) > 1:
            # Who probably held our partitions while we were away: the table without us.
            # Readers fall back to it until its handoff (if any) arrives.
            before = assign([m for m in members if m != self.me], self.parts)[0]
        else:
            before = None
        self.owners, self.backup_of, self.ring_members = owners, backup_of, members
        drop = bytearray(self.parts)
        to_send = {}  # new owner -> partitions we hand to it
        for p in range(self.parts):
            n, nb = owners[p], backup_of[p]
            if old_owners is None:
                drop[p] = 1
                if n == self.me and settle > 0:
                    source = before[p] if before and before[p] in reachable else None
                    self.incoming[p] = Incoming(source, settle, settling=True)
                continue
            o, ob = old_owners[p], old_backups[p]
            holding = (o == self.me and p not in self.incoming) or p in self.outgoing
            if n == self.me:
                self.outgoing.pop(p, None)  # handing it off no more: it is ours again
                inc = self.incoming.get(p)
                if holding or (inc is not None and (inc.source is None or inc.source in reachable)):
                    continue
                if o not in reachable and ob == self.me:
                    self.stats["promoted"] += 1  # our backup copy is the partition now
                    self.incoming.pop(p, None)
                    continue
                source = o if o in reachable else ob if ob in reachable else None
                drop[p] = 1  # what we held of it (L1 copies, an old backup) makes way
                if source is None or source == self.me:
                    self.stats["lost"] += 1  # owner and backup gone: its keys are misses
                    self.incoming.pop(p, None)
                else:
                    self.incoming[p] = Incoming(source)
                continue
            incoming = self.incoming.pop(p, None)
            if holding or (incoming is not None and incoming.source is not None) or (
                    ob == self.me and o not in reachable):
                # We hold it (all of it, what reached us, or the only copy left): to its new owner.
                to_send.setdefault(n, set()).add(p)
                self.outgoing[p] = None
            elif nb != self.me:
                drop[p] = 1
        # Streams still going to the right member go on (for the partitions still theirs).
        kept = []
        for st in self.streams:
            if st.role == "own":
                st.ps = {p for p in st.ps if owners[p] == st.target and p in self.outgoing}
            else:
                for p in st.ps:
                    self.backup_synced.pop(p, None)  # cut short: copy again to the new backup
                st.ps = set()
            if st.ps:
                kept.append(st)
        self.streams = kept
        for target, ps in to_send.items():
            self._start_stream(target, "own", ps)
        for p in range(self.parts):
            if owners[p] != self.me or self.backup_synced.get(p) != backup_of[p]:
                self.backup_synced.pop(p, None)
        if any(drop):
            self.stats["dropped"] += self.table.drop_partitions(self.parts, bytes(drop))
        self.leases = {k: v for k, v in self.leases.items() if self.mine(partition_of(k, self.parts))}
        return True

    def _start_stream(self, target, role, ps):
        sid = next(self.sids)
        self.streams.append(Stream(sid, target, role, ps))
        if role == "own":
            for p in ps:
                self.outgoing[p] = sid

    def sync_backups(self):
        """Start a full copy of each partition we own to its backup, where the
        backup does not hold one yet (a new ring, a finished handoff)."""
        if not self.backups or self.owners is None:
            return
        todo = {}
        for p in range(self.parts):
            b = self.backup_of[p]
            if b is not None and self.owners[p] == self.me and p not in self.incoming \
                    and self.backup_synced.get(p) != b:
                todo.setdefault(b, set()).add(p)
                self.backup_synced[p] = b
        for target, ps in todo.items():
            self._start_stream(target, "backup", ps)

    # ---- streams out ---------------------------------------------------------------

    def pump_streams(self, send):
        """Send the next chunk of every stream; ``send(node, fields) -> bool``."""
        now = time.monotonic()
        still = []
        for s in self.streams:
            if s.cursor is None:
                if now - s.started > STREAM_STALL:
                    log.warning("cache %s: handoff %d of %d partitions to member %d was never acknowledged",
                                self.name, s.sid, len(s.ps), s.target)
                    self._finish_stream(s, s.ps)
                    continue
                if now - s.sent_at > RESEND:
                    # Not taken (the receiver had no table yet, or another one): again, afresh.
                    s.sid, s.cursor = next(self.sids), 0
                    if s.role == "own":
                        for p in s.ps:
                            self.outgoing[p] = s.sid
                still.append(s)
                continue
            cursor, items = self.table.scan(s.cursor, CHUNK)
            entries = [[k, v, codec, ttl, list(tags), ver] for k, v, codec, ttl, tags, ver in items
                       if ttl != -1 and codec < 7 and partition_of(k, self.parts) in s.ps]
            last = cursor is None
            fields = dict(c=self.name, sid=s.sid, role=s.role, ps=sorted(s.ps), last=last,
                          entries=[e[:5] for e in entries], vers=[e[5] for e in entries])
            if not send(s.target, fields):
                still.append(s)  # no room now (or not connected): the same chunk again next turn
                continue
            s.cursor = cursor
            s.sent_at = now
            self.stats["handed_out"] += len(entries)
            still.append(s)
        self.streams = still

    def on_handack(self, sid, ps):
        """The receiver of stream ``sid`` took partitions ``ps`` (the others go again)."""
        for s in self.streams:
            if s.sid == sid:
                taken = s.ps & set(ps)
                self._finish_stream(s, taken)
                s.ps -= taken
                if not s.ps:
                    self.streams.remove(s)
                return

    def _finish_stream(self, s, ps):
        if s.role != "own":
            return
        drop = bytearray(self.parts)
        for p in ps:
            if self.outgoing.get(p) == s.sid:
                del self.outgoing[p]
                if self.owners[p] != self.me and self.backup_of[p] != self.me:
                    drop[p] = 1
        if any(drop):
            self.stats["dropped"] += self.table.drop_partitions(self.parts, bytes(drop))

    # ---- streams in ----------------------------------------------------------------

    def on_hand(self, sender, msg):
        """Entries of a stream from ``sender``; at its end, the partitions taken (to
        acknowledge), else None. Without a table of our own, nothing is taken."""
        if self.owners is None:
            return None
        vers = msg["vers"]
        ps = set(msg["ps"])
        if msg["role"] == "backup":
            if msg["sid"] not in self.backup_in:
                # A fresh full copy: what we held of these partitions is replaced.
                self.backup_in.add(msg["sid"])
                drop = self.flags(lambda p: p in ps and not self.mine(p))
                self.table.drop_partitions(self.parts, drop)
            for (k, v, codec, ttl, tags), ver in zip(msg["entries"], vers):
                p = partition_of(k, self.parts)
                if p in ps and not self.mine(p):
                    self._apply(k, v, codec, ttl, tags, ver)
            if not msg["last"]:
                return None
            self.backup_in.discard(msg["sid"])
            return [p for p in ps if self.backup_of[p] == self.me]
        for (k, v, codec, ttl, tags), ver in zip(msg["entries"], vers):
            p = partition_of(k, self.parts)
            if p not in ps or not self.mine(p):
                continue
            inc = self.incoming.get(p)
            # From any member: two copies of a key (a partition that moved twice, two sides
            # of a healed network split) meet by version, the newest stays.
            if inc is not None and (inc.flushed or k in inc.touched or inc.dead_tags.intersection(tags)):
                continue
            self._apply(k, v, codec, ttl, tags, ver)
            self.stats["handed_in"] += 1
        if not msg["last"]:
            return None
        for p in ps:
            inc = self.incoming.get(p)
            if inc is not None and (inc.settling or inc.source == sender):
                del self.incoming[p]
        return [p for p in ps if self.mine(p)]

    def _apply(self, k, v, codec, ttl, tags, version):
        try:
            self.table.apply_put(k, v, codec, ttl, tags, version)
        except (CacheFull, ValueTooLarge) as exc:
            self.stats["errors"] += 1
            log.warning("cache %s: could not keep a handed-off entry: %s", self.name, exc)

    def check_incoming(self, reachable):
        """Give up on partitions whose source died or went silent: what did not
        arrive is lost (misses), the rest is served."""
        now = time.monotonic()
        for p, inc in list(self.incoming.items()):
            if inc.settling and (now > inc.deadline or inc.source not in reachable):
                del self.incoming[p]  # the settling time of a new table is over: nothing more comes
            elif inc.source is not None and (inc.source not in reachable or now > inc.deadline):
                log.warning("cache %s: partition %d: handoff from member %d did not complete", self.name, p,
                            inc.source)
                del self.incoming[p]

    # ---- backups and invalidations ----------------------------------------------------

    def on_brec(self, records):
        """Backup copies of an owner's writes, with the owner's versions (which the table's
        clock observes, so a promoted copy is newer than nothing the owner wrote before)."""
        for k, v, codec, ttl, tags, ver in records:
            if self.mine(partition_of(k, self.parts)):
                continue  # stale: we own it now
            if v is None:
                raw = self.table.get_raw(k)
                if raw is None or raw[4] < ver:  # (a put the owner made after it may be here first)
                    self.table.invalidate(_native.decode_key(k))
            else:
                self._apply(k, v, codec, ttl, tags, ver)
            self.stats["backup_records"] += 1

    def pump_local(self):
        """Backup records and invalidations for the writes this host's workers made in
        place (the table's change log). If the log ran over us, every backup is copied
        again in full and every host drops its L1 copies."""
        records, pos, lapped = self.table.log_read(self.log_pos, LOG_BATCH)
        dropped = self.table.log_state()["dropped"]
        if lapped or dropped != self.log_dropped:
            log.warning("cache %s: writes were lost to the change log; copying backups again", self.name)
            self.log_dropped = dropped
            self.log_pos = self.table.log_state()["head"]
            self.table.log_commit(self.log_pos)
            self.backup_synced.clear()
            self.streams = [st for st in self.streams if st.role != "backup"]
            self.invals.append(b"")
            self.stats["log_lapped"] += 1
            return
        for op, k, v, codec, ttl, tags, ver in records:
            p = partition_of(k, self.parts)
            if self.mine(p) and (op != PUT or ttl != -1):
                record = [k, v, codec, ttl, list(tags), ver] if op == PUT else [k, None, 0, 0, [], ver]
                self._changed(k, p, record)
            else:
                # It moved since (its copy went with it) or expired: L1 copies drop all the same.
                self.invals.append(k)
            self.stats["local_writes"] += 1
        if pos != self.log_pos:
            self.log_pos = pos
            self.table.log_commit(pos)

    # ---- near cache: this host's L1 copies of other members' keys ---------------------

    def l1(self, p):
        """True when what this host keeps of partition p are L1 copies (the near cache)."""
        return not self.mine(p) and self.backup_of[p] != self.me and p not in self.outgoing

    def drop_l1(self, pick=None):
        """Drop this host's L1 copies (of the partitions ``pick(p)`` names). Fills in
        flight are voided first: a copy read before the change that made us drop it
        must not land after."""
        if self.owners is None:
            return  # no table yet: which partitions hold copies is not known
        self.table.invalidate_all()
        self.table.drop_partitions(self.parts, self.flags(lambda p: self.l1(p) and (pick is None or pick(p))))

    def on_inval(self, origin, inc, seq, keys):
        """Drop the L1 copies of keys member ``origin`` (incarnation ``inc``) changed
        (b"": all of them); ``seq`` numbers its invalidation messages."""
        before = self.numbering.highest(origin)
        if self.owners is not None and self.numbering.received(origin, inc, seq):
            self._lost_invals(origin, before, seq - 1)
        for k in keys:
            if not k:
                self.drop_l1()
                continue
            p = partition_of(k, self.parts)
            if self.owners is None or self.l1(p):
                self.table.invalidate(_native.decode_key(k))

    def on_inval_seq(self, origin, inc, last):
        """A heartbeat of ``origin``: ``last`` is the number of its latest invalidation
        message (so a lost last message is noticed without waiting for the next one)."""
        if self.owners is None:
            return  # numbers are first taken with a table: that first contact drops the copies
        before = self.numbering.highest(origin)
        # (a heartbeat travels after the messages before it, on the same pipe)
        if self.numbering.counted(origin, inc, last) or self.numbering.announced(origin, inc, last):
            self._lost_invals(origin, before, last)

    def _lost_invals(self, origin, before, last):
        """Invalidations of ``origin`` may be lost (vela.near.Numbering): every L1 copy of
        its partitions goes (on a first contact or a restart, too)."""
        if self.numbering.gaps != self.stats["inval_gaps"]:
            self.stats["inval_gaps"] = self.numbering.gaps
            log.warning("cache %s: invalidations %d..%d from member %d were lost: its L1 copies dropped",
                        self.name, before + 1, last, origin)
        self.drop_l1(lambda p: self.owners[p] == origin)

    def _op_near(self, msg):
        """The second step of invalidate_tag (``tag``) and flush (no tag), once every
        owner has removed its entries: this host's L1 copies of them go. Fills in flight
        are voided first, so a copy read from an owner before its step cannot land after."""
        if msg.get("tag") is None:
            self.drop_l1()
        else:
            self.table.invalidate_all()
            self.table.apply_tag(_native.tag_hash(copy_tag(msg["tag"])), self.table.next_version(), self.parts,
                                 bytes(self.parts))  # (copies are not counted: only owned entries are)
        return {"ok": True}

    def _changed(self, k, p, record):
        """A write to owned key ``k`` was made: backup and L1 copies follow."""
        b = self.backup_of[p]
        if b is not None:
            self.brecs.setdefault(b, []).append(record)
        self.invals.append(k)
        inc = self.incoming.get(p)
        if inc is not None:
            inc.touched.add(k)

    def _changed_entry(self, k, p):
        """Record the entry now stored under ``k`` (after incr/touch) for backups."""
        raw = self.table.get_raw(k)
        if raw is None:
            self._changed(k, p, [k, None, 0, 0, [], self.table.next_version()])
        else:
            v, codec, ttl, tags, version = raw
            self._changed(k, p, [k, v, codec, ttl, list(tags), version])

    def take_outbound(self, now, delay):
        """(backup records per node, invalidation messages) to send now: those gathered since
        the last send, once ``delay`` seconds have passed since it (a write after a quiet
        spell goes at once; a run of writes travels in a few messages, not one per write
        to every member)."""
        if not (self.brecs or self.invals) or (now - self.outbound_at < delay and len(self.invals) < INVAL_BATCH):
            return {}, []
        self.outbound_at = now
        brecs, invals = self.brecs, self.invals
        self.brecs, self.invals = {}, []
        messages = []
        for i in range(0, len(invals), INVAL_BATCH):
            self.inval_seq += 1  # numbered, so a receiver notices one it did not get
            messages.append({"seq": self.inval_seq, "ks": invals[i:i + INVAL_BATCH]})
        return brecs, messages

    # ---- requests from workers ------------------------------------------------------

    def serve(self, msg, addr_of, conn_id=None):
        """Answer one worker request (a dict); ``addr_of(node)`` gives a member's address;
        ``conn_id`` names the connection it came on (a lease dies with it)."""
        self.conn_id = conn_id
        self.stats["requests"] += 1
        op = msg["op"]
        if self.owners is None:
            return {"retry": "this member has no partition table yet"}
        if op in ("size", "stats", "flush", "tag", "near"):
            return getattr(self, "_op_" + op)(msg)
        if op in ("getm", "delm"):
            return self._op_many(op, msg, addr_of)
        if op == "putm":
            return self._op_putm(msg, addr_of)
        k = msg["k"]
        p = partition_of(k, self.parts)
        if msg.get("fb"):
            # A read sent here because we are handing the partition off.
            if p in self.outgoing:
                self.stats["fallbacks"] += 1
                return self._read(op, k)
            return self._moved(p, addr_of)
        if not self.mine(p):
            return self._moved(p, addr_of)
        inc = self.incoming.get(p)
        if inc is not None and inc.source is not None and k not in inc.touched and not inc.flushed \
                and not self.table.contains(_native.decode_key(k)):
            if op in ("get", "has", "ttl"):
                return {"fb": addr_of(inc.source)}  # not here yet: read it where it still is
            if op in ("incr", "touch", "fetch"):
                return {"retry": "the partition is being handed over"}
        return getattr(self, "_op_" + op)(k, p, msg)

    def _moved(self, p, addr_of):
        self.stats["moved"] += 1
        return {"moved": addr_of(self.owners[p]), "epoch": self.node.ring_epoch}

    def _read(self, op, k):
        raw = self.table.get_raw(k) if op == "get" else None
        if op == "get":
            # (the tags go with the value: an L1 copy made of it carries them)
            return {"miss": True} if raw is None else {"val": raw[0], "codec": raw[1], "ttl": raw[2],
                                                       "tags": list(raw[3])}
        found, remaining = self.table.ttl(_native.decode_key(k))
        if op == "has":
            return {"ok": bool(found)}
        return {"ok": found, "ttl": remaining}

    def _op_get(self, k, p, msg):
        return self._read("get", k)

    def _op_has(self, k, p, msg):
        return self._read("has", k)

    def _op_ttl(self, k, p, msg):
        return self._read("ttl", k)

    def _op_put(self, k, p, msg):
        holder = msg.get("holder")
        if holder is not None:  # the value of a get_or_fetch's fetch
            self.table.bump("fetches")
            lease = self.leases.get(k)
            if lease is not None and lease[0] == holder:
                del self.leases[k]
        version = self.table.next_version()
        self.table.apply_put(k, msg["val"], msg["codec"], msg["ttl"], msg["tags"], version)
        self.table.bump("writes")
        self._changed(k, p, [k, msg["val"], msg["codec"], msg["ttl"], list(msg["tags"]), version])
        return {"ok": True}

    def _op_del(self, k, p, msg):
        removed = self.table.delete(_native.decode_key(k))
        self._changed(k, p, [k, None, 0, 0, [], self.table.next_version()])
        return {"ok": bool(removed)}

    def _op_incr(self, k, p, msg):
        try:
            value = self.table.incr(_native.decode_key(k), msg["delta"], msg["ttl"])
        except TypeError as exc:
            return {"err": "TypeError", "msg": str(exc)}
        except OverflowError as exc:
            return {"err": "OverflowError", "msg": str(exc)}
        self._changed_entry(k, p)
        return {"ok": value}

    def _op_touch(self, k, p, msg):
        found = self.table.touch(_native.decode_key(k), msg["ttl"])
        if found:
            self._changed_entry(k, p)
        return {"ok": bool(found)}

    def _op_fetch(self, k, p, msg):
        raw = self.table.get_raw(k)
        if raw is not None:
            return {"val": raw[0], "codec": raw[1], "ttl": raw[2]}
        now = time.monotonic()
        lease = self.leases.get(k)
        if lease is None or lease[1] < now or lease[0] == msg["holder"]:
            self.leases[k] = (msg["holder"], now + self.lease_ttl, self.conn_id)
            return {"lease": True}
        self.table.bump("stampede_waits")
        return {"wait": True}

    def release_leases(self, conn_id):
        """Drop the leases taken over connection ``conn_id`` (it closed: its worker died,
        or gave up on a request); their waiters may fetch at once."""
        self.leases = {k: v for k, v in self.leases.items() if v[2] != conn_id}

    def _op_abort(self, k, p, msg):
        lease = self.leases.get(k)
        if lease is not None and lease[0] == msg["holder"]:
            del self.leases[k]
        return {"ok": True}

    def _op_many(self, op, msg, addr_of):
        """Keys of one owner in one request; keys that are not simply ours come back
        under "redo" (the worker asks for them one by one)."""
        out, redo = [], []
        for i, k in enumerate(msg["ks"]):
            p = partition_of(k, self.parts)
            inc = self.incoming.get(p)
            if not self.mine(p) or (inc is not None and k not in inc.touched):
                redo.append(i)
                out.append(None)
                continue
            if op == "getm":
                raw = self.table.get_raw(k)
                out.append(None if raw is None else [raw[0], raw[1], raw[2], list(raw[3])])
            else:
                out.append(bool(self._op_del(k, p, msg)["ok"]))
        return {"ok": out, "redo": redo}

    def _op_putm(self, msg, addr_of):
        redo = []
        for i, (k, v, codec) in enumerate(msg["items"]):
            p = partition_of(k, self.parts)
            if not self.mine(p):
                redo.append(i)
                continue
            self._op_put(k, p, dict(val=v, codec=codec, ttl=msg["ttl"], tags=msg["tags"]))
        return {"ok": True, "redo": redo}

    def owned_flags(self):
        return self.flags(self.mine)

    def owned_size(self):
        counts = self.table.partition_counts(self.parts)
        return sum(c for p, c in enumerate(counts) if self.mine(p))

    def _op_size(self, msg):
        return {"ok": self.owned_size()}

    def _op_stats(self, msg):
        counters = self.table.stats(bool(msg.get("reset")))
        info = self.table.info()
        counters.update(size=self.owned_size(), memory_used=info["memory_used"], capacity=info["capacity"])
        return {"ok": counters}

    def _op_flush(self, msg):
        removed = self.owned_size()
        self.table.drop_partitions(self.parts, b"\x01" * self.parts)
        for inc in self.incoming.values():
            inc.flushed = True
        self.leases.clear()
        self.invals.append(b"")  # "" stands for "everything": L1 copies elsewhere drop
        return {"ok": removed}

    def _op_tag(self, msg):
        tag = msg["tag"]
        removed = self.table.apply_tag(tag, self.table.next_version(), self.parts, self.owned_flags())
        for inc in self.incoming.values():
            inc.dead_tags.add(tag)
        return {"ok": removed}

    def status(self):
        owned = sum(1 for p in range(self.parts) if self.mine(p)) if self.owners else 0
        backed = sum(1 for b in self.backup_of if b == self.me)
        return dict(self.stats, partitions=self.parts, owned=owned, backup_of=backed,
                    incoming=len(self.incoming), outgoing=len(self.outgoing), streams=len(self.streams),
                    leases=len(self.leases),
                    ready=self.owners is not None and not self.incoming)

    def view(self):
        """What workers route by (written into the segment's cluster view)."""
        return {"partitions": self.parts, "owners": self.owners, "backups": self.backup_of,
                "incoming": {str(p): inc.source for p, inc in self.incoming.items()},
                "outgoing": sorted(self.outgoing)}  # (held until handed off: no L1 copies there)


def error_reply(exc):
    """A worker-facing reply for an exception raised while serving a request: the
    errors a local call would raise keep their name; anything else is reported as
    this bridge failing the request (the bridge goes on)."""
    if isinstance(exc, (CacheFull, ValueTooLarge, LockTimeout)):
        return {"err": type(exc).__name__, "msg": str(exc)}
    return {"err": "BridgeUnavailable", "msg": f"the bridge could not serve the request: {type(exc).__name__}: {exc}"}
