"""The simulated network: one namespace per host, veth links into a Linux bridge.

Every host's bridge and workers run inside the host's network namespace (``ip netns
exec``); the root side of each veth is a port of a Linux bridge that also carries an
address for the test process (it reads, captures and replays from there; hosts that
a test runs in its own namespace listen there too). Faults are iptables rules inside
a host's own namespace, so they touch nothing outside this run: a namespace has its
own tables; or a host's link taken down (``unplug``). Names and the subnet carry a
token unique to the run (parallel runs on the same machine never collide) and
``close`` removes everything, whatever state the run is in. The one implementation
of simulated hosts for the fault runs and the tests (``with Network(1) as net:``).
"""
import random
import shutil
import subprocess
import uuid

ROOT_OCTET = 254


def ip(*args, check=True):
    return subprocess.run(["ip"] + [str(a) for a in args], capture_output=True, text=True, timeout=20,
                          check=check)


def unavailable():
    """Why this machine cannot run the fault suite (None when it can)."""
    import os

    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces and iptables need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"the {tool} command is not installed"
    probe = f"vfp{uuid.uuid4().hex[:6]}"
    out = ip("netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"ip netns add failed: {out.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


class Network:
    """A /24 of simulated hosts: host i has 10.a.b.(i+1) in namespace ``ns(i)``."""

    def __init__(self, hosts):
        self.token = uuid.uuid4().hex[:6]
        self.subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.bridge = f"vfb{self.token}"
        self.namespaces = []
        self.links = []
        self.hosts = hosts
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self):
        ip("link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        ip("addr", "add", f"{self.root_addr}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i in range(self.hosts):
            ns, outside, inside = self.ns(i), f"{self.outer_prefix}{i}", f"vfi{self.token}{i}"
            ip("netns", "add", ns)
            self.namespaces.append(ns)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            self.links.append(outside)
            ip("link", "set", inside, "netns", ns)
            ip("link", "set", outside, "master", self.bridge)
            ip("link", "set", outside, "up")
            ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", inside)
            ip("-n", ns, "link", "set", inside, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    @property
    def root_addr(self):
        return f"{self.subnet}.{ROOT_OCTET}"

    @property
    def outer_prefix(self):
        """The name prefix of the links' outer ends (where a capture listens)."""
        return f"vfo{self.token}"

    def ns(self, i):
        return f"vfn{self.token}{i}"

    def addr(self, i):
        return f"{self.subnet}.{i + 1}"

    # ---- faults: iptables in a host's own namespace ----------------------------------

    def iptables(self, i, *args):
        subprocess.run(["ip", "netns", "exec", self.ns(i), "iptables", "-w"] + [str(a) for a in args],
                       check=True, capture_output=True, text=True, timeout=20)

    def cut(self, i, others):
        """Drop every packet between host i and the hosts ``others`` (both ways)."""
        for j in others:
            self.iptables(i, "-A", "INPUT", "-s", self.addr(j), "-j", "DROP")
            self.iptables(i, "-A", "OUTPUT", "-d", self.addr(j), "-j", "DROP")

    def isolate(self, i):
        """Host i reaches nobody and nobody reaches it (the test process included)."""
        self.cut(i, [j for j in range(self.hosts) if j != i])

    def lose(self, i, probability):
        """Drop a random share of host i's packets, both ways (no netem on this kernel)."""
        for chain in ("INPUT", "OUTPUT"):
            self.iptables(i, "-A", chain, "!", "-o" if chain == "OUTPUT" else "-i", "lo",
                          "-m", "statistic", "--mode", "random", "--probability", probability, "-j", "DROP")

    def unplug(self, i):
        """Host i's link taken down: nothing reaches it, nothing leaves it (the test's
        namespace included)."""
        ip("link", "set", f"{self.outer_prefix}{i}", "down")

    def plug(self, i):
        ip("link", "set", f"{self.outer_prefix}{i}", "up")

    def heal(self, i=None):
        for j in range(self.hosts) if i is None else [i]:
            self.iptables(j, "-F", "INPUT")
            self.iptables(j, "-F", "OUTPUT")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for link in reversed(self.links):
            ip("link", "del", link, check=False)
        for ns in self.namespaces:
            ip("netns", "del", ns, check=False)
        self.links, self.namespaces = [], []
