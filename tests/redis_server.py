"""A real redis-server for the tests: loopback port + unix socket, no persistence.

    server = RedisServer().start()
    try:
        ... server.url / server.unix_url ...
        server.kill(); server.start()        # dies, then comes back on the same port
    finally:
        server.stop()

Every wait is bounded; stop() always leaves no process and no temp dir behind.
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

EXECUTABLE = "redis-server"


def available():
    return shutil.which(EXECUTABLE) is not None


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port, timeout=0.2):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; start() again after kill()/stop() reuses the port."""

    def __init__(self, extra_args=()):
        self.extra_args = list(extra_args)
        self.dir = tempfile.mkdtemp(prefix="vela-redis-")
        self.port = None
        self.proc = None

    @property
    def socket_path(self):
        return os.path.join(self.dir, "redis.sock")

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self):
        return f"unix://{self.socket_path}?db=0"

    def start(self, timeout=10.0):
        reuse = self.port is not None
        for _ in range(1 if reuse else 3):
            if not reuse:
                self.port = free_port()
            log = open(os.path.join(self.dir, "server.log"), "ab")
            self.proc = subprocess.Popen(
                [EXECUTABLE, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--unixsocket", self.socket_path, "--unixsocketperm", "700",
                 "--save", "", "--appendonly", "no", "--dir", self.dir, *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _ping(self.port):
                    return self
                time.sleep(0.01)
            self._reap()
        with open(os.path.join(self.dir, "server.log"), "rb") as f:
            tail = f.read()[-2000:].decode(errors="replace")
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{tail}")

    def kill(self):
        """SIGKILL: the server dies at once, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self._reap()

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def _reap(self):
        if self.proc is None:
            return
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def stop(self):
        """Terminate the server (if running) and remove its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
        self._reap()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class RedisCluster:
    """A real Redis Cluster on loopback: ``masters`` masters, ``replicas`` replicas each
    (``redis-cli --cluster create``: even slot ranges), a short ``cluster-node-timeout``
    so that a killed master's replica takes over within seconds.

        cluster = RedisCluster(masters=3, replicas=1).start()
        try:
            ... cluster.url ... cluster.masters() ... cluster.kill(server) ...
        finally:
            cluster.stop()
    """

    def __init__(self, masters=3, replicas=0, node_timeout_ms=1000):
        self.masters_wanted = masters
        self.replicas = replicas
        # The bus port is named: the default (port + 10000) is past 65535 for high ports.
        self.servers = [RedisServer(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                     "--cluster-node-timeout", str(node_timeout_ms),
                                     "--cluster-port", str(free_port())])
                        for _ in range(masters * (1 + replicas))]

    @property
    def url(self):
        """A redis+cluster:// URL naming every node (any of them serves as a start)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    def start(self, timeout=30.0):
        try:
            for server in self.servers:
                server.start()
            create = subprocess.run(
                ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{s.port}" for s in self.servers],
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
            if create.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout.decode()[-2000:]}"
                                   f"{create.stderr.decode()[-2000:]}")
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def node_command(self, server, *args):
        """One command to one node (not routed)."""
        import redis

        client = redis.Redis(port=server.port, socket_timeout=2.0)
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def alive(self):
        return [s for s in self.servers if s.proc is not None and s.proc.poll() is None]

    def masters(self):
        """The live masters, as the live nodes see them: [RedisServer, ..]."""
        by_port = {s.port: s for s in self.alive()}
        nodes = self.node_command(self.alive()[0], "CLUSTER", "NODES").decode().splitlines()
        found = []
        for line in nodes:
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            if "master" in fields[2].split(",") and "fail" not in fields[2] and port in by_port:
                found.append(by_port[port])
        return found

    def replica_of(self, master):
        """The live replica following ``master``."""
        for server in self.alive():
            role = self.node_command(server, "ROLE")
            if role[0] == b"slave" and role[2] == master.port:
                return server
        raise AssertionError(f"no replica follows the master on port {master.port}")

    def wait_healthy(self, timeout=30.0):
        """Until every live node says cluster_state:ok and all 16384 slots have a live master."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if all(b"cluster_state:ok" in self.node_command(s, "CLUSTER", "INFO") for s in self.alive()) \
                        and len(self.masters()) == self.masters_wanted:
                    return
            except Exception:  # noqa: BLE001 - a node still starting or just killed: ask again
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not become healthy")
            time.sleep(0.05)

    def wait_replicated(self, master, timeout=10.0):
        """Until ``master``'s replica has applied every write the master has."""
        replica = self.replica_of(master)
        deadline = time.monotonic() + timeout
        while True:
            offset = _info_field(self.node_command(master, "INFO", "replication"), b"master_repl_offset")
            if _info_field(self.node_command(replica, "INFO", "replication"), b"slave_repl_offset") >= offset:
                return replica
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replica of port {master.port} did not catch up")
            time.sleep(0.02)

    def stop(self):
        for server in self.servers:
            server.stop()


def _info_field(info, name):
    """An integer field of an INFO reply (raw bytes or redis-py's parsed dict)."""
    if isinstance(info, dict):
        return int(info[name.decode()])
    for line in info.splitlines():
        if line.startswith(name + b":"):
            return int(line.split(b":", 1)[1])
    raise KeyError(name)
