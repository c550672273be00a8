"""The partitioned topology between simulated hosts (tests/cluster.py): real
vela-bridge processes on loopback, real worker processes, one VELA_NAMESPACE per
host. Bridges run with a 0.2 s heartbeat and a 1 s failure timeout.

Every wait is bounded; every cluster is torn down whatever the test did to it.
"""
import collections
import signal
import time

import pytest

from cluster import Cluster, eventually

pytest.importorskip("zmq")

KEYS = [f"k{i}" for i in range(3000)]


def ready(cluster, hosts=None):
    """True when every given host's bridge has its partition table and no partition on its way."""
    for h in hosts or cluster.hosts:
        status = h.status() or {}
        if not status.get("caches", {}).get(cluster.name, {}).get("ready"):
            return False
    return True


def wait_ready(cluster, hosts=None, timeout=15.0):
    cluster.wait_members(hosts)
    eventually(lambda: ready(cluster, hosts), timeout, what="every bridge has its partition table")


def tables_agree(hosts):
    """True when the hosts route by the same partition table."""
    owners = [tuple(h.cluster().get("owners") or ()) for h in hosts]
    return owners[0] and all(o == owners[0] for o in owners)


def make_cluster(tmp_path, n=3, backups=0, async_backups=False, **cache_opts):
    extra = (["--backups", str(backups)] if backups else []) + (["--async-backups"] if async_backups else [])
    return Cluster(tmp_path, n=n, topology="partitioned", cache_opts=cache_opts, bridge_extra=extra)


@pytest.fixture
def cluster3(tmp_path):
    c = make_cluster(tmp_path)
    try:
        wait_ready(c)
        yield c
    finally:
        c.close()


def owned_by(host, node_id, keys):
    return [k for k in keys if host.call("owner", key=k)[0] == node_id]


# --------------------------------------------------------------------------------------
# every API call, with exact outcomes


def test_single_key_calls_mean_the_same_on_every_host(cluster3):
    a, b, c = cluster3
    eventually(lambda: tables_agree(cluster3), 5, what="one partition table")
    # a key owned by each member, written from another host, read from all three
    for owner in (a, b, c):
        key = next(k for k in KEYS if a.call("owner", key=k)[0] == owner.node_id)
        writer = b if owner is not b else c
        writer.put(key, {"owner": owner.label, "n": [1, 2]}, ttl=60, tags=["t1"])
        for h in cluster3:
            assert h.get(key) == {"owner": owner.label, "n": [1, 2]}
            assert h.call("exists", key=key) is True
            assert 58 < h.ttl(key) <= 60
        # the entry lives on its owner only
        assert owner.call("local_get", key=key) == [True, {"owner": owner.label, "n": [1, 2]}]
        for h in cluster3:
            if h is not owner:
                assert h.call("local_get", key=key) == [False, None]
        assert writer.touch(key, ttl=5) is True
        assert 4 < a.ttl(key) <= 5
        assert c.delete(key) is True
        assert c.delete(key) is False
        for h in cluster3:
            assert h.get(key, "absent") == "absent"
            assert h.call("exists", key=key) is False
        with pytest.raises(KeyError):
            b.ttl(key)
        assert a.touch(key) is False
    assert a.get("never-written") is None


def test_incr_is_atomic_on_the_owner_from_every_host(cluster3):
    a, b, c = cluster3
    assert a.incr("counter") == 1
    assert b.incr("counter", 10) == 11
    assert c.incr("counter", -2) == 9
    # 3 hosts x 200 increments at once
    for h in cluster3:
        h.send("try", method="incr", args=["warm"])
    for h in cluster3:
        assert h.recv()[0] == "ok"
    script = "for _ in range(200): cache.incr('many')"
    for h in cluster3:
        h.send("exec_loop", code=script)
    for h in cluster3:
        h.recv(60)
    for h in cluster3:
        assert h.get("many") == 600
    a.put("text", "not a number")
    kind, name, msg = b.call("try", method="incr", args=["text"])
    assert (kind, name) == ("raised", "TypeError")
    assert "not an integer" in msg
    b.put("big", 2**63 - 1)
    assert c.call("try", method="incr", args=["big"])[:2] == ["raised", "OverflowError"]
    assert a.get("big") == 2**63 - 1


def test_batches_are_grouped_per_owner(cluster3):
    a, b, c = cluster3
    items = [(f"b{i}", i * 3) for i in range(500)]
    assert a.put_many(items, tags=["batch"]) == 500
    got = dict(b.call("get_many", keys=[k for k, _ in items] + ["nope1", "nope2"]))
    assert got == dict(items)
    owners = collections.Counter(c.call("owner", key=k)[0] for k, _ in items)
    assert set(owners) == {1, 2, 3}  # the batch really spanned all three members
    assert c.call("delete_many", keys=[f"b{i}" for i in range(100)] + ["nope"]) == 100
    # bigger than one request may carry: cut in pieces
    big = [(f"big{i}", "x" * 300) for i in range(30_000)]
    assert a.put_many(big) == 30_000
    assert len(b.call("get_many", keys=[k for k, _ in big])) == 30_000
    assert c.call("delete_many", keys=[k for k, _ in big]) == 30_000
    assert len(a.call("get_many", keys=[k for k, _ in items])) == 400
    assert b.size() == 400
    assert sum(h.call("owned_entries") for h in cluster3) == 400


def test_size_stats_flush_and_tags_are_cluster_totals(cluster3):
    a, b, c = cluster3
    a.put_many([(f"s{i}", i) for i in range(300)], tags=["even"])
    b.put_many([(f"o{i}", i) for i in range(200)], tags=["odd"])
    assert c.size() == 500
    per_host = [h.call("owned_entries") for h in cluster3]
    assert sum(per_host) == 500 and all(n > 100 for n in per_host)
    for h in cluster3:
        h.call("try", method="reset_stats")
    for i in range(50):
        a.get(f"s{i}")
    for i in range(20):
        c.get(f"missing{i}")
    stats = b.stats()
    assert (stats["hits"], stats["misses"]) == (50, 20)
    assert stats["size"] == 500
    assert c.invalidate_tag("odd") == 200
    assert a.size() == 300 and b.get("o5") is None and b.get("s5") == 5
    assert b.invalidate_tag("odd") == 0
    assert a.flush() == 300
    assert c.size() == 0
    assert [h.get("s1") for h in cluster3] == [None, None, None]


def test_errors_from_a_remote_owner_reach_the_caller(tmp_path):
    c = make_cluster(tmp_path, n=2, max_entry_size="64KiB")
    try:
        wait_ready(c)
        a, b = c
        key = next(k for k in KEYS if a.call("owner", key=k)[0] == b.node_id)
        kind, name, msg = a.call("try", method="put", args=[key, "x" * 200_000])
        assert (kind, name) == ("raised", "ValueTooLarge")
        assert b.get(key) is None
        assert a.call("try", method="put", args=[key, "v"], kwargs={"tags": "single"})[:2] == \
            ["raised", "TypeError"]
        assert a.call("try", method="put", args=[[1, 2], "v"])[:2] == ["raised", "TypeError"]
        assert a.call("try", method="put", args=[key, "v"], kwargs={"ttl": -1})[:2] == ["raised", "ValueError"]
        assert b.get(key) is None
        assert a.call("try", method="put_many", args=[[[key, "ok"], [[1], "bad key"]]])[:2] == \
            ["raised", "TypeError"]
        assert b.get(key) is None  # nothing of the bad batch was stored
    finally:
        c.close()


# --------------------------------------------------------------------------------------
# routing


def test_keys_spread_evenly_over_members(cluster3):
    a, b, c = cluster3
    keys = [f"user:{i}" for i in range(10_000)]
    counts = a.call("owned_counts", keys=keys)
    assert sorted(counts) == ["1", "2", "3"]
    for n in counts.values():
        assert abs(n - 10_000 / 3) <= 0.15 * 10_000 / 3, counts
    # and that is where they are stored
    for i in range(0, 10_000, 1000):
        a.put_many([(k, 1) for k in keys[i:i + 1000]])
    stored = {str(h.node_id): h.call("owned_entries") for h in cluster3}
    assert stored == counts


def test_status_and_inspect_show_the_partitions(cluster3):
    import subprocess
    import sys

    a, b, c = cluster3
    eventually(lambda: tables_agree(cluster3), 5, what="one partition table")
    owned = [h.status()["caches"][cluster3.name]["owned"] for h in cluster3]
    assert sum(owned) == 271 and max(owned) - min(owned) <= 1
    out = subprocess.run([sys.executable, "-m", "vela.cli", "inspect", cluster3.name], env=a.env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    counts = sorted(a.cluster()["owners"].count(n) for n in (1, 2, 3))
    assert f"partitions: 271, owned per node: 1: {a.cluster()['owners'].count(1)}" in out.stdout
    assert counts == sorted(owned)
    status = a.cli("status", "--cache", cluster3.name)
    assert status.returncode == 0 and '"owned"' in status.stdout


def test_a_member_that_does_not_own_the_key_answers_moved(cluster3):
    a, b, c = cluster3
    key = next(k for k in KEYS if a.call("owner", key=k)[0] == c.node_id)
    a.put(key, "here")
    for addr in (b.data_addr,):  # (the ROUTER takes workers' requests only with CURVE keys)
        reply = a.call("raw_request", addr=addr, fields={"op": "get", "k_str": key})
        assert reply["moved"] == c.data_addr
        assert "val" not in reply
    reply = a.call("raw_request", addr=c.data_addr, fields={"op": "get", "k_str": key})
    assert (reply["val"], reply["codec"]) == (b"here".hex(), 1)  # codec 1: str, as UTF-8


def test_a_stopped_owner_is_replaced_and_comes_back_with_the_newer_values(tmp_path):
    c = make_cluster(tmp_path, n=2)
    try:
        wait_ready(c)
        a, b = c
        key = next(k for k in KEYS if a.call("owner", key=k)[0] == b.node_id)
        a.put(key, 1)
        b.pause()  # SIGSTOP: connected, silent
        t = time.monotonic()
        assert a.call("try", method="get", args=[key]) == ["ok", None]  # B declared dead: a miss
        assert time.monotonic() - t < 3.0 + 1.0  # within topology_opts timeout (3 s)
        a.put(key, 2)  # A owns the partition now
        assert a.get(key) == 2
        b.resume()  # B notices its stall and comes back as a new incarnation
        eventually(lambda: ready(c) and tables_agree(c) and len(set(a.cluster()["owners"])) == 2, 10,
                   what="B back in the ring")
        assert a.call("owner", key=key)[0] == b.node_id
        assert a.get(key) == 2 and b.get(key) == 2  # handed back to B, not B's stale 1
    finally:
        c.close()


def test_without_its_bridge_a_host_gets_bridge_unavailable_not_a_hang(tmp_path):
    c = make_cluster(tmp_path, n=2)
    try:
        wait_ready(c)
        a, b = c
        b.kill_bridge(signal.SIGKILL)
        time.sleep(2.0)  # the last view it published grows stale (3 heartbeats + 1 s)
        t = time.monotonic()
        kind, name, msg = b.call("try", method="get", args=["any"])
        assert (kind, name) == ("raised", "BridgeUnavailable")
        assert "publishes no partition table" in msg
        assert time.monotonic() - t < 3.0 + 2.0
        # Of two members, the one with the smallest node id is a majority alone: it goes on.
        assert a.call("try", method="put", args=["any", 1]) == ["ok", None]
        assert a.get("any") == 1
    finally:
        c.close()


@pytest.mark.parametrize("on_split", ["refuse", "continue"])
def test_a_member_that_hears_no_majority_refuses_writes_unless_told_to_continue(tmp_path, on_split):
    c = Cluster(tmp_path, n=2, topology="partitioned", bridge_extra=["--on-split", on_split])
    try:
        wait_ready(c)
        a, b = c
        mine = owned_by(b, b.node_id, [f"k{i}" for i in range(200)])[0]  # a key B owns
        b.put(mine, "before")
        a.kill_bridge(signal.SIGKILL)
        eventually(lambda: b.member_states().get(a.node_id) != "alive", 10, what="B no longer hears A")
        if on_split == "refuse":
            # B alone is half of two without the smallest node id: it writes nothing, not
            # even the partitions it owns, and reads go on.
            eventually(lambda: b.call("try", method="put", args=[mine, "after"])[:2]
                       == ["raised", "BridgeUnavailable"], 10, what="B refuses writes")
            kind, name, msg = b.call("try", method="put", args=[mine, "after"])
            assert "does not hear a majority" in msg
            assert b.get(mine) == "before"
        else:
            eventually(lambda: b.call("try", method="put", args=[mine, "after"]) == ["ok", None], 10,
                       what="B writes alone")
            assert b.get(mine) == "after"
    finally:
        c.close()


# --------------------------------------------------------------------------------------
# ring changes


def _verify_load(hosts, results):
    """Every key's last written value, read from every host."""
    last = {}
    for r in results:
        assert r["error_count"] == 0, r["errors"]
        last.update(r["last"])
    assert last
    for h in hosts:
        got = dict(h.call("get_many", keys=sorted(last)))
        stale = {k: (v, got.get(k)) for k, v in last.items() if got.get(k) != v}
        assert not stale, f"host {h.label}: {len(stale)} lost or stale, e.g. {list(stale.items())[:3]}"


def test_graceful_leave_and_join_under_load_lose_nothing(cluster3):
    a, b, c = cluster3
    a.put_many([(k, i) for i, k in enumerate(KEYS)])
    stable = [[k, i] for i, k in enumerate(KEYS)]  # read all along: never a miss, never another value
    # writers on A and B use disjoint keys (each key has one writer: "last value" is exact)
    a.send("load", prefix="la", keys=300, seconds=5.0, writer=1, stable=stable)
    b.send("load", prefix="lb", keys=300, seconds=5.0, writer=2, stable=stable)
    time.sleep(1.0)
    assert c.kill_bridge(signal.SIGTERM) == 0  # leave: hand everything off first
    results = [a.recv(30), b.recv(30)]
    eventually(lambda: ready(cluster3, [a, b]) and tables_agree([a, b]), 10, what="A and B settled")
    assert set(a.cluster()["owners"]) == {1, 2}
    _verify_load([a, b], results)
    assert dict(b.call("get_many", keys=KEYS)) == {k: i for i, k in enumerate(KEYS)}
    assert a.size() == 3000 + len(results[0]["last"]) + len(results[1]["last"])

    # join again, under load
    a.send("load", prefix="ja", keys=300, seconds=4.0, writer=3, stable=stable)
    b.send("load", prefix="jb", keys=300, seconds=4.0, writer=4, stable=stable)
    time.sleep(0.5)
    c.restart_bridge()
    results2 = [a.recv(30), b.recv(30)]
    wait_ready(cluster3)
    eventually(lambda: tables_agree(cluster3), 10, what="one partition table")
    assert set(c.cluster()["owners"]) == {1, 2, 3}
    _verify_load(cluster3, results + results2)
    for h in cluster3:
        assert dict(h.call("get_many", keys=KEYS)) == {k: i for i, k in enumerate(KEYS)}
    assert c.call("owned_entries") > 500  # C holds its share again
    total = sum(h.call("owned_entries") for h in cluster3)
    assert total == a.size()


def test_a_killed_owner_costs_its_keys_and_nothing_else(cluster3):
    a, b, c = cluster3
    a.put_many([(k, i) for i, k in enumerate(KEYS)])
    on_c = set(owned_by(a, c.node_id, KEYS))
    assert 700 < len(on_c) < 1300
    c.kill_bridge(signal.SIGKILL)
    # Calls issued at once wait for the others to notice (failure timeout 1 s), then get
    # their answer from the partition's new owner: a miss, before the call's 3 s timeout.
    assert a.call("try", method="get", args=[sorted(on_c)[1]]) == ["ok", None]
    assert b.call("try", method="put_many", args=[{k: "again" for k in sorted(on_c)[2:5]}]) == ["ok", None]
    assert b.call("try", method="size")[0] == "ok"  # (exact once partitions stop moving, below)
    # within the failure timeout (1 s) plus a heartbeat, the others take C's partitions
    eventually(lambda: set(a.cluster()["owners"]) == {1, 2} and set(b.cluster()["owners"]) == {1, 2}, 5,
               what="C out of the ring")
    eventually(lambda: ready(cluster3, [a, b]) and tables_agree([a, b]), 10, what="no partition on its way")
    assert b.size() == len(KEYS) - len(on_c) + 3
    got = dict(a.call("get_many", keys=KEYS))
    rewritten = set(sorted(on_c)[2:5])
    assert {k for k in KEYS if k not in got} == on_c - rewritten  # misses, exactly C's keys
    assert all(got[k] == ("again" if k in rewritten else i) for i, k in enumerate(KEYS) if k in got)
    assert b.get(sorted(on_c)[0]) is None
    b.put(sorted(on_c)[0], "rewritten")  # the partition has a new owner that takes writes
    assert a.get(sorted(on_c)[0]) == "rewritten"


def test_with_backups_a_killed_owner_loses_nothing(tmp_path):
    c = make_cluster(tmp_path, backups=1)
    try:
        wait_ready(c)
        a, b, cc = c
        a.put_many([(k, i) for i, k in enumerate(KEYS)])
        a.put("counter", 0)
        for _ in range(5):
            b.incr("counter")
        eventually(lambda: sum(h.status()["caches"][c.name]["backup_records"] for h in c) >= 3006, 5,
                   what="backup copies made")
        # every entry is on two hosts, its owner's and its backup's, with the same value and
        # the owner's version (so two copies meet by the owner's order)
        copies = collections.Counter((e[0], e[1], e[4]) for h in c for e in h.call("dump"))
        assert len(copies) == 3001 and set(copies.values()) == {2}
        cc.kill_bridge(signal.SIGKILL)
        # Issued at once, while B's table still names C (its connection refused): the batch
        # is sent again by the table without C (failure timeout 1 s, call timeout 3 s).
        assert dict(b.call("get_many", keys=KEYS)) == {k: i for i, k in enumerate(KEYS)}
        eventually(lambda: ready(c, [a, b]) and tables_agree([a, b]) and set(a.cluster()["owners"]) == {1, 2}, 10,
                   what="C out")
        assert dict(b.call("get_many", keys=KEYS)) == {k: i for i, k in enumerate(KEYS)}
        assert a.get("counter") == 5
        assert a.size() == 3001
        promoted = sum(h.status()["caches"][c.name]["promoted"] for h in (a, b))
        assert promoted > 0
        # new backups were made for the partitions' new owners: a second death costs nothing
        eventually(lambda: all(not h.status()["caches"][c.name]["streams"] for h in (a, b)), 10,
                   what="backup copies to the new backups")
        b.kill_bridge(signal.SIGKILL)
        eventually(lambda: ready(c, [a]) and set(a.cluster()["owners"]) == {1}, 10, what="B out")
        assert dict(a.call("get_many", keys=KEYS)) == {k: i for i, k in enumerate(KEYS)}
    finally:
        c.close()


def _copies(hosts, keys):
    """{key: [(host, value hex, version)]} of ``keys`` (str) in the hosts' tables."""
    from vela import _native

    wanted = {_native.encode_key(k).hex(): k for k in keys}
    out = {k: [] for k in keys}
    for h in hosts:
        for key_hex, value_hex, _codec, _tags, version in h.call("dump"):
            if key_hex in wanted:
                out[wanted[key_hex]].append((h.label, value_hex, version))
    return out


def test_with_backups_a_write_returns_once_the_backup_holds_it(tmp_path):
    c = make_cluster(tmp_path, backups=1)
    try:
        wait_ready(c)
        a, b, cc = c
        mine = owned_by(a, a.node_id, KEYS[:300])[:40]
        other = owned_by(a, b.node_id, KEYS[300:600])[:10]
        before = a.status()["caches"][c.name]
        # one call per kind of write, to a key of this host and to keys of another
        a.put(mine[0], "one")
        a.put_many([(k, k) for k in mine[1:20] + other])
        assert a.delete(mine[1]) is True
        assert a.call("delete_many", keys=mine[2:4] + other[:2]) == 4
        assert a.call("touch", key=mine[4], ttl=60) is True
        # nothing was written in place: this host's bridge made the writes of its own partitions
        after = a.status()["caches"][c.name]
        assert after["local_writes"] == before["local_writes"]
        assert after["requests"] - before["requests"] >= 5  # (one more per "retry" answer)
        # and each call returned once the backup held what it wrote: no waiting here
        expected = {k: k for k in mine[1:20] + other}
        expected[mine[0]] = "one"
        for k in mine[1:4] + other[:2]:
            del expected[k]
        copies = _copies(c, list(expected) + mine[1:4] + other[:2])
        assert {k: len(copies[k]) for k in expected} == {k: 2 for k in expected}
        assert all(len({(v, ver) for _, v, ver in copies[k]}) == 1 for k in expected)
        assert all(copies[k] == [] for k in mine[1:4] + other[:2])
        assert a.call("ttl", key=mine[4])[1] > 59
    finally:
        c.close()


def test_with_async_backups_a_host_writes_its_own_partitions_in_place(tmp_path):
    c = make_cluster(tmp_path, backups=1, async_backups=True)
    try:
        wait_ready(c)
        a, b, cc = c
        mine = owned_by(a, a.node_id, KEYS[:600])
        other = owned_by(a, b.node_id, KEYS[600:700])[0]
        a.put(other, "remote")
        before = a.status()["caches"][c.name]
        a.put_many([(k, i) for i, k in enumerate(mine)])
        a.put(mine[0], "again")
        assert a.delete(mine[1]) is True and a.delete(mine[1]) is False
        assert a.call("delete_many", keys=mine[2:4] + [other]) == 3
        after = a.status()["caches"][c.name]
        # made in the shared table, without a request to this host's bridge (the key of B
        # went to B's); the bridge read them from the change log (a delete of nothing is
        # logged too: its tombstone keeps an older copy elsewhere from coming back)
        assert after["requests"] == before["requests"]
        eventually(lambda: a.status()["caches"][c.name]["local_writes"] - before["local_writes"]
                   == len(mine) + 5, 5, what="the bridge read the writes made in place")
        expected = {k: i for i, k in enumerate(mine)}
        expected[mine[0]] = "again"
        for k in mine[1:4]:
            del expected[k]
        assert dict(b.call("get_many", keys=mine)) == expected
        assert cc.get(mine[0]) == "again" and cc.get(mine[1]) is None and b.get(other) is None
        # the backup holds the same entries, with the owner's versions; the deleted key is gone
        def backed_up():
            copies = _copies(c, mine)
            return (all(len(copies[k]) == 2 and len({(v, ver) for _, v, ver in copies[k]}) == 1
                        for k in expected) and all(copies[k] == [] for k in mine[1:4]))
        eventually(backed_up, 5, what="backup copies of the writes made in place")
    finally:
        c.close()


def test_a_change_log_that_ran_over_the_bridge_copies_backups_again(tmp_path):
    c = make_cluster(tmp_path, backups=1, async_backups=True)
    try:
        wait_ready(c)
        a, b, cc = c
        mine = owned_by(a, a.node_id, [f"flood:{i}" for i in range(6000)])
        # 8 MB of writes while the bridge reads nothing: more than the log holds (4 MiB)
        flood = [[k, "x" * 4000 + k] for k in mine]
        a.pause()
        try:
            written = a.call("write_in_place", items=flood)
        finally:
            a.resume()
        assert written == len(flood)
        eventually(lambda: a.status()["caches"][c.name]["log_lapped"] == 1, 5, what="the overrun noticed")
        keys = [k for k, _ in flood]

        def copied_again():
            copies = _copies(c, keys[-300:] + keys[:300])
            return all(len(v) == 2 and len({(val, ver) for _, val, ver in v}) == 1 for v in copies.values())
        eventually(copied_again, 15, what="full backup copies after the overrun")
        assert a.status()["caches"][c.name]["log_lapped"] == 1
    finally:
        c.close()


# --------------------------------------------------------------------------------------
# stampede and near cache


def test_get_or_fetch_runs_once_in_the_whole_cluster(cluster3):
    a, b, c = cluster3
    start_at = time.time() + 1.0
    for h, n in ((a, 3), (b, 3), (c, 2)):
        h.send("workers", scripts=[{"kind": "fetch", "key": "hot", "start_at": start_at, "seed": i,
                                    "ops": 0, "keys": 1, "label": h.label} for i in range(n)])
    results = [r for h in cluster3 for r in h.recv(60)]
    assert len(results) == 8
    assert [v for v, _ in results] == ["v"] * 8
    assert sum(n for _, n in results) == 1
    assert a.stats()["fetches"] == 1


def test_a_fetch_holder_that_dies_is_replaced_at_once(cluster3):
    import os

    a, b, c = cluster3
    key = next(k for k in KEYS if a.call("owner", key=k)[0] == b.node_id)  # the lease lives on B
    pid = a.call("hold_fetch", key=key)
    assert b.status()["caches"][cluster3.name]["leases"] == 1
    os.kill(pid, 9)  # SIGKILL mid-fetch: its connection to B's data port closes with it
    result, seconds, fetched = c.call("timed_fetch", key=key, value="from C")
    assert (result, fetched) == ("from C", True)
    assert seconds < 3.0  # not the lease's 30 s, nor the waiter's 5 s stampede_timeout
    assert a.get(key) == "from C"


def test_near_cache_copies_drop_after_a_write_on_the_owner(tmp_path):
    c = make_cluster(tmp_path, near_cache=True, near_cache_l1_ttl=30)
    try:
        wait_ready(c)
        a, b, cc = c
        key = next(k for k in KEYS if a.call("owner", key=k)[0] == b.node_id)
        b.put(key, "v1")
        # A read copies the value into L1 (unless the put's own invalidation, still on its
        # way, voids that first fill: then the next read copies it)
        for h in (a, cc):
            eventually(lambda: h.get(key) == "v1" and h.call("local_get", key=key) == [True, "v1"], 2,
                       interval=0.01, what=f"an L1 copy on {h.label}")
        b.put(key, "v2")
        eventually(lambda: a.call("local_get", key=key)[0] is False and cc.call("local_get", key=key)[0] is False,
                   2, interval=0.01, what="L1 copies dropped")
        assert a.get(key) == "v2" and cc.get(key) == "v2"
        cc.delete(key)
        eventually(lambda: a.call("local_get", key=key)[0] is False, 2, interval=0.01, what="dropped on delete")
        assert a.get(key) is None
        # get_many keeps copies too
        others = [k for k in KEYS[:200] if a.call("owner", key=k)[0] != a.node_id][:20]
        b.put_many([(k, k.upper()) for k in others])
        eventually(lambda: dict(a.call("get_many", keys=others)) == {k: k.upper() for k in others}
                   and all(a.call("local_get", key=k) == [True, k.upper()] for k in others), 2, interval=0.01,
                   what="L1 copies from get_many")
        a.put(key, "v3")
        b.flush()
        eventually(lambda: cc.call("local_get", key=key)[0] is False, 2, what="dropped on flush")
    finally:
        c.close()


def test_a_worker_writes_nothing_in_place_once_its_bridge_was_killed(tmp_path):
    # Before, for up to half the failure timeout (the view's age), a write to a partition
    # the host owns was made in place and acknowledged though no bridge would ever send
    # it to the backup; the others took the partition over without it.
    c = make_cluster(tmp_path, n=2, topology_opts={"timeout": 1.0})
    try:
        wait_ready(c)
        a, b = c
        mine = owned_by(b, b.node_id, [f"k{i}" for i in range(200)])[0]
        assert b.call("try", method="put", args=[mine, "before"]) == ["ok", None]
        b.kill_bridge(signal.SIGKILL)
        reply = b.call("try", method="put", args=[mine, "after"])  # at once: the view is still fresh
        assert reply[:2] == ["raised", "BridgeUnavailable"]
    finally:
        c.close()
