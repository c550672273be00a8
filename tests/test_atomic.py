"""Atomic primitives beyond the contract suite: compare-and-set and replace under real
concurrency on the shared table, what cas compares, and the owner's side of a
partitioned cas (the bridge delegate, its backup record and the wire format).

The contract suite (test_contract.py) runs replace, cas, the cas-increment loops and
incr's initial value on every store, partitioned and Redis included.
"""
import os

import pytest

import vela
from conftest import FORK, run_children

from test_partitioned_repair import _key_of, parts  # noqa: E402,F401  (the delegate fixture)
from vela import _native  # noqa: E402
from vela.bridge import protocol  # noqa: E402
from vela.ring import partition_of  # noqa: E402

PROCESSES = 6
INCREMENTS = 300
BARRIER_TIMEOUT = 30


# ---- many processes on one shared table -------------------------------------------------


def _cas_loop(name, key, times, barrier):
    """``times`` increments by get + cas, retried on a mismatch; the attempts made."""
    attempts = 0
    with vela.Cache(name) as c:
        barrier.wait(BARRIER_TIMEOUT)
        for _ in range(times):
            while True:
                attempts += 1
                seen = c.get(key)
                # Give the CPU away between the read and the cas: the other loops read the
                # same value meanwhile (a get + put loop loses most updates this way).
                os.sched_yield()
                if c.cas(key, seen, seen + 1):
                    break
    return attempts


def test_cas_increment_loops_of_many_processes_lose_no_update(cache_name):
    with vela.Cache(cache_name, capacity="8MiB") as c:
        c.put("ctr", 0)
        c.stats(reset=True)
        barrier = FORK.Barrier(PROCESSES)
        attempts = run_children(_cas_loop, [(cache_name, "ctr", INCREMENTS, barrier)] * PROCESSES, timeout=120)
        assert c.get("ctr") == PROCESSES * INCREMENTS
        assert min(attempts) >= INCREMENTS
        assert sum(attempts) > PROCESSES * INCREMENTS  # the loops did collide: cas said no
        # a cas that stored counts as a write, one that did not counts nothing
        assert c.stats()["writes"] == PROCESSES * INCREMENTS
        assert c.check() == []


def _cas_once(name, key, expected, new, barrier):
    with vela.Cache(name) as c:
        barrier.wait(BARRIER_TIMEOUT)
        return c.cas(key, expected, new)


def test_of_concurrent_cas_from_one_value_exactly_one_wins(cache_name):
    with vela.Cache(cache_name, capacity="8MiB") as c:
        c.put("race", "start", tags=["kept"])
        barrier = FORK.Barrier(PROCESSES)
        results = run_children(_cas_once, [(cache_name, "race", "start", f"p{i}", barrier)
                                           for i in range(PROCESSES)], timeout=60)
        assert results.count(True) == 1, results
        assert c.get("race") == f"p{results.index(True)}"
        assert c.invalidate_tag("kept") == 1


def _replace_loop(name, key, i, times, barrier):
    with vela.Cache(name) as c:
        barrier.wait(BARRIER_TIMEOUT)
        return sum(c.replace(key, (i, n)) for n in range(times))


def test_replace_stores_only_while_the_key_lives(cache_name):
    # Replacers race one another; the key was never there for a second: nobody stores.
    with vela.Cache(cache_name, capacity="8MiB") as c:
        barrier = FORK.Barrier(PROCESSES)
        stored = run_children(_replace_loop, [(cache_name, "ghost", i, 100, barrier)
                                              for i in range(PROCESSES)], timeout=60)
        assert stored == [0] * PROCESSES
        assert "ghost" not in c
        c.put("here", "x")
        barrier = FORK.Barrier(PROCESSES)
        stored = run_children(_replace_loop, [(cache_name, "here", i, 100, barrier)
                                              for i in range(PROCESSES)], timeout=60)
        assert stored == [100] * PROCESSES
        assert c.get("here")[1] == 99  # the last replace of one of them
        assert c.size() == 1


# ---- what cas compares ------------------------------------------------------------------


def test_cas_compares_the_stored_encoding_not_python_equality(cache):
    cache.put("d", {"a": 1, "b": 2})
    # equal dicts, another insertion order: another pickle, no match (documented)
    assert cache.cas("d", {"b": 2, "a": 1}, "x") is False
    assert cache.cas("d", {"a": 1, "b": 2}, "x") is True
    # an int is stored as a 64-bit word, a big int pickled: each compares with its own kind
    cache.put("big", 2 ** 70)
    assert cache.cas("big", 2 ** 70, 1) is True
    assert cache.cas("big", 1.0, 2) is False  # 1.0 == 1 in Python, not as stored
    assert cache.cas("big", True, 2) is False
    assert cache.get("big") == 1


def test_cas_on_a_handle_with_another_serializer_compares_its_encoding(cache_name):
    with vela.Cache(cache_name, capacity="8MiB", serializer="json") as j, vela.Cache(cache_name) as p:
        j.put("k", [1, 2])
        assert p.cas("k", [1, 2], "pickled") is False  # a pickle of [1, 2] is not its JSON
        assert j.cas("k", [1, 2], [3]) is True
        assert p.get("k") == [3]


# ---- the owner's side of a partitioned cas (one member's delegate, no network) ----------


def _serve(parts, **fields):
    return parts.serve(dict(fields, e=1), lambda n: f"a{n}")


def test_a_cas_is_acknowledged_only_once_its_backup_confirmed_the_record(parts):
    mine = _key_of(parts, lambda p: parts.mine(p) and parts.backup_of[p] not in (None, parts.me))
    backup = parts.backup_of[partition_of(mine, parts.parts)]
    tag = _native.tag_hash("t")
    assert _serve(parts, op="put", k=mine, val=b"old", codec=_native.CODEC_BYTES, ttl=0, tags=[tag])["ok"]
    parts.take_outbound(10**9, 0)  # (the put's record went)
    reply = _serve(parts, op="cas", k=mine, xval=b"old", xcodec=_native.CODEC_BYTES, val=b"new",
                   codec=_native.CODEC_BYTES, ttl=0, tags=[])
    assert reply["ok"] is True
    wait = parts.take_wait()
    assert wait is not None and not parts.backed_up(wait)
    (target, fields), = [m for m in parts.brec_messages(parts.take_outbound(10**9, 0)[0], False)
                         if m[0] == backup]
    (rec,) = fields["recs"]
    assert rec[:5] == [mine, b"new", _native.CODEC_BYTES, 0, [tag]]  # the backup learns the tag kept
    parts.on_brack(backup, fields["seq"])
    assert parts.backed_up(wait)
    assert parts.table.get_raw(mine, False)[:2] == (b"new", _native.CODEC_BYTES)


def test_a_cas_or_replace_that_does_not_hold_writes_nothing_and_waits_for_nothing(parts):
    mine = _key_of(parts, lambda p: parts.mine(p) and parts.backup_of[p] not in (None, parts.me))
    assert _serve(parts, op="repl", k=mine, val=b"v", codec=_native.CODEC_BYTES, ttl=0, tags=[])["ok"] is False
    assert _serve(parts, op="cas", k=mine, xval=b"v", xcodec=_native.CODEC_BYTES, val=b"w",
                  codec=_native.CODEC_BYTES, ttl=0, tags=[])["ok"] is False
    assert parts.take_wait() is None
    assert parts.take_outbound(10**9, 0) == ({}, [])
    assert parts.table.get_raw(mine, False) is None
    _serve(parts, op="put", k=mine, val=b"v", codec=_native.CODEC_BYTES, ttl=0, tags=[])
    # the same bytes under another codec are another value
    assert _serve(parts, op="cas", k=mine, xval=b"v", xcodec=_native.CODEC_STR, val=b"w",
                  codec=_native.CODEC_BYTES, ttl=0, tags=[])["ok"] is False
    assert _serve(parts, op="repl", k=mine, val=b"r", codec=_native.CODEC_STR, ttl=0, tags=[])["ok"] is True
    assert parts.table.get_raw(mine, False)[:2] == (b"r", _native.CODEC_STR)


def test_an_incr_request_carries_the_initial_value(parts):
    mine = _key_of(parts, parts.mine)
    assert _serve(parts, op="incr", k=mine, delta=2, ttl=0, init=40)["ok"] == 42
    assert _serve(parts, op="incr", k=mine, delta=1, ttl=0, init=1000)["ok"] == 43


GOOD_CAS = dict(op="cas", c="c", id=1, e=1, k=_native.encode_key("k"), xval=b"a", xcodec=0, val=b"b", codec=0,
                ttl=0, tags=[])


@pytest.mark.parametrize("change", [
    dict(xval=None), dict(xval="str"), dict(xcodec=_native.CODEC_TOMBSTONE), dict(xcodec=-1),
    dict(val=None), dict(ttl=-1), dict(tags=None),
], ids=lambda c: ",".join(f"{k}={v!r}" for k, v in c.items()))
def test_a_malformed_cas_request_is_refused(change):
    msg = dict(GOOD_CAS, **change)
    msg = {k: v for k, v in msg.items() if v is not None}
    with pytest.raises(protocol.Malformed):
        protocol._CHECKS["req"](msg)


def test_well_formed_cas_replace_and_incr_requests_pass():
    protocol._CHECKS["req"](dict(GOOD_CAS))
    protocol._CHECKS["req"]({k: v for k, v in GOOD_CAS.items() if k not in ("xval", "xcodec")} | {"op": "repl"})
    incr = dict(op="incr", c="c", id=1, e=1, k=b"k", delta=1, ttl=0)
    protocol._CHECKS["req"](incr)  # (no "init": a worker of the release before starts at 0)
    protocol._CHECKS["req"](dict(incr, init=-2**63))
    for bad in ("1", 2**63, True):
        with pytest.raises(protocol.Malformed):
            protocol._CHECKS["req"](dict(incr, init=bad))


# ---- telemetry --------------------------------------------------------------------------


def test_replace_and_cas_emit_put_events_with_their_result(cache):
    seen = []

    def handler(event, measurements, metadata):
        seen.append((event[-2], metadata["key"], metadata["result"]))

    vela.telemetry.attach("atomic-trace", [("vela", "cache", "put", "stop")], handler)
    try:
        cache.replace("k", 1)
        cache.add("k", 1)
        cache.replace("k", 2)
        cache.cas("k", 1, 3)
        cache.cas("k", 2, 3)
    finally:
        vela.telemetry.detach("atomic-trace")
    assert seen == [("put", "k", False), ("put", "k", True), ("put", "k", True), ("put", "k", False),
                    ("put", "k", True)]
    assert cache.get("k") == 3
