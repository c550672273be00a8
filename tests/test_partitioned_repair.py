"""Sequenced partition streams and a restarted bridge, message by message.

A backup that sees a gap in its owner's backup records asks for a full copy (and
the copy replaces what it held); a handoff chunk after a gap is neither applied nor
acknowledged; a write routed by an older partition table is answered "retry"; a
bridge restarted at once keeps its table, and totals asked while it has no table
yet wait for it instead of failing.
"""
import pytest
from unittest.mock import ANY

from vela.bridge.quorum import Quorum

from cluster import eventually
from lone_member import parts  # noqa: F401 - a fixture
from test_partitioned_faults import SECRET, make_cluster

zmq = pytest.importorskip("zmq")

from vela import _native  # noqa: E402
from vela.bridge import protocol  # noqa: E402
from vela.ring import partition_of  # noqa: E402

KEYS = [f"key:{i}" for i in range(3000)]


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory):
    """One cluster for the tests below (each leaves it as it found it)."""
    c = make_cluster(tmp_path_factory.mktemp("repair"), backups=1)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def cluster_own(tmp_path):
    c = make_cluster(tmp_path, backups=1)
    try:
        yield c
    finally:
        c.close()


def _sender(host):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(host.listen)
    return sock


def _as_member(member, kind, **fields):
    """A message as bridge ``member`` sends it (its node id and incarnation, and a number
    a little past its latest: inside the receiver's replay window, so the member's own
    messages numbered in between are still taken)."""
    st = member.status()
    return protocol.pack(SECRET, dict(fields, t=kind, v=protocol.PROTOCOL, inc=st["incarnation"],
                                      n=st["numbered"] + 200, **{"from": st["node_id"]}))


def _partition_roles(host):
    view = host.cluster()
    return view["owners"], view["backups"], view["partitions"]


def test_a_gap_in_backup_records_brings_a_full_copy_that_replaces_the_backup(cluster3):
    a, b, _ = cluster3
    owners, backups, parts = _partition_roles(a)
    # a key of a partition B owns and A backs up, which B never wrote
    ghost = next(k for k in KEYS if owners[partition_of(_native.encode_key(k), parts)] == b.node_id
                 and backups[partition_of(_native.encode_key(k), parts)] == a.node_id)
    b.put("real", "kept")
    before = b.status()["caches"][cluster3.name]["repairs"]
    sock = _sender(a)
    try:
        # records "from B" that skip far ahead of what B sent: A applies them, sees the gap
        sock.send_multipart(_as_member(b, "brec", c=cluster3.name, seq=1000,
                                       recs=[[_native.encode_key(ghost), b"ghost", 0, 0, [], 2**40]]))
        eventually(lambda: b.status()["caches"][cluster3.name]["repairs"] > before, 10,
                   what="B was asked for a full copy")
        # the full copy replaces A's backup copy: the entry B never had is gone from A
        eventually(lambda: a.call("local_has", key=ghost) is False, 10,
                   what="A's backup copy is B's again")
    finally:
        sock.close()
    assert b.get(ghost) is None and a.get("real") == "kept"


def test_a_handoff_chunk_after_a_gap_is_not_taken(cluster3):
    a, b, _ = cluster3
    owners, _, parts = _partition_roles(a)
    key = next(k for k in KEYS if owners[partition_of(_native.encode_key(k), parts)] == a.node_id)
    p = partition_of(_native.encode_key(key), parts)
    gaps = a.status()["caches"][cluster3.name]["stream_gaps"]
    sock = _sender(a)
    try:
        # chunk 1 of a stream whose chunk 0 never came, claiming to complete it
        sock.send_multipart(_as_member(b, "hand", c=cluster3.name, sid=77, chunk=1, role="own", ps=[p], last=True,
                                       entries=[[_native.encode_key(key), b"\x80x", 3, 0, []]], vers=[2**50],
                                       tombs=[]))
        eventually(lambda: a.status()["caches"][cluster3.name]["stream_gaps"] == gaps + 1, 10,
                   what="A saw the gap")
    finally:
        sock.close()
    assert a.call("local_has", key=key) is False  # nothing of it was applied
    assert a.get(key) is None


def test_a_write_routed_by_an_older_table_is_answered_retry(cluster3):
    a, b, _ = cluster3
    owners, _, parts = _partition_roles(a)
    key = next(k for k in KEYS if owners[partition_of(_native.encode_key(k), parts)] == b.node_id)
    epoch = b.status()["ring_epoch"]
    assert epoch > 0
    addr = b.cluster()["addrs"][str(b.node_id)]
    a.put(key, "v")
    reply = a.call("raw_request", addr=addr, fields=dict(op="del", k_str=key, e=epoch - 1))
    assert "retry" in reply and "ok" not in reply
    assert a.get(key) == "v"
    reply = a.call("raw_request", addr=addr, fields=dict(op="del", k_str=key, e=epoch))
    assert reply.get("ok") is True
    assert a.get(key) is None


def test_a_bridge_restarted_at_once_keeps_its_table_and_totals_wait_for_it(cluster_own):
    a, b, c = cluster_own
    a.put_many([(k, i) for i, k in enumerate(KEYS[:900])])
    assert a.size() == 900
    b.kill_bridge()
    b.restart_bridge()  # (it answers "retry" to totals until it has a table)
    assert c.size() == 900  # not KeyError 'ok', not a part missing
    assert dict(c.call("get_many", keys=KEYS[:900])) == {k: i for i, k in enumerate(KEYS[:900])}
    assert b.status()["caches"][cluster_own.name]["kept"] > 0


# --------------------------------------------------------------------------------------
# one member's Partitions, in this process (no network): the rules themselves


def _key_of(parts, pick):
    return next(_native.encode_key(k) for k in KEYS if pick(partition_of(_native.encode_key(k), parts.parts)))


def test_member_restarted_copies_our_backups_on_it_again(parts):
    parts.sync_backups()
    on_2 = {p for p, b in parts.backup_synced.items() if b == 2}
    assert on_2
    parts.streams = []  # (the copies were sent and taken)
    parts.member_restarted(2)
    again = [s for s in parts.streams if s.target == 2 and s.role == "backup"]
    assert len(again) == 1 and again[0].ps == on_2
    assert not [s for s in parts.streams if s.target == 3]  # the other backup keeps its copy


def test_a_handoff_carries_tombstones_and_marks_that_win_over_older_copies(parts):
    table = parts.table
    mine = _key_of(parts, parts.mine)
    other = _key_of(parts, lambda p: not parts.mine(p) and parts.backup_of[p] != parts.me)
    tag = _native.tag_hash("t")
    old = table.next_version()
    table.apply_put(mine, b"\x80old", 3, 0, [tag], old)
    # a stream from member 2 (chunk 0, the last): a tombstone newer than our put, a mark
    # newer than an entry it carries with the tag
    p = partition_of(mine, parts.parts)
    newer = table.next_version() + 1000
    taken = parts.on_hand(2, 7, dict(c=parts.name, sid=1, chunk=0, role="own", ps=[p], last=True, entries=[],
                                     vers=[], tombs=[[mine, newer]], marks=[[tag, newer + 5]], fm=0))
    assert taken == [p]
    assert table.get_raw(mine) is None  # the delete won
    # an older put of the key arriving later is refused by the tombstone
    parts.on_hand(2, 7, dict(c=parts.name, sid=2, chunk=0, role="own", ps=[p], last=True,
                             entries=[[mine, b"\x80late", 3, 0, []]], vers=[newer - 1], tombs=[]))
    assert table.get_raw(mine) is None
    # the mark: an entry with the tag older than it is refused, a newer one kept
    assert parts.killed([tag], newer) and not parts.killed([tag], newer + 6)
    assert parts.on_brec(3, 9, 0, []) is False and parts.repairs == set()  # no records yet: no gap
    parts.on_brec(3, 9, 1, [[other, b"\x80x", 3, 0, [tag], newer]])
    assert table.get_raw(other) is None  # older than the mark: not kept
    parts.on_brec(3, 9, 2, [[other, b"\x80y", 3, 0, [tag], newer + 6]])
    assert table.get_raw(other)[0] == b"\x80y"  # newer: kept
    assert parts.repairs == set()
    parts.on_brec(3, 9, 4, [[other, b"\x80z", 3, 0, [], newer + 7]])  # seq 3 never came
    assert parts.repairs == {3}


def test_a_tag_invalidation_leaves_a_tombstone_that_refuses_an_older_copy_with_other_tags(parts):
    # The other side of a split wrote the key earlier with another tag; here a newer
    # write with tag t was invalidated: the heal must not bring the older copy back.
    table = parts.table
    mine = _key_of(parts, parts.mine)
    older, newer = table.next_version(), table.next_version() + 10
    table.apply_put(mine, b"\x80new", 3, 0, [_native.tag_hash("t")], newer)
    assert table.apply_tag(_native.tag_hash("t"), newer + 1) == 1
    assert table.get_raw(mine) is None
    assert not table.apply_put(mine, b"\x80old", 3, 0, [_native.tag_hash("u")], older)
    assert table.get_raw(mine) is None
    assert table.apply_put(mine, b"\x80later", 3, 0, [], newer + 2)  # a newer write is kept
    assert table.get_raw(mine)[0] == b"\x80later"


def test_a_local_cache_keeps_no_tombstone_after_a_tag_invalidation():
    import uuid

    import vela

    cache = vela.Cache(f"l{uuid.uuid4().hex[:8]}", capacity="4MiB", sweep_interval=None)
    try:
        cache.put("k", 1, tags=["t"])
        assert cache.invalidate_tag("t") == 1
        assert cache._table.scan(0, 10) == (None, [])  # (a scan shows tombstones too)
        assert cache.size() == 0 and cache.get("k") is None
    finally:
        cache.destroy()


@pytest.mark.parametrize("heard, known, majority", [
    ({1}, {1, 2, 3}, False),        # cut off from two of three
    ({2, 3}, {1, 2, 3}, True),      # the other side of that cut
    ({1, 2}, {1, 2, 3, 4}, True),   # an even split: the side with the smallest node id
    ({3, 4}, {1, 2, 3, 4}, False),
    ({1}, {1, 2}, True),            # two members: the first goes on alone
    ({2}, {1, 2}, False),
    ({5}, {5}, True),               # alone, and knowing nobody else
])
def test_has_majority(heard, known, majority):
    from vela.bridge.quorum import has_majority

    assert has_majority(min(heard), heard, known) is majority


def test_quorum_reports_the_spell_without_a_majority_when_it_ends():
    q = Quorum(2.0)
    assert q.update(1, {1}, {1, 2, 3}, now=10.0) is None and not q.writable
    assert q.update(1, {1}, {1, 2, 3}, now=11.0) is None and not q.writable
    assert q.update(1, {1, 2}, {1, 2, 3}, now=14.5) == 4.5 and q.writable


def test_a_member_without_a_majority_refuses_writes_and_serves_reads(parts, monkeypatch):
    mine = _key_of(parts, parts.mine)
    parts.table.apply_put(mine, b"\x80v", 3, 0, [], parts.table.next_version())
    monkeypatch.setattr(parts.node, "quorum", Quorum(2.0))
    parts.node.quorum.update(1, {1}, {1, 2, 3}, now=0.0)
    put = parts.serve(dict(op="put", k=mine, val=b"\x80w", codec=3, ttl=0, tags=[], e=1), lambda n: f"a{n}")
    assert put["err"] == "BridgeUnavailable" and "majority" in put["msg"]
    assert parts.serve(dict(op="incr", k=mine, delta=1, ttl=0, e=1), lambda n: f"a{n}")["err"] == "BridgeUnavailable"
    assert parts.serve(dict(op="get", k=mine), lambda n: f"a{n}")["val"] == b"\x80v"
    assert parts.view()["writable"] is False


def test_back_with_a_majority_its_partitions_wait_for_the_holder_before_an_incr(parts):
    mine = _key_of(parts, parts.mine)
    p = partition_of(mine, parts.parts)
    parts.table.apply_put(mine, b"\x80stale", 3, 0, [], parts.table.next_version())
    parts.regained({1, 2, 3}, settle=5.0, since=0.0)
    holder = parts.incoming[p].source
    assert holder in (2, 3) and parts.incoming[p].settling
    reply = parts.serve(dict(op="incr", k=mine, delta=1, ttl=0, e=1), lambda n: f"a{n}")
    assert "retry" in reply  # not counted from the copy kept through the split
    assert parts.serve(dict(op="get", k=mine), lambda n: f"a{n}") == {"fb": f"a{holder}", "ver": ANY}
    # the holder hands the partition back (its newer value wins), and the incr goes on
    taken = parts.on_hand(holder, 7, dict(c=parts.name, sid=1, chunk=0, role="own", ps=[p], last=True,
                                          entries=[[mine, b"\x80fresh", 3, 0, []]],
                                          vers=[parts.table.next_version()], tombs=[]))
    assert taken == [p] and p not in parts.incoming
    assert parts.table.get_raw(mine)[0] == b"\x80fresh"


def test_a_partition_handed_back_during_the_spell_does_not_settle_again(parts):
    import time

    mine = _key_of(parts, parts.mine)
    p = partition_of(mine, parts.parts)
    lost_at = time.monotonic()
    holder = 2 if 2 in parts.ring_members else 3
    parts.on_hand(holder, 7, dict(c=parts.name, sid=1, chunk=0, role="own", ps=[p], last=True,
                                  entries=[[mine, b"\x80fresh", 3, 0, []]], vers=[parts.table.next_version()],
                                  tombs=[]))
    parts.regained({1, 2, 3}, settle=5.0, since=lost_at)
    assert p not in parts.incoming  # (it came back before the majority did: an incr goes on at once)


def test_an_incr_is_acknowledged_only_once_its_backup_confirmed_the_record(parts):
    mine = _key_of(parts, lambda p: parts.mine(p) and parts.backup_of[p] not in (None, parts.me))
    p = partition_of(mine, parts.parts)
    backup = parts.backup_of[p]
    reply = parts.serve(dict(op="incr", k=mine, delta=1, ttl=0, e=1), lambda n: f"a{n}")
    assert reply["ok"] == 1
    wait = parts.take_wait()
    assert wait == {backup: parts.bseq.get(backup, 0) + 1} and not parts.backed_up(wait)
    (target, fields), = [m for m in parts.brec_messages(parts.take_outbound(10**9, 0)[0], False) if m[0] == backup]
    assert fields["seq"] == wait[backup] and fields["recs"][0][0] == mine
    parts.on_brack(backup, fields["seq"] - 1)
    assert not parts.backed_up(wait)
    parts.on_brack(backup, fields["seq"])
    assert parts.backed_up(wait)
    assert parts.take_wait() is None  # (asked once per request)


def test_with_backups_every_write_waits_for_each_backup_it_went_to(parts):
    # One putm and one delm over partitions backed up on both other members: the reply
    # waits for the two, each up to the record message that carries its keys.
    assert parts.sync_writes
    keys = {b: [_key_of(parts, lambda p, b=b: parts.mine(p) and parts.backup_of[p] == b)] for b in (2, 3)}
    both = keys[2] + keys[3]
    reply = parts.serve(dict(op="putm", items=[[k, b"\x80v", 3] for k in both], ttl=0, tags=[], e=1),
                        lambda n: f"a{n}")
    assert reply["ok"] is True and reply["redo"] == []
    wait = parts.take_wait()
    assert wait == {2: parts.bseq.get(2, 0) + 1, 3: parts.bseq.get(3, 0) + 1}
    sent = dict(parts.brec_messages(parts.take_outbound(10**9, 0)[0], False))
    parts.on_brack(2, sent[2]["seq"])
    assert not parts.backed_up(wait)  # the backup of the other key has not confirmed
    parts.on_brack(3, sent[3]["seq"])
    assert parts.backed_up(wait)
    assert parts.serve(dict(op="delm", ks=both, e=1), lambda n: f"a{n}")["ok"] == [True, True]
    assert set(parts.take_wait()) == {2, 3}
    # without a backup write (a read) the reply goes at once
    parts.serve(dict(op="get", k=both[0], e=1), lambda n: f"a{n}")
    assert parts.take_wait() is None


def test_a_backup_confirms_records_only_without_a_gap(parts):
    other = _key_of(parts, lambda p: not parts.mine(p))
    rec = [other, b"\x80x", 3, 0, [], parts.table.next_version()]
    assert parts.on_brec(2, 5, 0, []) is False          # nothing to confirm
    assert parts.on_brec(2, 5, 1, [rec]) is True
    assert parts.on_brec(2, 5, 3, [rec]) is False        # seq 2 never came: a repair, no ack
    assert parts.repairs == {2}


def test_a_copy_killed_by_a_mark_still_supersedes_the_older_one_held_here(parts):
    # Here: an old copy of the key (tag u). Elsewhere the key was written again with tag
    # t, and t was invalidated after that write: the newer write arrives killed by the
    # mark; the old copy must not stay (every other member has the key gone).
    table = parts.table
    mine = _key_of(parts, parts.mine)
    p = partition_of(mine, parts.parts)
    old = table.next_version()
    table.apply_put(mine, b"\x80old", 3, 0, [_native.tag_hash("u")], old)
    parts.take_marks([[_native.tag_hash("t"), old + 100]], 0)
    parts.on_hand(2, 7, dict(c=parts.name, sid=1, chunk=0, role="own", ps=[p], last=True,
                             entries=[[mine, b"\x80newer", 3, 0, [_native.tag_hash("t")]]], vers=[old + 50],
                             tombs=[]))
    assert table.get_raw(mine) is None
    assert not table.apply_put(mine, b"\x80old", 3, 0, [_native.tag_hash("u")], old + 10)  # stays out


def test_a_backup_that_owns_the_partition_now_does_not_confirm_the_former_owners_records(parts):
    # The former owner (cut off one way: it still hears us) goes on serving an incr and
    # waits for our confirmation; we took the partition over and ignore its record: no ack.
    mine = _key_of(parts, parts.mine)
    rec = [mine, b"\x80x", 3, 0, [], parts.table.next_version()]
    assert parts.on_brec(2, 5, 0, []) is False
    assert parts.on_brec(2, 5, 1, [rec]) is False
    assert parts.table.get_raw(mine) is None
