"""One fault scenario on one topology: hosts, workload, nemesis, heal, reads, check.

``run(scenario, topology, workdir, duration, seed)`` returns the checker's result
(``checker.Result``) and leaves in ``workdir`` the history of every process
(``*.jsonl``), ``history.jsonl`` (all of them merged, by start time), the bridges'
and clients' logs and ``result.json``.
"""
import json
import os
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from cluster import Cluster, Host, _die_with_parent, free_port  # noqa: E402

from . import checker, clock, history  # noqa: E402
from .net import Network  # noqa: E402

HOSTS = 3
WRITERS = 2
READERS = 1
RATE = 120.0
READ_RATE = 60.0
HEARTBEAT = 0.5
FAILURE_TIMEOUT = 2.0
TIMEOUT = 3.0  # topology_opts["timeout"] (partitioned) / ["bridge_timeout"] (replicated)
KEYS = 1000
COUNTERS = 20
TAGS = 16
SECRET = b"fault-histories-shared-secret-0123456789"
CONVERGE_WAIT = 30.0

TOPOLOGIES = {
    "replicated": dict(topology="replicated", cache_opts={}, bridge_extra=[],
                       topology_opts={"bridge_timeout": TIMEOUT}),
    "partitioned": dict(topology="partitioned", cache_opts={}, bridge_extra=["--backups", "1"],
                        topology_opts={"timeout": TIMEOUT}),
    "partitioned+near": dict(topology="partitioned", cache_opts={"near_cache": True},
                             bridge_extra=["--backups", "1"], topology_opts={"timeout": TIMEOUT}),
}


class Run:
    """The state a nemesis acts on: the network, the hosts, their client processes."""

    def __init__(self, scenario, topology, workdir, duration, seed):
        self.scenario, self.topology_name = scenario, topology
        self.topo = TOPOLOGIES[topology]
        self.workdir = str(workdir)
        self.histdir = os.path.join(self.workdir, "ops")
        os.makedirs(self.histdir, exist_ok=True)
        self.duration, self.seed = duration, seed
        self.cache_name = f"f{uuid.uuid4().hex[:10]}"
        self.clients = {}  # proc name -> (Popen, host index)
        self.generation = {}
        self.nemesis_rec = history.Recorder(os.path.join(self.histdir, "nemesis.jsonl"), "nemesis", "-")
        self.net = None
        self.cluster = None
        self.start_at = None
        self.notes = []

    # ---- setup ----------------------------------------------------------------------------

    def setup(self):
        self.net = Network(HOSTS)
        self.cluster = Cluster(self.workdir, n=0, secret=SECRET, start=False, name=self.cache_name,
                               topology=self.topo["topology"], cache_opts=self.topo["cache_opts"],
                               bridge_extra=self.topo["bridge_extra"])
        run_id = uuid.uuid4().hex[:8]
        if self.topo["topology"] == "partitioned":  # workers sign their requests to the data ports
            self.topology_opts = dict(self.topo["topology_opts"], secret_file=self.cluster.secret_file)
            agent_opts = dict(self.topo["cache_opts"], topology_opts={"secret_file": self.cluster.secret_file})
        else:
            self.topology_opts, agent_opts = dict(self.topo["topology_opts"]), self.topo["cache_opts"]
        for i in range(HOSTS):
            host = Host("ABCDEFGHIJ"[i], self.cache_name, self.workdir, node_id=i + 1, capacity="32MiB",
                        run_id=run_id, bridge_timeout=TIMEOUT, listen_host=self.net.addr(i),
                        topology=self.topo["topology"], cache_opts=agent_opts,
                        bridge_extra=self.topo["bridge_extra"])
            host.netns = self.net.ns(i)
            while host.data_port == host.port:  # two independent random picks can meet
                host.data_port = free_port()
                host.data_addr = f"vela://{self.net.addr(i)}:{host.data_port}"
            self.cluster.hosts.append(host)
        skew = self.scenario.skew
        if skew is not None:
            host = self.hosts[skew[0]]
            host.env = clock.skewed_env(host.env, skew[1])
            measured = clock.measure(host.env)
            self.notes.append(f"host {host.label} clock offset: time.time() {measured[0]:+g} s, "
                              f"C CLOCK_REALTIME {measured[1]:+g} s, CLOCK_MONOTONIC {measured[2]:+g} s")
            if measured[0] != skew[1] or measured[1] != skew[1] or measured[2] != 0:
                raise RuntimeError(f"the clock shim did not take: {self.notes[-1]}")

    @property
    def hosts(self):
        return self.cluster.hosts

    def start_bridges(self):
        for i, host in enumerate(self.hosts):
            seed = self.hosts[1 if i == 0 else 0]
            host.start_bridge(join=[seed], secret_file=self.cluster.secret_file, wait=False,
                              heartbeat=HEARTBEAT, failure_timeout=FAILURE_TIMEOUT)
        for host in self.hosts:
            host.wait_bridge()
        self.cluster.wait_members(timeout=20)

    # ---- clients ---------------------------------------------------------------------------

    def client_config(self, i, role, proc, **extra):
        return dict(role=role, proc=proc, host=self.hosts[i].label, cache=self.cache_name,
                    topology=self.topo["topology"], cache_opts=self.topo["cache_opts"],
                    topology_opts=self.topology_opts, keys=KEYS, counters=COUNTERS, tags=TAGS,
                    seed=f"{self.seed}:{proc}", out=os.path.join(self.histdir, f"{proc}.jsonl"), **extra)

    def launch(self, i, cfg, stdout=None):
        host = self.hosts[i]
        log = open(os.path.join(self.workdir, f"client-{cfg['proc']}.log"), "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", self.net.ns(i), sys.executable,
                                 os.path.join(HERE, "client.py"), json.dumps(cfg)],
                                stdin=subprocess.DEVNULL, stdout=stdout or log, stderr=log, env=host.env,
                                cwd=self.workdir, preexec_fn=_die_with_parent)
        log.close()
        return proc

    def start_workload(self):
        self.start_at = time.monotonic() + 3.0  # the clients import and open the cache meanwhile
        for i, host in enumerate(self.hosts):
            for w in range(WRITERS):
                flush_at = self.duration / 3 if (i, w) == (0, 0) else None
                self.spawn(i, f"{host.label}w{w}", "writer", RATE, flush_at=flush_at)
            for r in range(READERS):
                self.spawn(i, f"{host.label}r{r}", "reader", READ_RATE)

    def spawn(self, i, base, role, rate, flush_at=None):
        gen = self.generation.get(base, 0)
        self.generation[base] = gen + 1
        proc = base if gen == 0 else f"{base}.{gen}"
        start_at = max(self.start_at, time.monotonic() + 0.0)
        remaining = self.start_at + self.duration - start_at
        cfg = self.client_config(i, role, proc, rate=rate, start_at=start_at, duration=remaining,
                                 flush_at=None if flush_at is None else flush_at - (start_at - self.start_at))
        self.clients[proc] = (self.launch(i, cfg), i, base, role, rate)
        return proc

    def kill_client(self, proc):
        """SIGKILL a client (a worker process of the host) and start its replacement."""
        popen, i, base, role, rate = self.clients.pop(proc)
        popen.kill()
        popen.wait(10)
        return self.spawn(i, base, role, rate)

    def writers_of(self, i):
        return [p for p, c in self.clients.items() if c[1] == i and c[3] == "writer"]

    def wait_workload(self):
        deadline = self.start_at + self.duration + TIMEOUT + 15
        for proc, (popen, *_rest) in list(self.clients.items()):
            try:
                popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.notes.append(f"client {proc} did not finish: killed")
                popen.kill()
                popen.wait(10)

    def final_reads(self):
        """{host label: {key: value}} read through each host's cache."""
        procs = []
        for i, host in enumerate(self.hosts):
            cfg = self.client_config(i, "final", f"{host.label}final", start_at=0, duration=0, rate=1)
            cfg["out"] = os.devnull
            procs.append((host.label, self.launch(i, cfg, stdout=subprocess.PIPE)))
        out = {}
        for label, p in procs:
            try:
                data, _ = p.communicate(timeout=120)
                out[label] = json.loads(data)
            except (subprocess.TimeoutExpired, ValueError):
                p.kill()
                p.communicate()
                out[label] = None
        return out

    # ---- the nemesis's tools ---------------------------------------------------------------

    def fault(self, name, hosts, t0, t1):
        """Record that ``hosts`` (indexes) were hurt by ``name`` from t0 to t1."""
        self.nemesis_rec.write({"f": "fault", "type": "fault", "fault": name, "p": "nemesis",
                                "hosts": [self.hosts[i].label for i in hosts], "t0": t0, "t1": t1})

    def sleep_until(self, offset):
        """Sleep until ``offset`` seconds after the workload started."""
        time.sleep(max(0.0, self.start_at + offset - time.monotonic()))

    def heal_all(self):
        """Whatever a nemesis left: network healed, bridges running and resumed."""
        self.net.heal()
        for host in self.hosts:
            if host.paused:
                host.resume()
            if not host.bridge_alive():
                host.restart_bridge(wait=False)
        for host in self.hosts:
            host.wait_bridge(timeout=30)

    def close(self):
        for popen, *_rest in self.clients.values():
            if popen.poll() is None:
                popen.kill()
                popen.wait(10)
        self.nemesis_rec.close()
        if self.cluster is not None:
            self.cluster.close()
        if self.net is not None:
            self.net.close()


def converge(run):
    """Final reads, repeated until every host reads the same (or CONVERGE_WAIT passed)."""
    deadline = time.monotonic() + CONVERGE_WAIT
    while True:
        reads = run.final_reads()
        if checker.diverging_keys(reads) == [] or time.monotonic() > deadline:
            return reads
        time.sleep(2.0)


def run(scenario, topology, workdir, duration=30.0, seed=1):
    """Run ``scenario`` (a nemesis.Scenario) on ``topology``; the checker's result."""
    os.makedirs(workdir, exist_ok=True)
    r = Run(scenario, topology, workdir, max(duration, scenario.min_duration), seed)
    try:
        r.setup()
        scenario.before_start(r)
        r.start_bridges()
        r.start_workload()
        try:
            scenario.nemesis(r)
        finally:
            r.wait_workload()
            r.heal_all()
        try:
            r.cluster.wait_members(timeout=CONVERGE_WAIT)
        except AssertionError as exc:
            r.notes.append(f"membership after the heal: {str(exc).splitlines()[0]}")
        reads = converge(r)
        with open(os.path.join(r.workdir, "reads.json"), "w") as f:
            json.dump(reads, f)
        extra = scenario.after_converged(r, reads)
        history.merge(r.histdir, os.path.join(r.workdir, "history.jsonl"))
        return check_run(r.workdir, topology, extra or {}, r.notes)
    finally:
        r.close()


def check_run(workdir, topology, extra, notes):
    """The checker's result for the run kept in ``workdir`` (its ``ops/`` and
    ``reads.json``), written to ``result.json``."""
    with open(os.path.join(workdir, "reads.json")) as f:
        reads = json.load(f)
    result = checker.check(history.load(os.path.join(workdir, "ops")), reads, timeout=TIMEOUT,
                           grace=2 * FAILURE_TIMEOUT + 1.0,
                           delete_scope="host" if topology != "partitioned" else "cluster",
                           counters="register" if topology == "replicated" else "sum")
    result.extra.update(extra)
    result.notes.extend(notes)
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(dict(result.as_dict(), topology=topology), f, indent=1, default=str)
    return result


def recheck(workdir, topology):
    """Check a kept run again (after a change of the checker)."""
    with open(os.path.join(workdir, "result.json")) as f:
        old = json.load(f)
    return check_run(workdir, topology, old.get("extra", {}), old.get("notes", []))
