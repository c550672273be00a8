"""The replicated topology between simulated hosts: real vela-bridge processes over
ZeroMQ on loopback, real worker processes, one VELA_NAMESPACE per host (tests/cluster.py).

Every wait is bounded ("eventually within N s"); every cluster is torn down (bridges,
agents, segments) whatever the test did to it. The bridges run with a 0.2 s heartbeat
and a 1 s failure timeout so that deaths and rejoins happen quickly.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cluster import FAILURE_TIMEOUT, Cluster, eventually

pytest.importorskip("zmq")


@pytest.fixture
def cluster3(tmp_path):
    c = Cluster(tmp_path, n=3)
    try:
        c.wait_members()
        c.wait_ready()  # (a bridge that just started answers flush and invalidate_tag "not ready")
        yield c
    finally:
        c.close()


def everywhere(cluster, fn, timeout=10.0, what="condition on every host"):
    """Until fn(host) is truthy on every host."""
    return eventually(lambda: all(fn(h) for h in cluster), timeout, what=what)


# --------------------------------------------------------------------------------------
# the stream


def test_write_on_one_host_is_readable_on_the_others(cluster3):
    a, b, c = cluster3
    a.put("greeting", "hello from A")
    everywhere(cluster3, lambda h: h.get("greeting") == "hello from A", 5, "A's write on B and C")
    b.put_many([(f"b{i}", i) for i in range(200)])
    eventually(lambda: a.call("count_present", keys=[f"b{i}" for i in range(200)]) == 200
               and c.call("count_present", keys=[f"b{i}" for i in range(200)]) == 200, 5,
               what="B's 200 writes on A and C")
    c.put("from-c", {"nested": [1, 2, 3]}, tags=["t"])
    everywhere(cluster3, lambda h: h.get("from-c") == {"nested": [1, 2, 3]}, 5, "C's write everywhere")
    dump = cluster3.wait_converged(expect=202)
    assert any(bytes.fromhex(e[0]).endswith(b"from-c") for e in dump)


def test_delete_incr_touch_and_ttl_travel(cluster3):
    a, b, c = cluster3
    a.put("d", "doomed")
    everywhere(cluster3, lambda h: h.has("d"), 5)
    assert b.delete("d") is True
    everywhere(cluster3, lambda h: not h.has("d"), 5, "B's delete everywhere")

    for _ in range(3):
        b.incr("counter")
    everywhere(cluster3, lambda h: h.get("counter") == 3, 5, "B's counter on every host")
    assert c.incr("counter", 10) == 13
    everywhere(cluster3, lambda h: h.get("counter") == 13, 5, "C's incr on every host")

    # A TTL travels as the remaining time, not as a fresh one.
    a.put("ttl30", "x", ttl=30)
    time.sleep(0.5)
    everywhere(cluster3, lambda h: h.has("ttl30"), 5)
    ta, tb, tc = a.ttl("ttl30"), b.ttl("ttl30"), c.ttl("ttl30")
    assert 25 < ta <= 30
    for remote in (tb, tc):
        assert remote <= 30 and abs(remote - ta) < 1.5, (ta, tb, tc)

    # touch gives a new time to live everywhere
    assert c.touch("ttl30", ttl=1000) is True
    everywhere(cluster3, lambda h: h.ttl("ttl30") > 900, 5, "C's touch on every host")

    # an entry put without a TTL has none anywhere
    a.put("forever", 1)
    everywhere(cluster3, lambda h: h.has("forever"), 5)
    assert [h.ttl("forever") for h in cluster3] == [None, None, None]

    # a short TTL expires on every host
    a.put("short", "s", ttl=0.6)
    time.sleep(0.8)
    assert [h.has("short") for h in cluster3] == [False, False, False]
    cluster3.wait_converged()


def test_concurrent_writers_on_every_host_converge(cluster3):
    """Three worker processes per host write the same 100 keys (puts with tags,
    deletes) at the same time on all three hosts: every host ends with identical
    contents, key, value, tags and version."""
    scripts = {h.label: [{"seed": ord(h.label) * 10 + w, "keys": 100, "ops": 3000, "delete": 0.25, "pause": 0.001,
                          "label": f"{h.label}{w}"} for w in range(3)] for h in cluster3}
    for h in cluster3:
        h.send("workers", scripts=scripts[h.label], timeout=60)
    for h in cluster3:
        assert h.recv(timeout=70) == [3000] * 3
    dump = cluster3.wait_converged(timeout=20)
    assert 20 < len(dump) <= 100
    # every value left is one that a worker wrote
    assert all(re.search(rb"[ABC][0-2]-[0-9]+", bytes.fromhex(e[1])) for e in dump), dump


# --------------------------------------------------------------------------------------
# failures


def test_killed_bridge_restarts_and_converges(cluster3):
    """SIGKILL B's bridge while A keeps writing, past the failure timeout; restart it
    while A still writes: B gets everything it missed."""
    a, b, c = cluster3
    a.put_many([(f"pre{i}", i) for i in range(300)])
    cluster3.wait_converged(expect=300)

    b.kill_bridge(signal.SIGKILL)
    n = 0
    deadline = time.monotonic() + 1.5 * FAILURE_TIMEOUT
    while time.monotonic() < deadline:
        n += a.call("put_range", prefix="a", start=n, stop=n + 50)
        time.sleep(0.02)
    eventually(lambda: a.member_states().get(b.node_id) == "dead", 5, what="A sees B's bridge dead")

    b.restart_bridge()
    # A keeps writing across the restart...
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        n += a.call("put_range", prefix="a", start=n, stop=n + 50)
        time.sleep(0.02)
    # ...then stops: B must converge.
    cluster3.wait_converged(timeout=15, expect=300 + n)
    eventually(lambda: a.member_states().get(b.node_id) == "alive", 5, what="A sees B alive again")


def test_writes_made_while_the_bridge_was_down_reach_the_others(cluster3):
    """B's workers keep writing while B's bridge is dead (they must not block on it:
    their changes wait in the change log); once the bridge is back, every other host
    gets them."""
    a, b, c = cluster3
    b.kill_bridge(signal.SIGKILL)
    started = time.monotonic()
    b.call("put_range", prefix="bwhiledown", start=0, stop=500)
    b.delete("bwhiledown0")
    assert time.monotonic() - started < 2.0, "a worker blocked on the missing bridge"
    eventually(lambda: a.member_states().get(b.node_id) == "dead", 5, what="A sees B's bridge dead")
    b.restart_bridge()
    cluster3.wait_converged(timeout=15, expect=499)


def test_restarted_bridge_converges_when_the_others_are_idle(cluster3):
    """The same outage, but nobody writes after B's bridge is back: what A wrote while
    B's bridge was down must still reach B (a new incarnation resyncs; no later write
    is needed to notice the gap)."""
    a, b, c = cluster3
    b.kill_bridge(signal.SIGKILL)
    a.put_many([(f"k{i}", i) for i in range(400)])
    time.sleep(0.3)
    b.restart_bridge()
    cluster3.wait_converged(timeout=15, expect=400)


def test_paused_bridge_is_marked_dead_then_rejoins_and_converges(cluster3):
    """SIGSTOP B's bridge past the failure timeout: A and C mark it dead in their
    cluster view; writes go on on both sides; SIGCONT: it is alive again for everyone
    and every host converges (no write after the resume is needed)."""
    a, b, c = cluster3
    b.pause()
    try:
        for h in (a, c):
            eventually(lambda h=h: h.member_states().get(b.node_id) == "dead", 3 * FAILURE_TIMEOUT + 2,
                       what=f"{h.label} marks the paused B dead")
        a.put_many([(f"a{i}", i) for i in range(200)])
        c.put_many([(f"c{i}", i) for i in range(100)])
        b.put_many([(f"b{i}", i) for i in range(150)])  # queued in B's change log
        time.sleep(0.3)
    finally:
        b.resume()
    for h in cluster3:
        others = {o.node_id for o in cluster3 if o is not h}
        eventually(lambda h=h, others=others: {n for n, s in h.member_states().items() if s == "alive"} >= others,
                   5, what=f"{h.label} sees every other host alive after the resume")
    cluster3.wait_converged(timeout=15, expect=450)


def test_late_joiner_receives_everything_and_learns_every_member(cluster3):
    """A fourth host joins long after the writes, knowing only C: it learns A and B
    from C, they learn it, and it receives the whole contents (deletes included)
    although nobody writes after it joined."""
    a, b, c = cluster3
    a.put_many([(f"a{i}", i) for i in range(300)], tags=["ta"])
    b.put_many([(f"b{i}", i) for i in range(300)])
    cluster3.wait_converged(timeout=10, expect=600)
    for i in range(0, 300, 3):
        c.delete(f"b{i}")
    expected = cluster3.wait_converged(timeout=10, expect=500)

    d = cluster3.add_host(join=[c])
    cluster3.wait_members(timeout=10)
    assert set(d.member_states()) == {a.node_id, b.node_id, c.node_id}
    assert cluster3.wait_converged(timeout=15) == expected
    # and it is a full member: its writes reach the others
    d.put("from-d", "late")
    everywhere(cluster3, lambda h: h.get("from-d") == "late", 5, "D's write everywhere")


# --------------------------------------------------------------------------------------
# tags, flush, and late older puts


def test_invalidate_tag_and_flush_reach_every_host_and_count_keys(cluster3):
    a, b, c = cluster3
    a.put_many([(f"red{i}", i) for i in range(20)], tags=["red"])
    a.put_many([(f"blue{i}", i) for i in range(10)], tags=["blue"])
    b.put_many([(f"bred{i}", i) for i in range(5)], tags=["red", "x"])
    c.put_many([(f"plain{i}", i) for i in range(7)])
    cluster3.wait_converged(expect=42)

    # 25 live "red" entries on each of 3 hosts: 25 keys (issue 14: counts mean keys)
    assert a.invalidate_tag("red") == 25
    everywhere(cluster3, lambda h: h.size() == 17, 5, "the red entries are gone everywhere")
    assert b.invalidate_tag("red") == 0
    assert c.invalidate_tag("never-used") == 0

    assert c.flush() == 17
    everywhere(cluster3, lambda h: h.size() == 0, 5, "the flush reached every host")
    assert cluster3.wait_converged(expect=0) == []

    # after a flush the cache works as before, everywhere
    b.put("after", "flush")
    everywhere(cluster3, lambda h: h.get("after") == "flush", 5)


def test_older_puts_arriving_late_do_not_resurrect(cluster3):
    """B's bridge is paused (shorter than the failure timeout: B stays a member) while
    a worker on B writes k; then A deletes k. B's put has the older version (HLC:
    it happened earlier), so when B's bridge resumes and its queued put reaches A and
    C after A's delete, it must not bring k back, anywhere. The same for a tag
    invalidation and for a flush that overtake older puts."""
    a, b, c = cluster3
    a.put_many([("k", "original"), ("kt", "original")], tags=["t"])
    a.put("keep", "kept")
    cluster3.wait_converged(expect=3)

    b.pause()
    try:
        b.put("k", "late-from-B")              # older version, stuck in B's change log
        b.put("kt", "late-from-B", tags=["t"])
        time.sleep(0.01)                       # A's changes are strictly later (HLC ms)
        assert a.delete("k") is True
        # Waits up to failure_timeout/2 for B's answer, then says B did not confirm it.
        reply = a.call("try", method="invalidate_tag", args=["t"])
        assert reply[:2] == ["raised", "BridgeUnavailable"] and "did not confirm" in reply[2]
    finally:
        b.resume()
    dump = cluster3.wait_converged(timeout=10)
    keys = {bytes.fromhex(e[0]) for e in dump}
    assert not keys & {b"k", b"kt"}, f"a late older put came back: {dump}"
    # It stays so (nothing else is still on its way to bring it back).
    time.sleep(0.5)
    for h in cluster3:
        assert not h.has("k") and not h.has("kt"), h.label
    suppressed = sum(h.status()["caches"][cluster3.name]["suppressed"] for h in (a, c))
    assert suppressed >= 2, "the late puts should have been suppressed by A's and C's tombstones"

    # the same with a flush
    b.pause()
    try:
        b.put("f", "late-from-B")
        time.sleep(0.01)
        assert a.call("try", method="flush", args=[])[:2] == ["raised", "BridgeUnavailable"]
    finally:
        b.resume()
    time.sleep(0.3)
    assert cluster3.wait_converged(timeout=10, expect=0) == []


def test_older_put_arriving_late_does_not_undo_a_local_delete(cluster3):
    """The mirror case, on the host that deletes: A puts k while B's bridge is paused
    (A's put waits in B's socket); then a worker on B deletes k, later (newer HLC
    version). When B's bridge resumes it receives A's older put before it has read
    B's own delete from the change log. Last writer wins says the delete wins: k must
    be absent on every host (A and C drop it when B's delete reaches them; B must
    not store A's older put)."""
    a, b, c = cluster3
    a.put("k", "first")
    cluster3.wait_converged(expect=1)
    b.pause()
    try:
        a.put("k", "older-from-A")
        time.sleep(0.05)
        assert b.delete("k") is True            # newer than A's put, not yet read by B's bridge
    finally:
        b.resume()
    time.sleep(0.5)
    states = {h.label: h.get("k") for h in cluster3}
    assert states == {"A": None, "B": None, "C": None}, \
        f"k after A's put and B's later delete: {states} (last writer wins: the delete)"


# --------------------------------------------------------------------------------------
# visibility


def _status_command():
    script = os.path.join(os.path.dirname(sys.executable), "vela-bridge")
    if os.path.exists(script):
        return [script]
    found = shutil.which("vela-bridge")
    return [found] if found else [sys.executable, "-m", "vela.bridge"]


def test_status_command_prints_members_and_counters(cluster3):
    a, b, c = cluster3
    a.put_many([(f"s{i}", i) for i in range(50)])
    cluster3.wait_converged(expect=50)
    out = subprocess.run(_status_command() + ["status", "--cache", cluster3.name], env=a.env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["node_id"] == a.node_id
    assert {m["node_id"]: m["state"] for m in status["members"]} == {b.node_id: "alive", c.node_id: "alive"}
    for counter in ("messages_in", "messages_out", "malformed", "unauthenticated"):
        assert counter in status["counters"]
    assert status["counters"]["messages_out"] > 0 and status["counters"]["messages_in"] > 0
    assert status["caches"][cluster3.name]["sent"] >= 50

    # no bridge: a clear error, not a hang
    a.kill_bridge(signal.SIGTERM)
    started = time.monotonic()
    out = subprocess.run(_status_command() + ["status", "--cache", cluster3.name, "--timeout", "0.5"],
                         env=a.env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "did not answer" in out.stderr
    assert time.monotonic() - started < 10


def test_cluster_view_members_and_ready(tmp_path):
    """Before a bridge runs the cache has no cluster view; with bridges, every host's
    view lists the others and says ``ready`` once the host is in sync, even when the
    others had nothing to send."""
    c = Cluster(tmp_path, n=3, start=False)
    try:
        assert [h.cluster() for h in c] == [None, None, None]
        c.start()
        c.wait_members()
        view = c[1].cluster()
        assert view["node_id"] == c[1].node_id and "epoch" in view and "ready" in view
        assert {m["node_id"] for m in view["members"]} == {c[0].node_id, c[2].node_id}
        c[0].put_many([(f"r{i}", i) for i in range(100)])
        c.wait_converged(expect=100)
        everywhere(c, lambda h: (h.cluster() or {}).get("ready") is True, 5,
                   "every host's view says ready (idle peers, one host wrote)")
    finally:
        c.close()


def test_a_change_a_host_cannot_hold_is_counted_not_fatal(tmp_path):
    """A host with a smaller max_entry_size cannot store a big entry another host
    wrote: its bridge counts the failure, stays up, and keeps replicating."""
    c = Cluster(tmp_path, n=0)
    try:
        c.capacity = "32MiB"
        a = c.add_host(join=[])
        c.capacity = "4MiB"  # max_entry_size 64 KiB
        b = c.add_host(join=[a])
        c.wait_members()
        a.put("big", "x" * 200_000)
        a.put("small", "fits")
        eventually(lambda: b.get("small") == "fits", 10, what="the small entry on B")
        assert not b.has("big")
        status = b.status()
        assert status["caches"][c.name]["failed"] >= 1
        a.put("after", 1)
        eventually(lambda: b.get("after") == 1, 10, what="replication goes on")
    finally:
        c.close()


def test_deletes_survive_a_change_log_that_wrapped(tmp_path):
    """A's bridge is stopped while A's workers delete keys and then write far more
    than A's change log holds: the log wraps and the delete records are lost. The
    deletes are still in A's table (tombstones), so the snapshot B and C pull from
    A removes the keys there too."""
    c = Cluster(tmp_path, n=3, capacity="8MiB")  # change log: 1 MiB
    try:
        c.wait_members()
        a, b, _ = c
        a.put_many([(f"doomed{i}", i) for i in range(50)])
        c.wait_converged(expect=50)
        a.pause()
        for i in range(50):
            a.delete(f"doomed{i}")
        n = a.call("put_range", prefix="fill", start=0, stop=12000, value="x" * 60)  # ~1.5 MiB of log
        assert a.call("log_state")["head"] > 1 << 20
        a.resume()
        dump = c.wait_converged(timeout=20, expect=n)
        assert not any(bytes.fromhex(e[0]).startswith(b"sdoomed") for e in dump)
        assert b.call("count_present", keys=[f"doomed{i}" for i in range(50)]) == 0
    finally:
        c.close()


def test_a_tag_invalidation_right_after_the_bridges_start_waits_for_them(tmp_path):
    """A bridge that just started does not know its cluster yet and answers "retry":
    the worker asks again until its bridge_timeout, instead of failing the call."""
    c = Cluster(tmp_path, n=2)
    try:
        c.wait_members()  # (not wait_ready: the call may meet the bridge still learning)
        a, b = c
        a.put("k", 1, tags=["t"])
        assert a.invalidate_tag("t") == 1
        eventually(lambda: b.get("k") is None and a.get("k") is None, 5, what="the invalidation on both hosts")
    finally:
        c.close()
