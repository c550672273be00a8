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
