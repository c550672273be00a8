"""Start and stop the local servers the peers need (redis-server, memcached).

Each server is started by the benchmark itself, on loopback only, with no
persistence, in a temporary directory, and stopped in `stop()`: run.py calls it
in a finally block, and an atexit hook covers the paths that skip it.
"""

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time

# Servers started by this process, so the atexit hook can stop any left running.
_running = []
_owner_pid = os.getpid()


def free_port():
    """A TCP port free on loopback now (the OS picks it; a race is retried by the caller)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A child process with a temp dir; subclasses say how to start and ping it."""

    executable = None
    start_timeout = 10  # seconds until it must answer ping()

    def __init__(self):
        self.proc = None
        self.dir = None
        self.port = None

    @classmethod
    def available(cls):
        return shutil.which(cls.executable) is not None

    @classmethod
    def version(cls):
        """The server's own version line, for the record; None when not installed."""
        if not cls.available():
            return None
        out = subprocess.run([cls.executable, "--version"], capture_output=True, text=True)
        return out.stdout.strip() or None

    def command(self):
        raise NotImplementedError

    def ping(self):
        """True once the server answers."""
        raise NotImplementedError

    def environment(self):
        """The server's environment; None: this process's."""
        return None

    def start(self, tries=3):
        last = None
        for _ in range(tries):  # a port taken between free_port() and bind: try another
            self.dir = tempfile.mkdtemp(prefix=f"vela-bench-{self.executable}-")
            self.port = free_port()
            log = open(os.path.join(self.dir, "server.log"), "wb")
            # start_new_session: a Ctrl-C of the benchmark must not kill the server
            # before the finally block that stops it in order.
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=self.environment())
            log.close()
            _running.append(self)
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if self.ping():
                        return self
                except Exception as exc:  # not listening yet
                    last = exc
                time.sleep(0.02)
            with open(os.path.join(self.dir, "server.log"), "rb") as f:
                last = f.read().decode(errors="replace").strip() or last
            self.stop()
        raise RuntimeError(f"{self.executable} did not start: {last}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        if self in _running:
            _running.remove(self)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class RedisServer(Server):
    """redis-server on a unix socket and a loopback port, persistence off."""

    executable = "redis-server"

    @property
    def unix_socket(self):
        return os.path.join(self.dir, "redis.sock")

    def command(self):
        return [self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
                "--unixsocket", self.unix_socket, "--unixsocketperm", "700",
                "--save", "", "--appendonly", "no",  # no persistence: a cache, like the others
                "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning"]

    def ping(self):
        import redis
        client = redis.Redis(unix_socket_path=self.unix_socket, socket_timeout=1)
        try:
            return client.ping()
        finally:
            client.close()


class MemcachedServer(Server):
    """memcached on a loopback port, UDP off."""

    executable = "memcached"

    def command(self):
        cmd = [self.executable, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0",
               "-m", "1024", "-t", "2"]  # 2 threads: one per core of a small host
        if os.geteuid() == 0:  # memcached refuses to run as root unless told which user
            cmd += ["-u", "root"]
        return cmd

    def ping(self):
        from pymemcache.client.base import Client
        client = Client(("127.0.0.1", self.port), connect_timeout=1, timeout=1)
        try:
            return bool(client.version())
        finally:
            client.close()


@atexit.register
def _stop_all():
    if os.getpid() != _owner_pid:  # a forked worker owns none of them
        return
    for server in list(_running):
        server.stop()
