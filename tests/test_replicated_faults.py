"""The replicated topology under faults that lose messages: a host's change log
wrapping while its bridge is stopped, and a host cut off from the others, both
sides changing things meanwhile. Deletes, tag invalidations and flushes made on
either side are not undone; every host ends with the same contents. Real bridges
on simulated hosts (tests/cluster.py).
"""
import contextlib
import os
import stat
import subprocess
import time
import uuid

import pytest

from cluster import FAILURE_TIMEOUT, Cluster, eventually
from faults.net import Network
from faults.net import unavailable as net_unavailable

pytest.importorskip("zmq")

BRIDGE_TIMEOUT = 1.0
# Writes on two hosts that did not see each other are ordered by their versions
# (hybrid logical clocks: wall-clock milliseconds, then a counter): within the same
# millisecond the order is a tie broken by the counter. The tests order their
# concurrent changes by more than that.
APART = 0.01


def _keys(dump, prefix):
    return sorted(bytes.fromhex(e[0])[1:].decode() for e in dump if bytes.fromhex(e[0])[1:].startswith(prefix))


@pytest.fixture
def small2(tmp_path):
    c = Cluster(tmp_path, n=2, capacity="8MiB", start=False)  # change log: 1 MiB
    try:
        for host in c:  # workers give up on a stopped bridge after a second
            host.call("open", name=c.name, capacity=host.capacity, bridge_timeout=BRIDGE_TIMEOUT)
        c.start()
        c.wait_members()
        yield c
    finally:
        c.close()


def _wrap_the_log(host):
    n = host.call("put_range", prefix="fill", start=0, stop=12000, value="x" * 60)  # ~1.5 MiB of log
    assert host.call("log_state")["head"] > 1 << 20
    return n


def test_a_tag_invalidation_and_deletes_survive_a_log_that_wrapped(small2):
    a, b = small2
    a.put_many([(f"grp{i}", i) for i in range(50)], tags=["grp"])
    a.put_many([(f"keep{i}", i) for i in range(50)])
    a.put_many([(f"doomed{i}", i) for i in range(20)])
    small2.wait_converged(expect=120)
    b.pause()
    try:
        # A writes more of the tag while B's bridge is stopped: B never sees them
        # before its invalidation, which is newer, so they go too.
        a.put_many([(f"grp-late{i}", i) for i in range(30)], tags=["grp"])
        time.sleep(APART)
        assert b.call("try", method="invalidate_tag", args=["grp"])[:2] == ["raised", "BridgeUnavailable"]
        for i in range(20):
            b.delete(f"doomed{i}")
        n = _wrap_the_log(b)
    finally:
        b.resume()
    dump = small2.wait_converged(timeout=30, expect=50 + n)
    assert _keys(dump, b"grp") == [], "the tag invalidation was lost"
    assert _keys(dump, b"doomed") == [], "deletes were lost"
    assert len(_keys(dump, b"keep")) == 50 and len(_keys(dump, b"fill")) == n
    assert a.call("count_present", keys=[f"grp-late{i}" for i in range(30)]) == 0


def test_a_flush_survives_a_log_that_wrapped(small2):
    a, b = small2
    a.put_many([(f"old{i}", i) for i in range(100)])
    small2.wait_converged(expect=100)
    b.pause()
    try:
        a.put_many([(f"during{i}", i) for i in range(40)])  # older than B's flush
        time.sleep(APART)
        assert b.call("try", method="flush")[:2] == ["raised", "BridgeUnavailable"]
        n = _wrap_the_log(b)
    finally:
        b.resume()
    dump = small2.wait_converged(timeout=30, expect=n)
    assert _keys(dump, b"fill") == sorted(f"fill{i}" for i in range(n))
    a.put("after", "the flush")
    eventually(lambda: b.get("after") == "the flush", 5, what="replication goes on")


# --------------------------------------------------------------------------------------
# a host cut off


class Cut:
    """Drops every packet to the given bridges' ports (iptables, a chain of this run's
    own): the hosts cannot hear each other. Removed whatever happens."""

    def __init__(self, hosts):
        self.chain = f"VELACUT{uuid.uuid4().hex[:8]}".upper()
        self.ports = [h.port for h in hosts]
        self.active = False

    @staticmethod
    def _iptables(*args, check=True):
        return subprocess.run(["iptables", "-w", "5"] + list(args), capture_output=True, text=True,
                              timeout=20, check=check)

    def __enter__(self):
        self._iptables("-N", self.chain)
        for port in self.ports:
            self._iptables("-A", self.chain, "-p", "tcp", "--dport", str(port), "-j", "DROP")
        return self

    def cut(self):
        self._iptables("-I", "INPUT", "-j", self.chain)
        self.active = True

    def heal(self):
        self._iptables("-D", "INPUT", "-j", self.chain, check=False)
        self.active = False

    def __exit__(self, *exc):
        self.heal()
        self._iptables("-F", self.chain, check=False)
        self._iptables("-X", self.chain, check=False)


def _iptables_unavailable():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "iptables needs root"
    try:
        out = subprocess.run(["iptables", "-w", "5", "-L", "INPUT", "-n"], capture_output=True, text=True,
                             timeout=20)
    except FileNotFoundError:
        return "iptables is not installed"
    return None if out.returncode == 0 else f"iptables does not work here: {out.stderr.strip()}"


def test_deletes_and_tag_invalidations_of_either_side_survive_the_heal(tmp_path):
    reason = _iptables_unavailable()
    if reason:
        pytest.skip(reason=reason)
    c = Cluster(tmp_path, n=2)
    try:
        c.wait_members()
        a, b = c
        a.put_many([(f"a-grp{i}", i) for i in range(30)], tags=["on-a"])
        a.put_many([(f"b-grp{i}", i) for i in range(30)], tags=["on-b"])
        a.put_many([(f"a-del{i}", i) for i in range(20)] + [(f"b-del{i}", i) for i in range(20)])
        a.put_many([(f"keep{i}", i) for i in range(20)])
        c.wait_converged(expect=120)
        with Cut([a, b]) as cut:
            cut.cut()
            for h, other in ((a, b), (b, a)):
                eventually(lambda h=h, other=other: h.member_states().get(other.node_id) == "dead",
                           3 * FAILURE_TIMEOUT + 3, what=f"{h.label} sees the other side dead")
            # each side invalidates and deletes; the other side meanwhile rewrites some
            # of the same keys *before* (older: must go) and others *after* (newer: stay)
            b.put_many([(f"a-grp{i}", "b's older copy") for i in range(10)], tags=["on-a"])
            a.put_many([(f"b-del{i}", "a's older copy") for i in range(5)])
            time.sleep(APART)
            a.call("try", method="invalidate_tag", args=["on-a"])
            b.call("try", method="invalidate_tag", args=["on-b"])
            for i in range(20):
                a.delete(f"a-del{i}")
                b.delete(f"b-del{i}")
            time.sleep(APART)
            a.put_many([(f"b-grp{i}", "a's newer copy") for i in range(5)], tags=["on-b"])
            cut.heal()
        dump = c.wait_converged(timeout=30)
        assert _keys(dump, b"a-grp") == [], "entries of a tag invalidated on A came back"
        assert _keys(dump, b"a-del") == [] and _keys(dump, b"b-del") == [], "deletes were undone"
        assert _keys(dump, b"b-grp") == sorted(f"b-grp{i}" for i in range(5)), \
            "B's invalidation must drop A's older copies and keep its newer ones"
        assert b.get("b-grp0") == "a's newer copy"
        assert len(_keys(dump, b"keep")) == 20
    finally:
        c.close()


# --------------------------------------------------------------------------------------
# a host whose clock is behind

FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def test_a_host_whose_clock_is_3_s_behind_loses_no_write_and_undoes_no_delete_it_follows(tmp_path):
    """Versions are hybrid logical clocks with the receive rule: a host's clock
    observes every version it applies, so a change it makes after seeing another's
    is newer than that one, however far behind its wall clock is. B runs 3 s behind
    (libfaketime, its worker and its bridge); what B deletes, overwrites or
    invalidates after it saw A's write wins on both hosts, also when B is cut off
    from A at the time."""
    if not os.path.exists(FAKETIME_LIB):
        pytest.skip(reason=f"libfaketime is not installed ({FAKETIME_LIB})")
    reason = _iptables_unavailable()
    if reason:
        pytest.skip(reason=reason)
    c = Cluster(tmp_path, n=0, start=False)
    try:
        a = c.add_host(start=False)
        b = c.add_host(start=False, env={"LD_PRELOAD": FAKETIME_LIB, "FAKETIME": "-3s",
                                         "FAKETIME_DONT_RESET": "1"})
        a.start_bridge(join=[b], wait=False)
        b.start_bridge(join=[a], wait=False)
        a.wait_bridge()
        b.wait_bridge()
        c.wait_members()
        c.wait_ready()  # (B's invalidate_tag below needs its bridge to know the cluster)
        # the skew is real: B's worker reads a clock 3 s behind
        b.call("exec_loop", code=f"import time; d = {time.time()} - time.time(); assert 2.5 < d < 4, d")
        a.put_many([(f"del{i}", "a") for i in range(20)] + [(f"over{i}", "a") for i in range(20)]
                   + [(f"cut-del{i}", "a") for i in range(20)])
        a.put_many([(f"grp{i}", "a") for i in range(20)], tags=["grp"])
        c.wait_converged(expect=80)
        for i in range(20):  # B follows A's writes at once: 3 s "before" them by its clock
            b.delete(f"del{i}")
            b.put(f"over{i}", "b")
        b.invalidate_tag("grp")
        dump = c.wait_converged(timeout=10)
        assert _keys(dump, b"del") == [] and _keys(dump, b"grp") == [], "B's deletes or invalidation undone"
        assert [a.get(f"over{i}") for i in range(20)] == ["b"] * 20, "B's writes lost"
        with Cut([a, b]) as cut:
            cut.cut()
            eventually(lambda: b.member_states().get(a.node_id) == "dead", 3 * FAILURE_TIMEOUT + 3,
                       what="B sees A dead")
            for i in range(20):
                b.delete(f"cut-del{i}")
            b.put_many([(f"b-only{i}", i) for i in range(20)])
            cut.heal()
        dump = c.wait_converged(timeout=30)
        assert _keys(dump, b"cut-del") == [], "deletes made by the slow host while cut off were undone"
        assert len(_keys(dump, b"b-only")) == 20, "writes made by the slow host while cut off were lost"
    finally:
        c.close()


def test_kept_marks_stay_small_while_no_bridge_takes_them(monkeypatch):
    """With no bridge running, every flush and tag invalidation is still kept, but
    the file keeps only the newest of each once it passes its bound."""
    from vela.stores import replicated as client

    monkeypatch.setenv("VELA_NAMESPACE", f"tmarks{uuid.uuid4().hex[:8]}")
    path = client.marks_path("c")
    try:
        for i in range(5000):
            client.keep_mark("c", "tag", 1000 + i, tag=(i % 3) << 8)
            assert os.path.getsize(path) <= client.MAX_MARKS_BYTES + client.MARK.size
        client.keep_mark("c", "flush", 7)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        newest = {}
        for op, tag, version in client.take_marks(path):
            newest[op, tag] = max(version, newest.get((op, tag), 0))
        assert newest == {(4, 0): 5998, (4, 256): 5999, (4, 512): 5997, (3, 0): 7}
        assert os.path.getsize(path) == 0 and client.take_marks(path) == []
    finally:
        os.unlink(path)


# --------------------------------------------------------------------------------------
# a link stalled in TCP's retransmission backoff

NET_SECRET = b"replicated-faults-netns-secret-0123456789"
# While every packet between two hosts is dropped, TCP retries an unacknowledged
# segment after 0.2 s, then 0.4, 0.8, ... doubling: its tries fall about 0.2, 0.6,
# 1.4, 3, 6.2, 12.6 and 25.4 s after the loss began. A cut of 16 s ends between the
# last two: left to TCP, both links stay silent for some 9 s after the network
# healed (the peers see each other dead all that time, and a flush or tag
# invalidation made meanwhile returns without them).
STALL_CUT = 16.0
# What the bridges may take after the heal: a failure timeout to give up a silent
# link, a reconnection, a heartbeat to see the gap, a snapshot.
AFTER_HEAL = 3 * FAILURE_TIMEOUT + 2.0


@contextlib.contextmanager
def hosts_in_namespaces(tmp_path, **cluster_kw):
    """Hosts A and B, each in a network namespace of its own (tests/faults/net.py), their
    bridges joined and every change applied on both: (net, cluster, a, b). The bridges'
    logs are printed when the test fails."""
    reason = net_unavailable()
    if reason:  # (tools/test installs iproute2 and iptables and runs as root: never skipped)
        pytest.fail(f"these hosts need network namespaces: {reason}")
    with Network(2) as net:
        c = Cluster(tmp_path, n=0, secret=NET_SECRET, start=False, **cluster_kw)
        try:
            a = c.add_host(start=False, listen_host=net.addr(0), netns=net.ns(0))
            b = c.add_host(start=False, listen_host=net.addr(1), netns=net.ns(1))
            a.start_bridge(join=[b], secret_file=c.secret_file, wait=False)
            b.start_bridge(join=[a], secret_file=c.secret_file, wait=False)
            a.wait_bridge()
            b.wait_bridge()
            c.wait_members()
            c.wait_ready()  # (no snapshot still asked for: a heal alone would ask again)
            yield net, c, a, b
        except BaseException:
            print(c.logs())
            raise
        finally:
            c.close()


def cut_until_dead(net, a, b):
    """Every packet between A and B dropped, until each sees the other dead."""
    net.cut(1, [0])
    for h, other in ((a, b), (b, a)):
        eventually(lambda h=h, other=other: h.member_states().get(other.node_id) == "dead",
                   3 * FAILURE_TIMEOUT + 3, what=f"{h.label} sees the other host dead")


def test_hosts_converge_soon_after_a_loss_that_left_tcp_backing_off(tmp_path):
    with hosts_in_namespaces(tmp_path) as (net, c, a, b):
        a.put_many([(f"grp{i}", i) for i in range(20)], tags=["grp"])
        a.put_many([(f"doomed{i}", i) for i in range(20)])
        c.wait_converged(expect=40)
        try:
            cut_until_dead(net, a, b)
            a.put_many([(f"a{i}", i) for i in range(50)])
            b.put_many([(f"b{i}", i) for i in range(50)])
            for i in range(20):
                a.delete(f"doomed{i}")
            b.call("try", method="invalidate_tag", args=["grp"])
            time.sleep(STALL_CUT)
        finally:
            net.heal()
        healed = time.monotonic()
        dump = c.wait_converged(timeout=AFTER_HEAL, expect=100)
        assert _keys(dump, b"grp") == [] and _keys(dump, b"doomed") == []
        print(f"converged {time.monotonic() - healed:.1f} s after the heal")


def test_a_wrapped_log_reaches_a_peer_that_was_unreachable_when_the_bridge_saw_it(tmp_path):
    """B's bridge is stopped while B's workers delete keys and write until the change
    log wrapped, and A is cut off from B. The bridge that resumes cannot send its lost
    records; it must make A pull a snapshot of B once A is reachable again, whenever
    that is: a message saying so, sent when B saw A dead, would reach nobody."""
    with hosts_in_namespaces(tmp_path, capacity="8MiB") as (net, c, a, b):  # change log: 1 MiB
        a.put_many([(f"doomed{i}", i) for i in range(20)])
        c.wait_converged(expect=20)
        try:
            cut_until_dead(net, a, b)
            b.pause()
            try:
                for i in range(20):
                    b.delete(f"doomed{i}")
                n = _wrap_the_log(b)
            finally:
                b.resume()
            eventually(lambda: _log_taken(b.call("log_state")), 10, what="B's bridge took the wrapped log")
        finally:
            net.heal()
        dump = c.wait_converged(timeout=30, expect=n)
        assert _keys(dump, b"doomed") == [], "deletes lost with the log were not carried"


def _log_taken(state):
    return state["bridge_pos"] == state["head"]
