"""Who a bridge is: incarnations (a restart is seen as one at once) and node ids
(two live bridges never share one). Real bridges on simulated hosts (tests/cluster.py).
"""
import signal

import pytest

from cluster import Cluster, eventually

from vela.bridge import protocol
from vela.bridge.node import _node_id_of


def test_incarnations_are_ordered_across_restarts():
    incs = [protocol.new_incarnation()]
    for _ in range(1000):
        incs.append(protocol.new_incarnation(incs[-1]))
    assert incs == sorted(incs) and len(set(incs)) == len(incs)
    assert all(0 < i < 2**64 for i in incs)
    # even a clock that went back gives a newer one than the incarnation it replaces
    assert protocol.new_incarnation(after=2**63) == 2**63 + 1


def test_a_fast_restart_is_seen_as_a_new_incarnation_at_once(tmp_path):
    """B's bridge is SIGKILLed and started again well within the failure timeout: A
    never declares it dead, yet takes it as a restart at once (a new incarnation:
    counted, and a snapshot exchange), so writes made on A meanwhile reach B."""
    c = Cluster(tmp_path, n=2)
    try:
        c.wait_members()
        a, b = c
        a.put_many([(f"k{i}", i) for i in range(100)])
        c.wait_converged(expect=100)
        old = b.status()["incarnation"]
        before = a.status()
        b.kill_bridge(signal.SIGKILL)
        a.put_many([(f"while-down{i}", i) for i in range(50)])  # batches to nobody
        b.restart_bridge()
        new = b.status()["incarnation"]
        assert new > old
        eventually(lambda: a.status()["counters"]["restarts_seen"] == before["counters"]["restarts_seen"] + 1,
                   5, what="A saw B's restart")
        c.wait_converged(expect=150, timeout=10)
        after = a.status()
        assert after["caches"][c.name]["resyncs"] > before["caches"][c.name]["resyncs"]
        # never declared dead (the restart was quicker than the failure timeout)
        assert [m["state"] for m in after["members"]] == ["alive"]
    finally:
        c.close()


def test_the_issue_pair_of_addresses_has_one_default_node_id():
    # the reason default node ids must be checked: they are a hash into 12 bits
    assert _node_id_of("tcp://127.0.0.1:7704") == _node_id_of("tcp://127.0.0.1:7741")


@pytest.mark.parametrize("via_third", [False, True])
def test_a_second_bridge_with_a_taken_node_id_refuses_to_run(tmp_path, via_third):
    """Two bridges with one node id (both would write versions of that node id, and
    each drops the other's messages as its own): the one that comes second exits with
    one line naming --node-id; the first and the rest of the cluster go on."""
    c = Cluster(tmp_path, n=2 if via_third else 1)
    try:
        c.wait_members() if via_third else None
        first = c[0]
        second = c.add_host(start=False)
        second.node_id = first.node_id
        # directly to the holder of the id, or through a third member only
        second.start_bridge(join=[c[1] if via_third else first], wait=False)
        eventually(lambda: second.bridge.poll() is not None, 10, what="the second bridge exits")
        assert second.bridge.returncode != 0
        out = second.bridge_output()
        line = f"node id {first.node_id} is taken by the live bridge at {first.listen}"
        assert line in out and "--node-id" in out and "Traceback" not in out, out
        assert first.bridge_alive()
        first.put("still", "works")
        if via_third:
            eventually(lambda: c[1].get("still") == "works", 5, what="replication after the refusal")
            assert c[1].member_states() == {first.node_id: "alive"}
    finally:
        c.close()


def test_the_issue_pair_with_default_node_ids(tmp_path):
    """The two addresses of the issue, each bridge with the default node id (a hash
    of its address): the second one refuses to run, naming the fix."""
    c = Cluster(tmp_path, n=2, start=False)
    try:
        first, second = c
        for host, port, join in ((first, 7704, []), (second, 7741, ["--join", "tcp://127.0.0.1:7704"])):
            host.listen = f"tcp://127.0.0.1:{port}"
            host.bridge_args = ["run", "--cache", c.name, "--listen", host.listen, "--heartbeat", "0.2",
                                "--failure-timeout", "1.0"] + join
            host._launch_bridge(wait=host is first)
        assert first.status()["node_id"] == _node_id_of("tcp://127.0.0.1:7704")
        eventually(lambda: second.bridge.poll() is not None, 10, what="the second bridge exits")
        out = second.bridge_output()
        assert second.bridge.returncode != 0
        assert f"node id {_node_id_of(first.listen)} is taken by the live bridge at tcp://127.0.0.1:7704" in out \
            and "--node-id" in out, out
        assert first.bridge_alive()
    finally:
        c.close()
