"""Load generators with a fixed number of connections: wrk, or a small Python one.

Both run for a fixed time against one URL on loopback with `connections` requests
in flight at all times (each connection sends its next request as soon as the
answer is in; a server that closes the connection, as gunicorn's sync workers
do, gets a new one) and return the same figures:

    {"requests", "seconds", "p50_us", "p99_us", "errors"}

where errors counts connect/read/write failures, timeouts and non-2xx/3xx answers.
wrk runs one thread (one core at most, in C); the Python generator runs one
thread per connection in this process, and is the fallback when wrk is missing.
"""

import os
import re
import shutil
import socket
import subprocess
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WRK_SCRIPT = os.path.join(HERE, "wrk_result.lua")


def percentile(sorted_values, pct):
    """The nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return sorted_values[int(rank) - 1]


class Wrk:
    name = "wrk"

    @staticmethod
    def available():
        return shutil.which("wrk") is not None

    @staticmethod
    def version():
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        return (out.stdout or out.stderr).split("Copyright")[0].strip()

    @staticmethod
    def run(host, port, path, connections, seconds):
        cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
               "-s", WRK_SCRIPT, f"http://{host}:{port}{path}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        match = re.search(r"^RESULT ([\d ]+)$", out.stdout, re.M)
        if out.returncode != 0 or not match:
            raise RuntimeError(f"wrk failed ({out.returncode}): {(out.stderr or out.stdout).strip()[-500:]}")
        requests, duration_us, p50, p99, *errors = (int(x) for x in match.group(1).split())
        return {"requests": requests, "seconds": duration_us / 1e6, "p50_us": p50, "p99_us": p99,
                "errors": sum(errors)}


class PythonLoad:
    """One thread per connection, HTTP/1.1 with keep-alive asked for, a raw socket each."""

    name = "python (threads, one connection each)"

    @staticmethod
    def available():
        return True

    @staticmethod
    def version():
        return None

    @staticmethod
    def _connection(host, port, path, deadline, latencies, errors):
        request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: keep-alive\r\n\r\n".encode()
        sock = None
        buf = b""
        while True:
            start = time.perf_counter_ns()
            if start >= deadline:
                break
            try:
                if sock is None:
                    sock = socket.create_connection((host, port), timeout=10)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    buf = b""
                sock.sendall(request)
                while b"\r\n\r\n" not in buf:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed before the headers")
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
                length = int(headers.get("content-length", 0))
                while len(buf) < length:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed inside the body")
                    buf += chunk
                buf = buf[length:]
                latencies.append(time.perf_counter_ns() - start)
                if not lines[0].split()[1].startswith(("2", "3")):
                    errors.append(lines[0])
                if headers.get("connection", "").lower() == "close":
                    sock.close()
                    sock = None
            except (OSError, ValueError, IndexError) as exc:
                errors.append(repr(exc))
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()

    @classmethod
    def run(cls, host, port, path, connections, seconds):
        latencies, errors = [], []  # list.append is atomic under the GIL
        began = time.perf_counter_ns()
        deadline = began + int(seconds * 1e9)
        threads = [threading.Thread(target=cls._connection, args=(host, port, path, deadline, latencies, errors),
                                    daemon=True) for _ in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = (time.perf_counter_ns() - began) / 1e9
        latencies.sort()
        return {"requests": len(latencies), "seconds": elapsed,
                "p50_us": (percentile(latencies, 50) or 0) / 1000, "p99_us": (percentile(latencies, 99) or 0) / 1000,
                "errors": len(errors)}


def generator(name=None):
    """The load generator asked for ("wrk", "python"), or wrk when installed, else Python's."""
    if name == "python":
        return PythonLoad
    if name == "wrk" and not Wrk.available():
        raise SystemExit("wrk is not installed: apt-get install -y wrk (or use --loadgen python)")
    return Wrk if Wrk.available() else PythonLoad
