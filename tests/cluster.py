"""Simulated hosts on one machine, for the multi-host tests and the replication benchmark.

A simulated host is what a real one has, kept apart from the others the way hosts
are: its own ``VELA_NAMESPACE`` (the prefix of its shared-memory segments and of
its bridge's control socket, so a host's workers and its bridge share one table
and two hosts share nothing but the network), its own ``vela-bridge`` process,
and its own worker processes.

``Host`` starts an *agent*: a Python process with the host's namespace in its
environment that opens the cache and executes commands sent by the test as JSON
lines on its stdin, answering each with one JSON line on its stdout (this file run
as ``python cluster.py agent``). The agent forks further worker processes when a
command asks for several writers. The test drives the host's bridge itself
(start, SIGKILL, SIGSTOP/SIGCONT, restart).

Everything is bounded: every answer is awaited with a deadline, and
``eventually`` polls a condition until a deadline. ``Cluster.close`` (and each
``Host.close``) ends the bridges and agents it started and removes the hosts'
segments, whatever state they are in.

Values that cross the pipe are JSON; keys are str. ``dump()`` answers the host's
whole table as sorted ``(key_hex, value_hex, codec, tags, version)`` tuples, the
thing to compare between hosts (the remaining TTL is left out: it differs by the
time between two reads).
"""

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

HEARTBEAT = 0.2
FAILURE_TIMEOUT = 1.0
TOMBSTONE = 7  # the codec of a delete kept in a replicated table (native/table.h)


def _die_with_parent():
    """In a child before exec: SIGKILL it when the test process dies (an agent or a
    bridge must never outlive a killed test run)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the close() calls still clean up
        pass


def _ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


_GIVEN = set()  # ports free_port returned in this process: never twice


def wait_stopped(pid, timeout=5.0):
    """Until every thread of process ``pid`` is stopped (state T in /proc), or it died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
            states = []
            for task in tasks:
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
        except OSError:
            return  # (gone)
        if all(state in ("T", "t", "Z", "X") for state in states):
            return  # (stopped, or dead)
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} did not stop: thread states {states}")
        time.sleep(0.001)


def free_port():
    """A TCP port on loopback that nothing listens on right now, taken below the
    kernel's ephemeral range: the outgoing connections of every test (workers to
    data ports, bridges to each other) take their local ports from that range, and
    one of them could otherwise take a port reserved here before its bridge binds it
    (or while a bridge is down before its restart)."""
    import random

    lo, _ = _ephemeral_range()
    for _ in range(200):
        port = random.randrange(max(1024, lo - 12000), lo)
        if port in _GIVEN:
            continue  # (given to a host of this run whose bridge is not bound yet, or down)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _GIVEN.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(fn, timeout=10.0, interval=0.05, what="condition"):
    """Poll ``fn()`` until it returns a truthy value (returned); AssertionError after
    ``timeout`` seconds, naming the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not true within {timeout} s (last value: {_short(last)})")
        time.sleep(interval)


def _short(value, limit=600):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


class DataPortSession:
    """A connection to a bridge's data port made the way a worker makes it (the
    bridge's challenge, numbered requests whose MACs cover it), for tests that
    send requests of their own; ``raw`` keeps every frame sent, for replaying."""

    def __init__(self, data_addr, secret, timeout=5.0):
        from vela.bridge import dataport

        host, port = data_addr[len("vela://"):].rsplit(":", 1)
        self.secret = secret
        self.timeout = timeout
        self.client = dataport.Client(host, int(port), secret, time.monotonic() + timeout)
        self.raw = []  # the bytes of each request sent

    def send(self, msg):
        """Sends one request; (its number, the context its reply's MAC covers)."""
        from vela.bridge import dataport, protocol

        ctx, number = self.client.next_context(), self.client.number
        mac, payload = protocol.pack(self.secret, dict(msg, n=number), ctx)
        tag = dataport.header_tag(self.secret, ctx, len(payload), len(mac))
        data = dataport.REQUEST.pack(len(payload), len(mac), tag) + mac + payload
        self.client.number += 1
        self.client.sock.sendall(data)
        self.raw.append(data)
        return number, ctx

    def ask(self, msg):
        """One request and its reply (a dict)."""
        from vela.bridge import protocol

        _, ctx = self.send(msg)
        return protocol.unpack(self.secret, self.client.recv(self.timeout), ctx)

    def send_raw(self, data):
        self.client.sock.sendall(data)

    def closed_by_bridge(self, timeout=5.0):
        """True when the bridge hangs up (nothing but the end of the stream comes)."""
        try:
            self.client.recv(timeout)
        except TimeoutError:
            return False
        except OSError:
            return True
        return False

    def close(self):
        self.client.close()


def destroy_in(namespace, name):
    """Remove the cache ``name`` of the simulated host ``namespace`` (from this process)."""
    import vela

    return _in_namespace(namespace, lambda: vela.destroy(name))


def control_path_in(namespace, name):
    """The file of the bridge's control socket of cache ``name`` on host ``namespace``."""
    from vela.stores.replicated import control_endpoint

    return _in_namespace(namespace, lambda: control_endpoint(name)[len("ipc://"):])


def marks_path_in(namespace, name):
    """The file where workers of cache ``name`` on host ``namespace`` keep flushes and
    tag invalidations for the bridge."""
    from vela.stores.replicated import marks_path

    return _in_namespace(namespace, lambda: marks_path(name))


def _in_namespace(namespace, fn):
    old = os.environ.get("VELA_NAMESPACE")
    os.environ["VELA_NAMESPACE"] = namespace
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["VELA_NAMESPACE"]
        else:
            os.environ["VELA_NAMESPACE"] = old


class AgentError(RuntimeError):
    """A command failed in the agent (the message carries its traceback)."""


class Host:
    """One simulated host: an agent process with the host's namespace and the bridge."""

    def __init__(self, label, cache_name, workdir, node_id, capacity="32MiB", run_id=None,
                 bridge_timeout=3.0, listen_host="127.0.0.1", topology="replicated", cache_opts=None,
                 bridge_extra=(), netns=None, env=None):
        self.label = label
        self.topology = topology
        self.bridge_extra = list(bridge_extra)
        self.cache_name = cache_name
        self.workdir = workdir
        self.node_id = node_id
        self.capacity = capacity
        self.namespace = f"vt{run_id or uuid.uuid4().hex[:8]}{label}"
        self.port = free_port()
        self.listen = f"tcp://{listen_host}:{self.port}"
        self.data_port = free_port()  # partitioned caches: where workers send requests
        self.data_addr = f"vela://{listen_host}:{self.data_port}"
        self.env = dict(os.environ, VELA_NAMESPACE=self.namespace,
                        PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        self.env.pop("PYTHONSTARTUP", None)
        self.env.update(env or {})  # (e.g. a clock offset: LD_PRELOAD=libfaketime, FAKETIME)
        self.bridge = None
        self.bridge_args = None
        self.netns = netns  # a network namespace (ip netns) to run the bridge (and given here, the agent) in
        self.paused = False
        self.agent_log = os.path.join(workdir, f"agent-{label}.log")
        self.bridge_log = os.path.join(workdir, f"bridge-{label}.log")
        self._buf = b""
        self.side_agents = []
        self._open_args = dict(name=cache_name, capacity=capacity, bridge_timeout=bridge_timeout,
                               topology=topology, cache_opts=cache_opts or {})
        self.agent = self._spawn_agent()
        try:
            self.call("open", **self._open_args)
        except BaseException:
            self.close()
            raise

    def _spawn_agent(self):
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return subprocess.Popen(prefix + [sys.executable, "-u", os.path.abspath(__file__), "agent"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=open(self.agent_log, "ab"), env=self.env, cwd=self.workdir,
                                preexec_fn=_die_with_parent)

    def side_agent(self):
        """A second agent of this host (its own processes, the same namespace, the cache
        opened the same way): it runs a workload (``send``/``recv``) while the test
        drives the host through the first. Ended with the host."""
        side = object.__new__(Host)
        side.__dict__.update(label=f"{self.label}'", agent_log=self.agent_log, _buf=b"", netns=self.netns,
                             env=self.env, workdir=self.workdir, bridge=None, side_agents=[])
        side.agent = self._spawn_agent()
        self.side_agents.append(side)
        side.call("open", **self._open_args)
        return side

    def __repr__(self):
        return f"<Host {self.label} ns={self.namespace} node={self.node_id} {self.listen}>"

    # ---- the agent --------------------------------------------------------------------

    def send(self, op, **args):
        """Send a command without waiting for its answer (``recv`` reads it)."""
        line = json.dumps(dict(args, op=op)).encode() + b"\n"
        try:
            self.agent.stdin.write(line)
            self.agent.stdin.flush()
        except BrokenPipeError:
            raise AgentError(f"agent of host {self.label} is gone (exit {self.agent.poll()}):\n"
                             f"{self._tail(self.agent_log)}") from None

    def recv(self, timeout=30.0):
        """The answer to the oldest command sent and not yet answered."""
        deadline = time.monotonic() + timeout
        fd = self.agent.stdout.fileno()
        chunks = [self._buf]
        while b"\n" not in chunks[-1]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._buf = b"".join(chunks)
                raise AgentError(f"agent of host {self.label} did not answer within {timeout} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise AgentError(f"agent of host {self.label} died (exit {self.agent.poll()}):\n"
                                     f"{self._tail(self.agent_log)}")
                chunks.append(chunk)
        line, self._buf = b"".join(chunks).split(b"\n", 1)
        reply = json.loads(line)
        if "error" in reply:
            raise AgentError(f"host {self.label}: {reply['error']}")
        return reply["ok"]

    def call(self, op, timeout=30.0, **args):
        self.send(op, **args)
        return self.recv(timeout)

    # shorthands for the commands
    def put(self, key, value, ttl=None, tags=()):
        return self.call("put", key=key, value=value, ttl=ttl, tags=list(tags))

    def put_many(self, items, ttl=None, tags=()):
        return self.call("put_many", items=[[k, v] for k, v in items], ttl=ttl, tags=list(tags))

    def get(self, key, default=None):
        found, value = self.call("get", key=key)
        return value if found else default

    def has(self, key):
        return self.call("get", key=key)[0]

    def delete(self, key):
        return self.call("delete", key=key)

    def incr(self, key, delta=1, ttl=None):
        return self.call("incr", key=key, delta=delta, ttl=ttl)

    def touch(self, key, ttl=None):
        return self.call("touch", key=key, ttl=ttl)

    def ttl(self, key):
        """Remaining seconds; None when it never expires; KeyError when absent."""
        found, remaining = self.call("ttl", key=key)
        if not found:
            raise KeyError(key)
        return remaining

    def flush(self):
        return self.call("flush")

    def invalidate_tag(self, tag):
        return self.call("invalidate_tag", tag=tag)

    def dump(self):
        return [tuple(e) for e in self.call("dump")]

    def digest(self):
        """(entries, a hash of the whole dump): cheap to compare between hosts."""
        return tuple(self.call("digest"))

    def size(self):
        return self.call("size")

    def cluster(self):
        return self.call("cluster")

    def stats(self):
        return self.call("stats")

    def status(self, timeout=2.0):
        """The bridge's status over its control socket (None when it does not answer)."""
        return self.call("bridge_status", timeout=timeout + 10, bridge_timeout=timeout)

    # ---- the bridge ---------------------------------------------------------------------

    def start_bridge(self, join=(), secret_file=None, insecure=False, extra=(), wait=True,
                     heartbeat=HEARTBEAT, failure_timeout=FAILURE_TIMEOUT, listen=None):
        """Start this host's vela-bridge; ``join`` holds Hosts or addresses."""
        assert self.bridge is None or self.bridge.poll() is not None, "the bridge runs already"
        args = ["run", "--cache", self.cache_name, "--listen", listen or self.listen,
                "--heartbeat", str(heartbeat), "--failure-timeout", str(failure_timeout),
                "--node-id", str(self.node_id), "--log-level", "INFO"]
        for peer in join:
            args += ["--join", peer.listen if isinstance(peer, Host) else peer]
        if secret_file:
            args += ["--secret-file", secret_file]
        if insecure:
            args.append("--insecure")
        if self.topology == "partitioned":
            args += ["--data-listen", self.data_addr[len("vela://"):]]
        args += self.bridge_extra + list(extra)
        self.bridge_args = args
        self._launch_bridge(wait)
        return self.bridge

    def _launch_bridge(self, wait=True):
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        log = open(self.bridge_log, "ab")
        log.write(f"---- start {' '.join(self.bridge_args)}\n".encode())
        log.flush()
        self.bridge = subprocess.Popen(prefix + [sys.executable, "-m", "vela.bridge"] + self.bridge_args,
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env=self.env, cwd=self.workdir, preexec_fn=_die_with_parent)
        log.close()
        self.paused = False
        if wait:
            self.wait_bridge()

    def wait_bridge(self, timeout=15.0):
        """Until the bridge answers on its control socket (or fail with its log)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.bridge.poll() is not None:
                raise AssertionError(f"the bridge of host {self.label} exited with {self.bridge.returncode}:\n"
                                     f"{self.bridge_output()}")
            status = self.status(timeout=0.5)
            if status and status.get("pid") == self.bridge.pid:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"the bridge of host {self.label} did not answer within {timeout} s:\n"
                                     f"{self.bridge_output()}")
            time.sleep(0.05)

    def restart_bridge(self, wait=True):
        """Start the bridge again with the arguments it had (it must have stopped)."""
        assert self.bridge_args is not None
        if self.bridge is not None and self.bridge.poll() is None:
            raise AssertionError("the bridge still runs: kill it first")
        self._launch_bridge(wait)
        return self.bridge

    def kill_bridge(self, sig=signal.SIGKILL, timeout=10.0):
        """Send ``sig`` and wait for the bridge to exit; its exit code."""
        if self.bridge is None or self.bridge.poll() is not None:
            return None if self.bridge is None else self.bridge.returncode
        if self.paused and sig != signal.SIGKILL:
            self.resume()
        self.bridge.send_signal(sig)
        try:
            return self.bridge.wait(timeout)
        except subprocess.TimeoutExpired:
            self.bridge.kill()
            return self.bridge.wait(5)

    def pause(self):
        """SIGSTOP the bridge (it stays connected but says nothing). Returns once every
        thread of it has stopped: the signal is asynchronous, and a bridge's data port
        thread could otherwise answer one more request meanwhile."""
        self.bridge.send_signal(signal.SIGSTOP)
        self.paused = True
        wait_stopped(self.bridge.pid)

    def resume(self):
        self.bridge.send_signal(signal.SIGCONT)
        self.paused = False

    def bridge_alive(self):
        return self.bridge is not None and self.bridge.poll() is None

    def bridge_output(self):
        return self._tail(self.bridge_log)

    @staticmethod
    def _tail(path, limit=4000):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return "(no log)"
        return data[-limit:].decode(errors="replace")

    def cli(self, *args, timeout=20.0):
        """Run ``python -m vela.bridge ARGS`` in this host's environment."""
        return subprocess.run([sys.executable, "-m", "vela.bridge"] + list(args), env=self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=self.workdir)

    # ---- the cluster view ------------------------------------------------------------------

    def member_states(self):
        """{node_id: state} from the cluster view the bridge writes into the segment."""
        view = self.cluster() or {}
        return {m["node_id"]: m["state"] for m in view.get("members", [])}

    # ---- the end ------------------------------------------------------------------------

    def close(self):
        """Stop the bridge and the agent, remove the host's segment; never raises."""
        for side in self.side_agents:
            try:
                side.agent.kill()
                side.agent.wait(5)
                side.agent.stdout.close()
            except Exception:  # noqa: BLE001
                pass
        try:
            if self.bridge is not None and self.bridge.poll() is None:
                if self.paused:
                    self.bridge.send_signal(signal.SIGCONT)
                self.bridge.terminate()
                try:
                    self.bridge.wait(5)
                except subprocess.TimeoutExpired:
                    self.bridge.kill()
                    self.bridge.wait(5)
        except Exception:  # noqa: BLE001 - cleaning up whatever is left
            pass
        try:
            if self.agent.poll() is None:
                try:
                    self.agent.stdin.close()
                except OSError:
                    pass
                try:
                    self.agent.wait(5)
                except subprocess.TimeoutExpired:
                    self.agent.kill()
                    self.agent.wait(5)
            self.agent.stdout.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            destroy_in(self.namespace, self.cache_name)
        except Exception:  # noqa: BLE001
            pass
        for path in (control_path_in(self.namespace, self.cache_name),
                     marks_path_in(self.namespace, self.cache_name)):
            try:
                os.unlink(path)
            except OSError:
                pass


class Cluster:
    """Several simulated hosts of one replicated cache."""

    def __init__(self, workdir, n=3, capacity="32MiB", secret=None, start=True, name=None,
                 topology="replicated", cache_opts=None, bridge_extra=()):
        self.workdir = str(workdir)
        self.topology = topology
        self.cache_opts = cache_opts or {}
        self.bridge_extra = list(bridge_extra)
        self.name = name or f"r{uuid.uuid4().hex[:10]}"
        self.run_id = uuid.uuid4().hex[:8]
        self.capacity = capacity
        self.hosts = []
        self.secret_file = None
        if secret is not None:
            self.secret_file = self.write_secret(secret, "secret")
        try:
            for _ in range(n):
                self.add_host(start=False)
            if start:
                self.start()
        except BaseException:
            self.close()
            raise

    def write_secret(self, secret, filename):
        path = os.path.join(self.workdir, filename)
        with open(path, "wb") as f:
            f.write(secret if isinstance(secret, bytes) else secret.encode())
        os.chmod(path, 0o600)
        return path

    def add_host(self, start=True, join=None, listen_host="127.0.0.1", netns=None, env=None, **bridge_kw):
        """A new host (its cache created); with ``start``, its bridge joins ``join``
        (default: the first host). With ``netns``, the whole host (agent, workers and
        bridge) runs in that network namespace; ``env``: more environment for its processes."""
        label = "ABCDEFGHIJ"[len(self.hosts)]
        host = Host(label, self.name, self.workdir, node_id=len(self.hosts) + 1, capacity=self.capacity,
                    run_id=self.run_id, listen_host=listen_host, topology=self.topology,
                    cache_opts=self.cache_opts, bridge_extra=self.bridge_extra, netns=netns, env=env)
        self.hosts.append(host)
        if start:
            peers = join if join is not None else [self.hosts[0]]
            host.start_bridge(join=peers, secret_file=bridge_kw.pop("secret_file", self.secret_file), **bridge_kw)
        return host

    def start(self):
        """Start every host's bridge; each joins the first host (the first joins the second)."""
        for i, host in enumerate(self.hosts):
            seed = self.hosts[1] if i == 0 and len(self.hosts) > 1 else self.hosts[0]
            host.start_bridge(join=[seed] if seed is not host else [], secret_file=self.secret_file,
                              wait=False)
        for host in self.hosts:
            host.wait_bridge()

    def __getitem__(self, i):
        return self.hosts[i]

    def __iter__(self):
        return iter(self.hosts)

    # ---- waiting for the cluster ----------------------------------------------------------

    def wait_members(self, hosts=None, timeout=10.0):
        """Until every given host's cluster view shows every other given host alive."""
        hosts = hosts or self.hosts

        def check():
            views = {h.label: h.member_states() for h in hosts}
            for h in hosts:
                want = {o.node_id for o in hosts if o is not h}
                got = {n for n, s in views[h.label].items() if s == "alive"}
                if not want <= got:
                    return None
            return views or True

        return eventually(check, timeout, what=f"every host sees every other alive ({self.describe(hosts)})")

    def wait_ready(self, hosts=None, timeout=10.0):
        """Until every given host's bridge says the cache is ready: synced from a peer, and
        it knows the cluster well enough to answer a flush or tag invalidation for it."""
        hosts = hosts or self.hosts
        eventually(lambda: all(((h.status() or {}).get("caches") or {}).get(self.name, {}).get("ready")
                               for h in hosts), timeout, what=f"every bridge is ready ({self.describe(hosts)})")

    def wait_converged(self, hosts=None, timeout=15.0, expect=None):
        """Until every host has identical contents (and, with ``expect``, that many
        entries); returns the common dump. On failure says how the hosts differ."""
        hosts = hosts or self.hosts
        deadline = time.monotonic() + timeout
        while True:
            digests = [h.digest() for h in hosts]
            if all(d == digests[0] for d in digests[1:]) and (expect is None or digests[0][0] == expect):
                dump = hosts[0].dump()
                if len(dump) == digests[0][0]:
                    return dump
            if time.monotonic() > deadline:
                dumps = [h.dump() for h in hosts]
                raise AssertionError(f"hosts did not converge within {timeout} s: "
                                     f"{diff_dumps(hosts, dumps)}\n{self.describe(hosts)}")
            time.sleep(0.1)

    def describe(self, hosts=None):
        parts = []
        for h in hosts or self.hosts:
            try:
                st = h.status(timeout=0.5)
            except Exception as exc:  # noqa: BLE001
                st = f"({exc})"
            parts.append(f"{h.label}: bridge {'alive' if h.bridge_alive() else 'down'}, status "
                         f"{_short(st, 1500)}")
        return "\n".join(parts)

    def logs(self):
        return "\n".join(f"==== bridge {h.label}\n{h.bridge_output()}" for h in self.hosts)

    def close(self):
        for host in self.hosts:
            host.close()


@contextlib.contextmanager
def partitioned_with_secret(workdir, secret, n=2):
    """A partitioned cluster of ``n`` hosts whose bridges and workers share ``secret``,
    every partition table ready; closed on the way out."""
    secret_file = os.path.join(str(workdir), "secret")  # the Cluster writes it there before any host opens
    c = Cluster(workdir, n=n, secret=secret, topology="partitioned",
                cache_opts={"topology_opts": {"secret_file": secret_file}})
    try:
        c.wait_members()
        c.wait_ready(timeout=15)
        yield c
    finally:
        c.close()


def diff_dumps(hosts, dumps):
    """How the hosts' dumps differ, shortly."""
    lines = [f"sizes {', '.join(f'{h.label}={len(d)}' for h, d in zip(hosts, dumps))}"]
    by_host = [{e[0]: e for e in d} for d in dumps]
    keys = sorted(set().union(*by_host))
    shown = 0
    for key in keys:
        entries = [m.get(key) for m in by_host]
        if any(e != entries[0] for e in entries[1:]):
            shown += 1
            if shown <= 5:
                lines.append(f"key {bytes.fromhex(key)!r}: " + "; ".join(
                    f"{h.label}={'absent' if e is None else (bytes.fromhex(e[1])[:40], e[4])}"
                    for h, e in zip(hosts, entries)))
    lines.append(f"{shown} differing keys")
    return "\n".join(lines)


# ======================================================================================
# the agent (runs in the simulated host: VELA_NAMESPACE is in its environment)


def _worker_main(conn, name, script):
    """A worker process of the host: its own handle on the cache, a list of writes."""
    try:
        import random

        import vela

        cache = vela.Cache(name, topology=script.get("topology", "replicated"), sweep_interval=None,
                           **script.get("cache_opts", {}))
        if script.get("kind") == "history":
            conn.send(("ok", _history(cache, script)))
            cache.close()
            return
        if script.get("kind") == "fetch":  # get_or_fetch of one key, counting the fetches
            fetched = []
            barrier_at = script["start_at"]
            time.sleep(max(0.0, barrier_at - time.time()))
            value = cache.get_or_fetch(script["key"], lambda k: fetched.append(k) or time.sleep(0.3) or "v")
            cache.close()
            conn.send(("ok", [value, len(fetched)]))
            return
        rng = random.Random(script["seed"])
        keys = script["keys"]
        done = 0
        for i in range(script["ops"]):
            key = f"k{rng.randrange(keys)}"
            r = rng.random()
            if r < script.get("delete", 0.0):
                cache.delete(key)
            else:
                cache.put(key, f"{script['label']}-{i}", tags=[f"t{rng.randrange(3)}"])
            done += 1
            if script.get("pause") and i % 50 == 0:
                time.sleep(script["pause"])
        cache.close()
        conn.send(("ok", done))
    except BaseException:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _history(cache, script):
    """Operations on this worker's own keys (``prefix``+i, each with tag ``prefix``t(i%10))
    for ``seconds``: puts, deletes and tag invalidations, each recorded in order as
    [op, key or tag, value, acknowledged?, error] (history.check judges them)."""
    import random

    rng = random.Random(script["seed"])
    prefix, keys = script["prefix"], script["keys"]
    out = []
    end = time.monotonic() + script["seconds"]
    n = 0
    while time.monotonic() < end:
        n += 1
        r = rng.random()
        i = rng.randrange(keys)
        key, tag = f"{prefix}{i}", f"{prefix}t{i % 10}"
        try:
            if r < script.get("tag", 0.006):
                op, target, value = "tag", tag, None
                cache.invalidate_tag(tag)
            elif r < script.get("tag", 0.006) + script.get("delete", 0.1):
                op, target, value = "del", key, None
                cache.delete(key)
            else:
                op, target, value = "put", key, n
                cache.put(key, n, tags=[tag])
            out.append([op, target, value, True, None])
        except Exception as exc:  # noqa: BLE001 - an unacknowledged operation: may or may not have happened
            out.append([op, target, value, False, f"{type(exc).__name__}: {exc}"[:200]])
        time.sleep(script.get("pause", 0.004))
    return out


class Agent:
    def __init__(self):
        self.cache = None
        self.name = None
        self.bridge_client = None

    def op_open(self, name, capacity, bridge_timeout=3.0, topology="replicated", cache_opts=None):
        import vela

        self.name = name
        self.topology = topology
        self.cache_opts = dict(cache_opts or {})
        opts = {"bridge_timeout": bridge_timeout} if topology == "replicated" else {"timeout": bridge_timeout}
        cache_opts = dict(self.cache_opts)
        opts.update(cache_opts.pop("topology_opts", {}))
        self.cache = vela.Cache(name, capacity=capacity, topology=topology, sweep_interval=None,
                                topology_opts=opts, **cache_opts)
        return self.cache.info()["capacity"]

    def op_open_other(self, topology_opts, key="via-other"):
        """A second handle on the cache with other topology options; the outcome of a
        put and a get of ``key`` through it (["ok", value] or ["raised", type, message])."""
        import vela

        try:
            other = vela.Cache(self.name, topology="partitioned", sweep_interval=None,
                               topology_opts=topology_opts)
        except Exception as exc:  # noqa: BLE001
            return ["raised", type(exc).__name__, str(exc)]
        try:
            other.put(key, 1)
            return ["ok", other.get(key)]
        except Exception as exc:  # noqa: BLE001
            return ["raised", type(exc).__name__, str(exc)]
        finally:
            other.close()

    def op_try(self, method, args=(), kwargs=None):
        """Call a cache method: ["ok", result] or ["raised", exception type, message]."""
        try:
            return ["ok", getattr(self.cache, method)(*args, **(kwargs or {}))]
        except Exception as exc:  # noqa: BLE001 - the test looks at what was raised
            return ["raised", type(exc).__name__, str(exc)]

    def op_exec_loop(self, code):
        """Run ``code`` with ``cache`` bound to this host's handle (load generators)."""
        exec(code, {"cache": self.cache})  # noqa: S102 - test-only, code comes from the test

    def op_raw_request(self, addr, fields):
        """One request straight to the bridge at ``addr`` (field k_str: a str key to encode);
        the reply with bytes shown as hex."""
        from vela import _native

        fields = dict(fields)
        if "k_str" in fields:
            fields["k"] = _native.encode_key(fields.pop("k_str"))
        epoch = fields.pop("e", None)  # (the partition table epoch to claim; default: the host's)
        reply = self.cache._store._links.request(addr, fields, self.cache._store._view().epoch if epoch is None else epoch)
        return {k: v.hex() if isinstance(v, bytes) else v for k, v in reply.items()}

    def op_hold_fetch(self, key):
        """Fork a worker that starts get_or_fetch(key) with a fetch that never ends
        (it holds the key's lease); returns its pid once the fetch has begun."""
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        started = ctx.Event()

        def holder():
            self.cache.get_or_fetch(key, lambda k: started.set() or time.sleep(600))

        proc = ctx.Process(target=holder, daemon=True)
        proc.start()
        if not started.wait(10):
            raise TimeoutError("the holder did not start its fetch")
        self._holders = getattr(self, "_holders", []) + [proc]
        return proc.pid

    def op_timed_fetch(self, key, value):
        """get_or_fetch(key) whose fetch returns ``value``: [result, seconds, fetched here]."""
        fetched = []
        t = time.monotonic()
        result = self.cache.get_or_fetch(key, lambda k: fetched.append(k) or value)
        return [result, time.monotonic() - t, bool(fetched)]

    def op_owned_entries(self):
        """Entries of the partitions this host owns, counted in its own table."""
        view = self.cache._store._view()
        counts = self.cache._table.partition_counts(view.parts)
        return sum(n for p, n in enumerate(counts) if view.owners[p] == view.me)

    def op_read_all(self, keys):
        """{key: value} of the keys present, read through the cache (get_many)."""
        return self.cache.get_many(keys)

    def op_get_many(self, keys):
        return sorted(self.cache.get_many(keys).items())

    def op_delete_many(self, keys):
        return self.cache.delete_many(keys)

    def op_exists(self, key):
        return self.cache.exists(key)

    def op_local_get(self, key):
        """What this host's table holds under ``key`` (an owned entry or a copy)."""
        value = self.cache._table.get(key, None)
        return [self.cache._table.contains(key), value]

    def op_local_has(self, key):
        """Whether this host's table holds ``key`` (any entry: owned, backup or L1 copy)."""
        return self.cache._table.contains(key)

    def op_owner(self, key):
        """(owner node id, partition) of ``key`` by this host's partition table."""
        from vela import _native
        from vela.ring import partition_of

        view = self.cache._store._view()
        p = partition_of(_native.encode_key(key), view.parts)
        return [view.owners[p], p]

    def op_write_in_place(self, items):
        """Write ``items`` ([key, str value]) into the partitions this host owns, in place,
        by the routes of the view last published, however old (a bridge stopped meanwhile
        publishes no other): how many were written. White-box: floods the change log."""
        table = self.cache._table
        self.cache._store._view()
        routes, seq, _ = self.cache._store._route
        done = 0
        for key, value in items:
            val, codec = table.encode_value(value)
            done += table.put_routed(key, val, codec, 0, [], routes, seq)
        return done

    def op_owned_counts(self, keys):
        """{owner node id: how many of ``keys`` it owns} by this host's table."""
        counts = {}
        for key in keys:
            owner = self.op_owner(key)[0]
            counts[str(owner)] = counts.get(str(owner), 0) + 1
        return counts

    def op_get_range(self, prefix, start, stop):
        """[(i, value or None)] for keys prefix+i, read through the cache."""
        get = self.cache.get
        return [[i, get(f"{prefix}{i}")] for i in range(start, stop)]

    def op_load(self, prefix, keys, seconds, writer, stable=None):
        """A steady load for ``seconds``: writes ``prefix``+i = [writer, n] (n counts up),
        reads them back, and reads one of ``stable`` ([key, value] pairs nobody changes)
        each turn; returns the last value written per key and the errors seen."""
        import random

        rng = random.Random(writer)
        last = {}
        errors = []
        reads = 0
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            i = rng.randrange(keys)
            key = f"{prefix}{i}"
            n += 1
            try:
                self.cache.put(key, [writer, n])
                last[key] = [writer, n]
                got = self.cache.get(key)
                reads += 1
                if got != [writer, n]:
                    errors.append(["read-own-write", key, [writer, n], got])
                if stable:
                    skey, svalue = stable[rng.randrange(len(stable))]
                    got = self.cache.get(skey)
                    reads += 1
                    if got != svalue:
                        errors.append(["stable", skey, svalue, got])
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(["error", key, repr(exc)])
            time.sleep(0.001)
        return {"last": last, "errors": errors[:20], "error_count": len(errors), "writes": n, "reads": reads}

    def op_put(self, key, value, ttl=None, tags=()):
        self.cache.put(key, value, ttl=ttl, tags=tags)

    def op_put_many(self, items, ttl=None, tags=()):
        self.cache.put_many([(k, v) for k, v in items], ttl=ttl, tags=tags)
        return len(items)

    def op_put_range(self, prefix, start, stop, value="v", tags=()):
        put = self.cache.put
        for i in range(start, stop):
            put(f"{prefix}{i}", f"{value}{i}", tags=tags)
        return stop - start

    def op_get(self, key):
        missing = object()
        value = self.cache.get(key, missing)
        return [False, None] if value is missing else [True, value]

    def op_log_state(self):
        return self.cache._table.log_state()

    def op_count_present(self, keys):
        found = self.cache.get_many(keys)
        return len(found)

    def op_delete(self, key):
        return self.cache.delete(key)

    def op_incr(self, key, delta=1, ttl=None):
        return self.cache.incr(key, delta, ttl=ttl)

    def op_touch(self, key, ttl=None):
        return self.cache.touch(key, ttl)

    def op_ttl(self, key):
        try:
            return [True, self.cache.ttl(key)]
        except KeyError:
            return [False, None]

    def op_flush(self):
        return self.cache.flush()

    def op_invalidate_tag(self, tag):
        return self.cache.invalidate_tag(tag)

    def op_dump(self):
        table = self.cache._table
        out = []
        cursor = 0
        while cursor is not None:
            cursor, items = table.scan(cursor, 1_000_000)
            for key, value, codec, _ttl, tags, version in items:
                if codec == TOMBSTONE:
                    continue  # a remembered delete (replication), not contents
                out.append((key.hex(), value.hex(), codec, sorted(tags), version))
        out.sort()
        return out

    def op_log(self, keys=None):
        """This host's own changes still in the change log (diagnostics):
        [op, key_hex, value_hex, tags, version], oldest first; only ``keys`` (hex) if given."""
        table = self.cache._table
        state = table.log_state()
        pos = max(0, state["head"] - state["size"] * 3 // 4)
        out = []
        while pos < state["head"]:
            records, nxt, lapped = table.log_read(pos, 10000)
            if lapped:
                pos = nxt
                out.append(["lapped"])
                continue
            if nxt == pos:
                break
            pos = nxt
            for op, key, value, _codec, _ttl, tags, version in records:
                if keys is None or key.hex() in keys:
                    out.append([op, key.hex(), value.hex(), list(tags), version])
        return out

    def op_digest(self):
        import hashlib

        entries = self.op_dump()
        return [len(entries), hashlib.sha256(json.dumps(entries).encode()).hexdigest()]

    def op_size(self):
        return self.cache.size()

    def op_cluster(self):
        return self.cache.cluster()

    def op_stats(self):
        return self.cache.stats()

    def op_bridge_status(self, bridge_timeout=2.0):
        from vela.stores.replicated import BridgeClient
        from vela.errors import BridgeUnavailable

        client = BridgeClient(self.name, {"bridge_timeout": bridge_timeout})
        try:
            return client.call({"op": "status"})
        except BridgeUnavailable:
            return None
        finally:
            if client._socket is not None:
                client._socket.close(0)

    def op_workers(self, scripts, timeout=60.0):
        """Fork one worker per script, each with its own handle; their op counts."""
        import multiprocessing
        from multiprocessing.connection import wait

        ctx = multiprocessing.get_context("fork")
        procs, conns = [], []
        for script in scripts:
            parent, child = ctx.Pipe(duplex=False)
            script = dict(script, topology=self.topology, cache_opts=self.cache_opts)
            p = ctx.Process(target=_worker_main, args=(child, self.name, script), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        results = [None] * len(conns)
        deadline = time.monotonic() + timeout
        try:
            pending = dict(zip(conns, range(len(conns))))
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"workers {sorted(pending.values())} did not finish in {timeout} s")
                for c in wait(list(pending), remaining):
                    i = pending.pop(c)
                    try:
                        status, payload = c.recv()
                    except EOFError:
                        status, payload = "error", "worker died"
                    if status != "ok":
                        raise RuntimeError(f"worker {i}: {payload}")
                    results[i] = payload
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)
        return results

    def op_exit(self):
        raise SystemExit(0)


def agent_main():
    agent = Agent()
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.pop("op")
            reply = {"ok": getattr(agent, "op_" + op)(**req)}
        except SystemExit:
            break
        except BaseException:  # noqa: BLE001 - every failure goes back to the test
            reply = {"error": traceback.format_exc()}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()
    if agent.cache is not None:
        agent.cache.close()


if __name__ == "__main__" and sys.argv[1:] == ["agent"]:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the test ends it by closing stdin
    agent_main()
