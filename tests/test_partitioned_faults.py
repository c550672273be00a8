"""Partitioned caches under faults, judged by recorded histories.

Three simulated hosts (each its own segment, bridge and worker processes), two
workers per host recording every put, delete and tag invalidation they make on
their own keys (tests/cluster.py ``_history``) while a fault happens to one host:
its bridge SIGKILLed and restarted at once (as systemd's Restart=always does) or
after the failure timeout, SIGSTOPped past the failure timeout, or the host cut off
from the network (its own network namespace, the link taken down) and healed.
After the fault healed and the bridges settled, every host reads every key, and
tests/history.py checks: no acknowledged write lost, no delete undone, no entry
alive whose tag was invalidated after it was written, every host reads the same.
"""
import threading
import time

import pytest

from cluster import FAILURE_TIMEOUT, Cluster, eventually
from faults.clock import libfaketime
from faults.net import Network, unavailable
from history import check

pytest.importorskip("zmq")

WORKERS = 2       # per host
KEYS = 250        # per worker: many keys are written before the fault and never again
SECRET = b"partitioned-faults-secret-0123456789"
SECONDS = 5.0     # of recorded operations; the fault happens inside


def make_cluster(tmp_path, backups, netns=None, listen_host="127.0.0.1", far_host=None, far_env=None,
                 timeout=None):
    extra = ["--backups", str(backups)] if backups else []
    secret_file = str(tmp_path / "secret")  # the Cluster writes it there before any host opens
    topology_opts = {"secret_file": secret_file}
    if timeout is not None:
        topology_opts["timeout"] = timeout
    c = Cluster(tmp_path, n=0, topology="partitioned", bridge_extra=extra, start=False, secret=SECRET,
                cache_opts={"topology_opts": topology_opts})
    try:
        a = c.add_host(start=False, listen_host=listen_host)
        b = c.add_host(start=False, listen_host=listen_host)
        far = c.add_host(start=False, listen_host=far_host or listen_host, netns=netns, env=far_env)
        a.start_bridge(join=[b], wait=False, secret_file=secret_file)
        b.start_bridge(join=[a], wait=False, secret_file=secret_file)
        far.start_bridge(join=[a], wait=False, secret_file=secret_file)
        for h in c:
            h.wait_bridge()
        c.wait_members(timeout=15)
        wait_settled(c)
    except BaseException:
        c.close()
        raise
    return c


def settled(c):
    """Every bridge has the same partition table and nothing in transit."""
    owners = []
    for h in c:
        st = h.status(timeout=1.0)
        if not st:
            return False
        cache = st["caches"][c.name]
        if not cache["ready"] or cache["outgoing"] or cache["streams"] or cache["incoming"]:
            return False
        if any(m["state"] != "alive" for m in st["members"]):
            return False
        owners.append(tuple(h.cluster().get("owners") or ()))
    return owners[0] and all(o == owners[0] for o in owners)


def wait_settled_without(c, gone, timeout=30.0):
    """The hosts but ``gone`` have one partition table without it, nothing in transit."""
    rest = [h for h in c if h is not gone]

    def done():
        tables = [tuple(h.cluster().get("owners") or ()) for h in rest]
        states = [h.status(timeout=1.0) for h in rest]
        return (all(st and st["caches"][c.name]["ready"] and not st["caches"][c.name]["incoming"] for st in states)
                and tables[0] and all(t == tables[0] for t in tables) and gone.node_id not in tables[0])
    eventually(done, timeout, interval=0.2, what=f"the others settle without {gone.label}")


def wait_settled(c, timeout=30.0):
    eventually(lambda: settled(c), timeout, interval=0.2, what=f"the cluster settles ({c.describe()})")


def start_histories(c, seed):
    """The workers of every host start recording (through a second agent per host: the
    test still drives each host through its first)."""
    loads = []
    for h in c:
        side = h.side_agent()
        scripts = [dict(kind="history", prefix=f"{h.label}{w}:", keys=KEYS, seconds=SECONDS,
                        seed=seed * 100 + ord(h.label) * 10 + w) for w in range(WORKERS)]
        side.send("workers", scripts=scripts, timeout=SECONDS + 60)
        loads.append(side)
    return loads


def collect(loads):
    histories = []
    for side in loads:
        for history in side.recv(timeout=SECONDS + 90):
            histories.append(history)
    return histories


def judge(c, histories):
    """The checker's report once the cluster settled (reads repeated while the hosts
    still disagree, for a few seconds: copies in flight)."""
    wait_settled(c)
    keys = sorted({e[1] for hist in histories for e in hist if e[0] != "tag"})
    deadline = time.monotonic() + 10
    while True:
        finals = {h.label: h.call("read_all", keys=keys) for h in c}
        report = check(histories, finals)
        if not report["disagree"] or time.monotonic() > deadline:
            return report
        time.sleep(0.3)


def assert_clean(c, report):
    assert report["acked"] > 300, report  # the workers did work during the fault
    bad = {k: report[k] for k in ("lost", "undone", "not_invalidated", "disagree", "phantom")}
    assert bad == {"lost": 0, "undone": 0, "not_invalidated": 0, "disagree": 0, "phantom": 0}, \
        (report["examples"], c.logs()[-6000:])


def run_fault(c, fault, seed=1):
    loads = start_histories(c, seed)
    time.sleep(1.0)
    fault()
    report = judge(c, collect(loads))
    print("history:", {k: v for k, v in report.items() if k != "examples"})  # (pytest -s shows the counts)
    assert_clean(c, report)
    return report


# --------------------------------------------------------------------------------------
# the bridge of one host


@pytest.mark.parametrize("backups", [1, 0])
def test_bridge_killed_and_restarted_at_once_loses_nothing(tmp_path, backups):
    c = make_cluster(tmp_path, backups)
    try:
        b = c[1]

        def fault():
            b.kill_bridge()
            time.sleep(0.5)
            b.restart_bridge()

        report = run_fault(c, fault)
        kept = b.status()["caches"][c.name].get("kept", 0)
        assert kept > 0  # the restarted bridge kept its segment's table (it did not start over empty)
        assert report["failed"] < report["acked"]
    finally:
        c.close()


def test_writes_acknowledged_just_before_the_owner_bridge_was_killed_are_served_after_it(tmp_path):
    # The backup used to follow a write within 2 ms (what --async-backups still does):
    # the writes of a host's last moments before its bridge was SIGKILLed were missing
    # from the backup copy the others promoted, and they served what the writes had
    # replaced until the bridge came back (a fault history's stale read: a delete
    # acknowledged on B read as its old value on A 3 s later). A write now returns once
    # the backup holds it.
    c = make_cluster(tmp_path, backups=1)
    try:
        a, b, far = c
        mine = [k for k in (f"last:{i}" for i in range(400)) if a.call("owner", key=k)[0] == a.node_id][:60]
        assert len(mine) == 60
        a.put_many([(k, "old") for k in mine])
        # in one process, with nothing between the last write and the kill
        a.call("exec_loop", code=f"""
import os, signal
for k in {mine!r}:
    cache.put(k, "new:" + k)
for k in {mine[:20]!r}:
    cache.delete(k)
os.kill({a.bridge.pid}, signal.SIGKILL)
""")
        a.kill_bridge()
        expected = {k: None if i < 20 else "new:" + k for i, k in enumerate(mine)}
        for h in (b, far):
            eventually(lambda: h.member_states().get(a.node_id) == "dead", 3 * FAILURE_TIMEOUT + 3,
                       what=f"{h.label} sees A dead")
        wait_settled_without(c, a)
        for h in (b, far):
            assert dict(h.call("get_many", keys=mine)) == {k: v for k, v in expected.items() if v}
    finally:
        c.close()


@pytest.mark.parametrize("restart", [False, True], ids=["taken-over", "restarted-at-once"])
def test_an_incr_asked_again_after_its_owner_died_is_counted_once(tmp_path, restart):
    # A fault history's counter read one more than every incr made: the owner's bridge
    # made an incr (and its backup got the record), then was SIGKILLed before its answer
    # left; the worker asked the member that took the partition over, which counted it
    # again. Every try of an incr now carries one request id, and the backup record
    # carries the incr's outcome by that id.
    c = make_cluster(tmp_path, backups=1, timeout=10)
    try:
        a, b, far = c
        key = next(k for k in (f"n{i}" for i in range(2000))
                   if a.call("owner", key=k)[0] == b.node_id
                   and a.cluster()["backups"][a.call("owner", key=k)[1]] == far.node_id)
        assert a.call("try", method="incr", args=[key]) == ["ok", 1]
        far.pause()  # the backup: the owner's record of the next incr waits in its socket
        answer = []
        asking = threading.Thread(target=lambda: answer.append(a.call("try", method="incr", args=[key])))
        asking.start()
        try:
            eventually(lambda: b.call("local_get", key=key) == [True, 2], 5, what="B made the incr")
        finally:
            b.kill_bridge()  # before the backup acknowledged it: no answer leaves B
            far.resume()
        if restart:
            # (as systemd's Restart=always does; the others may not even see it gone): the
            # incr is in B's table, but this bridge process never heard of it. It says it
            # cannot tell rather than count it again.
            b.restart_bridge()
            asking.join(30)
            assert answer == [["raised", "BridgeUnavailable", f"cache {c.name!r}: the incr may or may not have "
                               f"been made: the bridge of member {b.node_id} restarted while it was on its way, "
                               "before it answered (it is not made a second time)"]], c.logs()[-4000:]
            wait_settled(c)
        else:
            # The backup, promoted, holds the incr and its outcome: the same answer.
            asking.join(30)
            assert answer == [["ok", 2]], c.logs()[-4000:]
            wait_settled_without(c, b)
            assert far.status()["caches"][c.name]["asked_again"] == 1
        assert [h.get(key) for h in c if h.bridge_alive()] == [2] * (3 if restart else 2)
    finally:
        c.close()


def test_bridge_killed_and_restarted_after_the_failure_timeout_loses_nothing(tmp_path):
    c = make_cluster(tmp_path, backups=1)
    try:
        b = c[1]

        def fault():
            b.kill_bridge()
            # the others take its partitions (its backups promoted) and write to them
            eventually(lambda: c[0].member_states().get(b.node_id) == "dead", 3 * FAILURE_TIMEOUT + 3,
                       what="A sees B dead")
            time.sleep(1.0)
            b.restart_bridge()

        run_fault(c, fault)
    finally:
        c.close()


def test_bridge_stopped_past_the_failure_timeout_loses_nothing(tmp_path):
    c = make_cluster(tmp_path, backups=1)
    try:
        b = c[1]

        def fault():
            b.pause()
            try:
                eventually(lambda: c[0].member_states().get(b.node_id) == "dead", 3 * FAILURE_TIMEOUT + 3,
                           what="A sees B dead")
                time.sleep(1.0)
            finally:
                b.resume()

        run_fault(c, fault)
        assert "stalled" in b.bridge_output()  # it noticed,
        assert b.status()["caches"][c.name]["kept"] > 0  # and kept its table
    finally:
        c.close()


def test_a_put_that_waited_at_a_stopped_owner_is_not_made_after_it_resumes(tmp_path):
    """A put waits in the socket of its owner's bridge, SIGSTOPped; the others declare
    it dead and take its partitions, and the key is written again (acknowledged). The
    put that waited must not be made when the bridge resumes: made then, it would get
    a newer version than the acknowledged write and win over it everywhere."""
    c = make_cluster(tmp_path, backups=1)
    try:
        a, b = c[0], c[1]
        key = next(k for k in (f"w{i}" for i in range(1000)) if a.call("owner", key=k)[0] == b.node_id)
        assert a.call("try", method="put", args=[key, "before"]) == ["ok", None]
        b.pause()
        try:
            a.call("try", method="put", args=[key, "waited"])  # (answered by the new owner, or it times out)
            eventually(lambda: a.member_states().get(b.node_id) == "dead", 3 * FAILURE_TIMEOUT + 3,
                       what="A sees B dead")
            eventually(lambda: a.call("try", method="put", args=[key, "after"]) == ["ok", None], 15,
                       what="the key written again while B is stopped")
        finally:
            b.resume()
        wait_settled(c)
        assert [h.get(key) for h in c] == ["after"] * 3, c.logs()[-4000:]
        assert "stalled" in b.bridge_output()
    finally:
        c.close()


def test_a_bridge_restarted_while_it_hears_nobody_takes_no_partition(tmp_path):
    """Restarted while the other two members are frozen, a bridge must not make a
    partition table of itself alone (a majority of one): the members of its last table
    may be writing its partitions elsewhere, and two writers lose increments at the
    heal. It refuses writes until it hears a majority, then takes its table back."""
    c = make_cluster(tmp_path, backups=1)
    try:
        a, b, far = c
        key = next(k for k in (f"n{i}" for i in range(1000)) if a.call("owner", key=k)[0] == a.node_id)
        assert a.call("try", method="incr", args=[key]) == ["ok", 1]
        a.kill_bridge()
        b.pause()
        far.pause()
        try:
            a.restart_bridge(wait=False)
            eventually(lambda: "hears 1 of the 3 members" in a.bridge_output(), 3 * FAILURE_TIMEOUT + 5,
                       what="the restarted bridge finds no majority")
            assert a.cluster().get("owners") is None  # no table of its own
            assert a.call("try", method="incr", args=[key])[:2] == ["raised", "BridgeUnavailable"]
            assert "partition table 1: members [1]" not in a.bridge_output()
        finally:
            b.resume()
            far.resume()
        wait_settled(c)
        assert [h.call("try", method="incr", args=[key]) for h in c] == [["ok", 2], ["ok", 3], ["ok", 4]]
    finally:
        c.close()


# --------------------------------------------------------------------------------------
# the network


def far_cluster(tmp_path, net, backups=1, far_env=None):
    """A, B in the test's namespace, the far host C in ``net``'s host 0."""
    return make_cluster(tmp_path, backups, netns=net.ns(0), listen_host=net.root_addr, far_host=net.addr(0),
                        far_env=far_env)


def _cut_off(c, far, net, seconds):
    """Cut ``far`` off until both sides saw the other dead, plus ``seconds``."""
    net.unplug(0)
    try:
        eventually(lambda: c[0].member_states().get(far.node_id) == "dead", 3 * FAILURE_TIMEOUT + 3,
                   what="A sees the far host dead")
        eventually(lambda: set(far.member_states().values()) == {"dead"}, 3 * FAILURE_TIMEOUT + 3,
                   what="the far host sees everyone dead")
        time.sleep(seconds)
    finally:
        net.plug(0)


@pytest.mark.parametrize("backups", [1, 0])
def test_split_one_against_two_undoes_no_delete_or_invalidation(tmp_path, backups):
    reason = unavailable()
    assert reason is None, f"these tests need root, ip and iptables: {reason}"
    with Network(1) as net:
        c = far_cluster(tmp_path, net, backups)
        try:
            far = c[2]
            report = run_fault(c, lambda: _cut_off(c, far, net, 1.5))
            assert report["failed"] < report["acked"]
        finally:
            c.close()


def test_host_cut_off_twice_undoes_nothing(tmp_path):
    reason = unavailable()
    assert reason is None, f"these tests need root, ip and iptables: {reason}"
    with Network(1) as net:
        c = far_cluster(tmp_path, net)
        try:
            far = c[2]

            def fault():
                _cut_off(c, far, net, 0.2)
                c.wait_members(timeout=15)
                _cut_off(c, far, net, 0.2)

            run_fault(c, fault)
        finally:
            c.close()


def test_a_host_whose_clock_is_3_s_behind_cut_off_loses_nothing(tmp_path):
    """The far host's processes (bridge, workers) see the wall clock 3 s behind. Its
    workers wrote their keys through the other hosts' bridges before the cut, and in
    place after it: the versions come from a hybrid logical clock that observed the
    owners' clocks in their replies, so the later writes win although their wall
    clock says they are older."""
    reason = unavailable() or (None if libfaketime() else "libfaketime is not installed (apt-get install faketime)")
    assert reason is None, f"this test needs root, ip, iptables and libfaketime: {reason}"
    skew = {"LD_PRELOAD": libfaketime(), "FAKETIME": "-3s"}  # (its monotonic clock too: sleep needs that)
    with Network(1) as net:
        c = far_cluster(tmp_path, net, far_env=skew)
        try:
            far = c[2]
            assert far.call("exec_loop", code="import time; cache.put('clock', time.time())") is None
            assert abs(c[0].get("clock") - (time.time() - 3)) < 1.5  # its clock is behind
            run_fault(c, lambda: _cut_off(c, far, net, 1.0))
        finally:
            c.close()
