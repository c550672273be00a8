"""A real network partition: one host's bridge in its own network namespace.

Hosts A and B run their bridges in the test's network namespace, host C's bridge
runs in a namespace of its own (tests/faults/net.py: a veth into a Linux bridge that
carries the test's address on a subnet of this run). Taking C's link down cuts C
off; past the failure timeout everyone sees the other side dead; both sides write;
the link comes back up and every host converges. Needs root and iproute2; elsewhere
the test is skipped with the reason. Every namespace and link it made is removed,
whatever happens.
"""
import pytest

from cluster import FAILURE_TIMEOUT, Cluster, eventually
from faults.net import Network, unavailable

pytest.importorskip("zmq")

SECRET = b"netns-test-secret-0123456789abcdef"


def test_a_host_cut_off_by_the_network_rejoins_and_converges(tmp_path):
    reason = unavailable()
    if reason:
        pytest.skip(reason=reason)
    with Network(1) as net:
        c = Cluster(tmp_path, n=0, secret=SECRET, start=False)
        try:
            a = c.add_host(start=False, listen_host=net.root_addr)
            b = c.add_host(start=False, listen_host=net.root_addr)
            far = c.add_host(start=False, listen_host=net.addr(0))
            far.netns = net.ns(0)
            a.start_bridge(join=[b], secret_file=c.secret_file, wait=False)
            b.start_bridge(join=[a], secret_file=c.secret_file, wait=False)
            far.start_bridge(join=[a], secret_file=c.secret_file, wait=False)
            for h in c:
                h.wait_bridge()
            c.wait_members(timeout=15)
            a.put_many([(f"before{i}", i) for i in range(200)])
            c.wait_converged(timeout=10, expect=200)

            net.unplug(0)
            try:
                for h in (a, b):
                    eventually(lambda h=h: h.member_states().get(far.node_id) == "dead",
                               3 * FAILURE_TIMEOUT + 3, what=f"{h.label} sees the cut-off host dead")
                eventually(lambda: set(far.member_states().values()) == {"dead"}, 3 * FAILURE_TIMEOUT + 3,
                           what="the cut-off host sees everyone dead")
                # both sides write; the far side's writes wait in its change log
                a.put_many([(f"a{i}", i) for i in range(300)])
                b.delete("before0")
                far.put_many([(f"far{i}", i) for i in range(150)])
                far.delete("before1")
                eventually(lambda: b.call("count_present", keys=[f"a{i}" for i in range(300)]) == 300, 5,
                           what="A and B still replicate between them")
                assert far.call("count_present", keys=[f"a{i}" for i in range(300)]) == 0
                assert a.call("count_present", keys=[f"far{i}" for i in range(150)]) == 0
            finally:
                net.plug(0)

            c.wait_members(timeout=20)
            dump = c.wait_converged(timeout=25, expect=200 - 2 + 300 + 150)
            keys = {bytes.fromhex(e[0]) for e in dump}
            assert b"sbefore0" not in keys and b"sbefore1" not in keys
        except BaseException:
            print(c.logs())
            raise
        finally:
            c.close()
