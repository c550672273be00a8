"""A real network partition: one host's bridge in its own network namespace.

Hosts A and B run their bridges in the test's network namespace, host C's bridge
runs in a namespace of its own (``ip netns``), joined to the first by a veth pair
(10.77.0.1/24 on the test's side, 10.77.0.2/24 on C's: addresses that exist only
inside this test). Taking the link down cuts C off; past the failure timeout
everyone sees the other side dead; both sides write; the link comes back up and
every host converges. Needs root and iproute2; elsewhere the test is skipped with
the reason. Every namespace and link it made is removed, whatever happens.
"""
import os
import shutil
import subprocess
import uuid

import pytest

from cluster import FAILURE_TIMEOUT, Cluster, eventually

pytest.importorskip("zmq")

SECRET = b"netns-test-secret-0123456789abcdef"
HOST_ADDR, NS_ADDR = "10.77.0.1", "10.77.0.2"


def _ip(*args, check=True):
    return subprocess.run(["ip"] + list(args), capture_output=True, text=True, timeout=20, check=check)


def _unavailable():
    """Why network namespaces cannot be used here (None when they can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add); the test runs as a regular user"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"velap{uuid.uuid4().hex[:6]}"
    out = _ip("netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"ip netns add failed: {out.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Partition:
    """A network namespace with a veth link to the test's namespace."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.ns = f"velat{tag}"
        self.host_if, self.ns_if = f"vlh{tag}", f"vln{tag}"
        self.made = False

    def __enter__(self):
        _clean_leftovers()
        _ip("netns", "add", self.ns)
        self.made = True
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.ns)
        _ip("addr", "add", f"{HOST_ADDR}/24", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.ns, "addr", "add", f"{NS_ADDR}/24", "dev", self.ns_if)
        _ip("-n", self.ns, "link", "set", self.ns_if, "up")
        _ip("-n", self.ns, "link", "set", "lo", "up")
        return self

    def cut(self):
        _ip("link", "set", self.host_if, "down")

    def heal(self):
        _ip("link", "set", self.host_if, "up")

    def __exit__(self, *exc):
        _ip("link", "del", self.host_if, check=False)  # removes its peer too
        if self.made:
            _ip("netns", "del", self.ns, check=False)


def _clean_leftovers():
    """Links and namespaces of an earlier run of this test that was killed."""
    out = _ip("-o", "link", "show", check=False).stdout
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith("vlh"):
            _ip("link", "del", name, check=False)
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith("velat"):
            _ip("netns", "del", name, check=False)


def test_a_host_cut_off_by_the_network_rejoins_and_converges(tmp_path):
    reason = _unavailable()
    if reason:
        pytest.skip(reason=reason)
    with Partition() as part:
        c = Cluster(tmp_path, n=0, secret=SECRET, start=False)
        try:
            a = c.add_host(start=False, listen_host=HOST_ADDR)
            b = c.add_host(start=False, listen_host=HOST_ADDR)
            far = c.add_host(start=False, listen_host=NS_ADDR)
            far.netns = part.ns
            a.start_bridge(join=[b], secret_file=c.secret_file, wait=False)
            b.start_bridge(join=[a], secret_file=c.secret_file, wait=False)
            far.start_bridge(join=[a], secret_file=c.secret_file, wait=False)
            for h in c:
                h.wait_bridge()
            c.wait_members(timeout=15)
            a.put_many([(f"before{i}", i) for i in range(200)])
            c.wait_converged(timeout=10, expect=200)

            part.cut()
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
                part.heal()

            c.wait_members(timeout=20)
            dump = c.wait_converged(timeout=25, expect=200 - 2 + 300 + 150)
            keys = {bytes.fromhex(e[0]) for e in dump}
            assert b"sbefore0" not in keys and b"sbefore1" not in keys
        except BaseException:
            print(c.logs())
            raise
        finally:
            c.close()
