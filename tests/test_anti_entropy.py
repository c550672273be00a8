"""Anti-entropy of backup copies (partitioned, --backups 1).

An owner sends each backup a digest of the partitions it backs up every few
heartbeats; a partition that differs in two consecutive rounds is copied again in
place ("repair"): the owner's entries and tombstones are taken, and what the owner
does not hold goes. Here a backup copy is made to differ without any sequence gap
(written straight into the backup host's table), and must come back equal to the
owner's; a healthy cluster under steady writes asks for no repair.
"""
import uuid

import pytest

import zmq

import vela
from cluster import eventually
from lone_member import parts  # noqa: F401 - a fixture
from test_partitioned_faults import SECRET, make_cluster
from vela import _native
from vela.bridge import protocol
from vela.bridge.node import bridge_exposition
from vela.ring import partition_of

KEYS = [f"key:{i}" for i in range(3000)]
PARTS = 271


def _enc(key):
    return _native.encode_key(key)


# --------------------------------------------------------------------------------------
# the digest itself (native/bind_bridge.c)


@pytest.fixture
def tables(monkeypatch):
    monkeypatch.setenv("VELA_NAMESPACE", f"ae{uuid.uuid4().hex[:8]}")
    caches = [vela.Cache(f"d{uuid.uuid4().hex[:8]}", capacity="8MiB", topology="partitioned", sweep_interval=None)
              for _ in range(2)]
    try:
        yield [c._table for c in caches]
    finally:
        for c in caches:
            c.destroy()


def _fill(table, items):
    for key, value, version in items:
        assert table.apply_put(_enc(key), value, 0, 0, [], version)


def test_equal_tables_have_equal_digests_whatever_the_order_of_their_writes(tables):
    a, b = tables
    items = [(k, f"v{i}".encode(), 1000 + i) for i, k in enumerate(KEYS[:500])]
    _fill(a, items)
    _fill(b, reversed(items))
    da, db = a.partition_digests(PARTS, 0, 0), b.partition_digests(PARTS, 0, 0)
    assert da == db
    assert [n for n, *_ in da] == a.partition_counts(PARTS)
    assert sum(n for n, *_ in da) == 500
    assert all(d == 0 for n, d, *_ in da if n == 0) and all(d != 0 for n, d, *_ in da if n)
    assert all(near == far for near, far in ((x[:2], x[2:]) for x in da))  # (nothing expires)


def test_one_differing_version_changes_the_digest_of_its_partition_only(tables):
    a, b = tables
    items = [(k, b"v", 1000 + i) for i, k in enumerate(KEYS[:300])]
    _fill(a, items)
    _fill(b, items)
    changed = KEYS[7]
    assert b.apply_put(_enc(changed), b"v", 0, 0, [], 5000)  # same value, a newer version
    p = partition_of(_enc(changed), PARTS)
    da, db = a.partition_digests(PARTS, 0, 0), b.partition_digests(PARTS, 0, 0)
    assert [q for q in range(PARTS) if da[q] != db[q]] == [p]
    assert da[p][0] == db[p][0] and da[p][1] != db[p][1]  # (as many entries: only the digest tells)
    assert da[p][3] != db[p][3]


def test_tombstones_and_expired_or_expiring_entries_are_left_out(tables):
    a, b = tables
    items = [(k, b"v", 1000 + i) for i, k in enumerate(KEYS[:100])]
    _fill(a, items)
    _fill(b, items)
    # on b only: a tombstone of a key a never had, an entry already expired, one that
    # expires in 30 s
    b.apply_delete(_enc("deleted"), 9000)
    assert b.apply_put(_enc("expired"), b"x", 0, 1, [], 9001)  # (1 ns to live)
    assert b.apply_put(_enc("soon"), b"x", 0, 30 * 10**9, [], 9002)
    minute = 60 * 10**9
    assert a.partition_digests(PARTS, minute, minute) == b.partition_digests(PARTS, minute, minute)
    # past a margin shorter than its time left, the expiring entry counts: in that digest only
    soon = partition_of(_enc("soon"), PARTS)
    da, db = a.partition_digests(PARTS, 10**9, minute), b.partition_digests(PARTS, 10**9, minute)
    assert [q for q in range(PARTS) if da[q] != db[q]] == [soon]
    assert db[soon][0] == da[soon][0] + 1 and db[soon][2:] == da[soon][2:]
    # entries that never expire always count
    assert b.apply_put(_enc("forever"), b"x", 0, 0, [], 9003)
    forever = partition_of(_enc("forever"), PARTS)
    counts = b.partition_digests(PARTS, minute, minute)[forever]
    assert counts[0] == counts[2] == a.partition_digests(PARTS, 0, 0)[forever][0] + 1


def test_partition_digests_refuses_bad_arguments(tables):
    a, _ = tables
    with pytest.raises(ValueError, match="margins must be >= 0"):
        a.partition_digests(PARTS, 0, -1)
    with pytest.raises(ValueError):
        a.partition_digests(0, 0, 0)


# --------------------------------------------------------------------------------------
# one member's Partitions, in this process (no network): the rules


def _backed_up_from(parts, owner):
    """A partition ``owner`` owns and we back up, and keys of it."""
    p = next(q for q in range(parts.parts) if parts.owners[q] == owner and parts.backup_of[q] == parts.me)
    return p, [_enc(k) for k in KEYS if partition_of(_enc(k), parts.parts) == p]


def test_a_partition_is_repaired_after_two_consecutive_rounds_that_differ(parts):
    p, keys = _backed_up_from(parts, 2)
    ours = list(parts._digests()[p])
    other = [ours[0] + 1, 12345, ours[2] + 1, 12345]
    assert parts.on_digest(2, 7, 1, [p], [other]) == []          # once: maybe a write in flight
    assert parts.on_digest(2, 7, 2, [p], [ours]) == []            # equal again
    assert parts.on_digest(2, 7, 3, [p], [other]) == []
    assert parts.on_digest(2, 7, 5, [p], [other]) == []           # round 4 never came: not consecutive
    assert parts.on_digest(2, 7, 6, [p], [other]) == [p]
    assert parts.stats["digest_repairs"] == 1 and parts.stats["digest_rounds"] == 5
    assert parts.on_digest(2, 7, 7, [p], [other]) == []           # a new streak starts after a repair
    assert parts.on_digest(2, 8, 8, [p], [other]) == []           # a new incarnation: a new streak
    # one of the two digests only (an entry crossed a margin): no difference
    near_only = ours[:2] + [ours[2] + 1, 12345]
    assert parts.on_digest(2, 8, 9, [p], [near_only]) == []
    assert parts.on_digest(2, 8, 10, [p], [near_only]) == []
    assert parts.stats["digest_repairs"] == 1

def test_a_digest_of_partitions_we_do_not_back_up_for_its_sender_is_ignored(parts):
    p, _ = _backed_up_from(parts, 2)
    not_ours = next(q for q in range(parts.parts) if parts.backup_of[q] != parts.me)
    for rnd in (1, 2):
        # (3 is not the owner of p; 60000 is no partition; not_ours is another member's copy)
        assert parts.on_digest(3, 7, rnd, [p, 60000, not_ours], [[1, 1, 1, 1]] * 3) == []
    assert parts.stats["digest_repairs"] == 0


def test_a_repair_stream_corrects_the_copy_in_place(parts):
    table = parts.table
    p, keys = _backed_up_from(parts, 2)
    stale, newer, missing, extra, recorded, deleted = keys[:6]
    base = table.next_version() + 1000
    # ours: an older version of `stale`, a version of `newer` the owner never wrote (newer
    # than its), `extra` that the owner does not hold, `deleted` that it deleted
    table.apply_put(stale, b"\x80old", 3, 0, [], base)
    table.apply_put(newer, b"\x80bogus", 3, 0, [], base + 50)
    table.apply_put(extra, b"\x80extra", 3, 0, [], base + 1)
    table.apply_put(deleted, b"\x80dead", 3, 0, [], base + 2)
    head = dict(c=parts.name, sid=5, role="repair", ps=[p], tombs=[], marks=[], fm=0)
    assert parts.on_hand(2, 9, dict(head, chunk=0, last=False, entries=[[stale, b"\x80new", 3, 0, []]],
                                    vers=[base + 10], tombs=[[deleted, base + 11]])) is None
    assert table.get_raw(extra) is not None  # nothing goes before the end
    # a record of the owner's during the repair: it stays, though no chunk carries it
    parts.on_brec(2, 9, 0, [])
    parts.on_brec(2, 9, 1, [[recorded, b"\x80rec", 3, 0, [], base + 30]])
    taken = parts.on_hand(2, 9, dict(head, chunk=1, last=True,
                                     entries=[[newer, b"\x80own", 3, 0, []], [missing, b"\x80m", 3, 0, []]],
                                     vers=[base + 20, base + 21]))
    assert taken == [p]
    assert table.get_raw(stale)[0] == b"\x80new"
    assert table.get_raw(newer)[0] == b"\x80own" and table.get_raw(newer)[4] == base + 20
    assert table.get_raw(missing)[0] == b"\x80m"
    assert table.get_raw(recorded)[0] == b"\x80rec"
    assert table.get_raw(extra) is None and table.get_raw(deleted) is None
    assert parts.repairing == {}


def test_a_repair_stream_with_a_gap_removes_nothing(parts):
    table = parts.table
    p, keys = _backed_up_from(parts, 2)
    extra = keys[0]
    table.apply_put(extra, b"\x80extra", 3, 0, [], table.next_version())
    head = dict(c=parts.name, sid=6, role="repair", ps=[p], tombs=[], entries=[], vers=[])
    assert parts.on_hand(2, 9, dict(head, chunk=0, last=False)) is None
    assert parts.on_hand(2, 9, dict(head, chunk=2, last=True)) is None  # chunk 1 was lost
    assert table.get_raw(extra) is not None and parts.repairing == {}


def test_an_owner_digests_only_quiet_partitions_with_a_synced_backup(parts):
    parts.sync_backups()
    assert parts.digest_messages(0.0, 2.0) == []  # not due yet
    due = parts.digest_at
    # the full copies are still on their way: nothing to compare
    assert parts.digest_messages(due, 2.0) == []
    parts.streams = []  # (taken)
    mine = [q for q in range(parts.parts) if parts.mine(q)]
    busy = mine[0]
    key = next(_enc(k) for k in KEYS if partition_of(_enc(k), parts.parts) == busy)
    parts.serve(dict(op="put", k=key, val=b"\x80v", codec=3, ttl=0, tags=[], e=1), lambda n: f"a{n}")
    sent = dict(parts.digest_messages(parts.digest_at, 2.0))
    digests = parts._digests()
    assert set(sent) == {parts.backup_of[q] for q in mine}
    for b, fields in sent.items():
        want = [q for q in mine if parts.backup_of[q] == b and q != busy]  # busy: its record is not sent
        assert fields["ps"] == want and fields["d"] == [list(digests[q]) for q in want]
    # the record sent, but not acknowledged: still not quiet; acknowledged: compared
    b = parts.backup_of[busy]
    (_, rec), = [m for m in parts.brec_messages(parts.take_outbound(10**9, 0)[0], False) if m[0] == b]
    assert busy not in dict(parts.digest_messages(parts.digest_at, 2.0))[b]["ps"]
    parts.on_brack(b, rec["seq"])
    assert busy in dict(parts.digest_messages(parts.digest_at, 2.0))[b]["ps"]


# --------------------------------------------------------------------------------------
# real bridges


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory):
    c = make_cluster(tmp_path_factory.mktemp("ae"), backups=1)
    try:
        yield c
    finally:
        c.close()


def _roles(host):
    view = host.cluster()
    return view["owners"], view["backups"], view["partitions"]


def _partition_dump(host, p, parts):
    """(key, value, codec, tags, version) of every live entry of partition p in host's table."""
    return sorted(e for e in map(tuple, host.call("dump")) if partition_of(bytes.fromhex(e[0]), parts) == p)


def _caches(host, name):
    return host.status()["caches"][name]


def test_a_backup_copy_that_differs_without_a_gap_is_repaired(cluster3):
    a, b, c = cluster3
    owners, backups, parts = _roles(a)
    hosts = {h.node_id: h for h in cluster3}
    # a partition B owns and A backs up, with keys of it
    keys = [k for k in KEYS if owners[partition_of(_enc(k), parts)] == b.node_id
            and backups[partition_of(_enc(k), parts)] == a.node_id]
    p = partition_of(_enc(keys[0]), parts)
    keys = [k for k in keys if partition_of(_enc(k), parts) == p]
    assert len(keys) >= 6 and hosts[owners[p]] is b
    b.put_many([(k, f"v{i}") for i, k in enumerate(keys[:5])])
    eventually(lambda: _partition_dump(a, p, parts) == _partition_dump(b, p, parts), 10,
               what="A's backup copy is B's")
    before = _caches(a, cluster3.name)["digest_repairs"]
    owner_version = {bytes.fromhex(e[0]): e[4] for e in _partition_dump(b, p, parts)}
    missing, stale, newer, extra = keys[0], keys[1], keys[2], keys[5]
    # Straight into A's table (no record, no log, no sequence number): one entry gone, one
    # older, one with a version B never wrote, one B does not hold.
    a.call("exec_loop", code=f"""
from vela import _native
t = cache._table
t.invalidate({missing!r})
t.invalidate({stale!r})
t.apply_put(_native.encode_key({stale!r}), b"old", 0, 0, [], {owner_version[_enc(stale)] - 1})
t.apply_put(_native.encode_key({newer!r}), b"bogus", 0, 0, [], t.next_version() + 10**9)
t.apply_put(_native.encode_key({extra!r}), b"extra", 0, 0, [], t.next_version())
""")
    assert _partition_dump(a, p, parts) != _partition_dump(b, p, parts)
    eventually(lambda: _partition_dump(a, p, parts) == _partition_dump(b, p, parts), 30,
               what="the digests found the difference and the copy was repaired")
    dump = {bytes.fromhex(e[0]) for e in _partition_dump(a, p, parts)}
    assert _enc(missing) in dump and _enc(extra) not in dump and len(dump) == 5
    status = a.status()
    repaired = status["caches"][cluster3.name]["digest_repairs"]
    assert repaired > before
    assert f'vela_bridge_digest_repairs_total{{cache="{cluster3.name}"}} {repaired}' in bridge_exposition(status)
    assert f"partitions [{p}] differs from member {b.node_id}" in a._tail(a.bridge_log, 10**8)
    assert a.call("local_get", key=newer) == [True, "v2"]
    # the repaired copy stays equal: no further repair
    repairs = _caches(a, cluster3.name)["digest_repairs"]
    rounds = _caches(a, cluster3.name)["digest_rounds"]
    eventually(lambda: _caches(a, cluster3.name)["digest_rounds"] >= rounds + 4, 30, what="four more rounds")
    assert _caches(a, cluster3.name)["digest_repairs"] == repairs


EXPIRING_WRITES = """
import random, time
rng = random.Random(%(seed)d)
end = time.monotonic() + 9.0
while time.monotonic() < end:
    cache.put("%(prefix)s" + str(rng.randrange(2000)), 1, ttl=rng.uniform(0.5, 3.0))
"""


def test_a_healthy_cluster_under_steady_writes_asks_for_no_repair(cluster3):
    name = cluster3.name
    before = {h.label: _caches(h, name) for h in cluster3}
    loads, expiring = [], []
    for i, h in enumerate(cluster3):
        side = h.side_agent()
        side.send("load", prefix=f"steady{i}:", keys=400, seconds=9.0, writer=i)
        loads.append(side)
        # and entries that expire all the time, many while two hosts compute their digests
        side = h.side_agent()
        side.send("exec_loop", code=EXPIRING_WRITES % dict(seed=i, prefix=f"expiring{i}:"))
        expiring.append(side)
    results = [side.recv(timeout=60) for side in loads]
    assert all(r["writes"] > 200 and r["error_count"] == 0 for r in results), results
    for side in expiring:
        side.recv(timeout=60)
    after = {h.label: _caches(h, name) for h in cluster3}
    for label in after:
        # (a round every 2 s, from each of the two other owners)
        assert after[label]["digest_rounds"] >= before[label]["digest_rounds"] + 6, (label, before, after)
        assert after[label]["digest_repairs"] == before[label]["digest_repairs"], (label, cluster3.logs()[-3000:])


def _as_member(member, kind, **fields):
    st = member.status()
    return protocol.pack(SECRET, dict(fields, t=kind, v=protocol.PROTOCOL, inc=st["incarnation"],
                                      n=st["numbered"] + 200, **{"from": st["node_id"]}))


def test_malformed_or_forged_digests_are_counted_and_dropped(cluster3):
    a, b, _ = cluster3
    name = cluster3.name
    counters = a.status()["counters"]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(a.listen)
    try:
        sock.send_multipart(_as_member(b, "digest", c=name, r=1, ps=[1, 2], d=[[1, 2, 1, 2]]))  # lengths differ
        sock.send_multipart(_as_member(b, "digest", c=name, r=2, ps=[3], d=[[1, -5, 1, 5]]))    # not a u64
        forged = _as_member(b, "digest", c=name, r=3, ps=[3], d=[[1, 5, 1, 5]])
        sock.send_multipart([b"\x00" * 32, forged[1]])                                 # a bad MAC
        # well-formed, but naming partitions that are none, or A's own: nothing to compare
        owners, _, parts = _roles(a)
        own = next(q for q in range(parts) if owners[q] == a.node_id)
        for rnd in (10, 11):
            sock.send_multipart(_as_member(b, "digest", c=name, r=rnd, ps=[60000, own],
                                           d=[[1, 1, 1, 1], [2**64 - 1] * 4]))
        eventually(lambda: a.status()["counters"]["malformed"] >= counters["malformed"] + 2
                   and a.status()["counters"]["unauthenticated"] >= counters["unauthenticated"] + 1, 10,
                   what="the bad digests were counted")
    finally:
        sock.close()
    assert a.bridge_alive() and a.status()["counters"]["apply_errors"] == counters["apply_errors"]
    a.put("after-bad-digests", 1)
    assert b.get("after-bad-digests") == 1
