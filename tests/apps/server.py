"""Start a real gunicorn or uvicorn on a free loopback port and talk to it over HTTP.

Every server runs in its own session (process group), its output goes to a log
file, every wait is bounded, and stop() ends the whole group: a test that fails
halfway never leaves a server behind.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APPS = os.path.join(ROOT, "tests", "apps")


class Server:
    """A server process (gunicorn master / uvicorn supervisor) and its workers."""

    def __init__(self, argv, env, log_path, port_pattern):
        self.argv = argv
        self.log_path = str(log_path)
        self.port_pattern = re.compile(port_pattern)
        self.port = None
        full_env = dict(os.environ)
        full_env.update(env)
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, full_env.get("PYTHONPATH")]))
        full_env["PYTHONUNBUFFERED"] = "1"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=ROOT, start_new_session=True, stdin=subprocess.DEVNULL)

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_for_log(self, pattern, timeout, count=1):
        """Wait until ``pattern`` occurs ``count`` times in the log; return the matches."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.findall(self.log())
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} x{count} not in the log after {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def workers(self):
        """pids of the worker processes (children of the server process, psutil)."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        # uvicorn's spawn start method adds a resource tracker: not a worker
        return sorted(c.pid for c in children
                      if "resource_tracker" not in " ".join(_cmdline(c)))

    def wait_for_workers(self, n, timeout, exclude=()):
        """Wait until ``n`` workers run, none of them in ``exclude``; return their pids."""
        deadline = time.monotonic() + timeout
        while True:
            pids = [p for p in self.workers() if p not in exclude]
            if len(pids) >= n and not set(self.workers()) & set(exclude):
                return pids
            if time.monotonic() > deadline:
                raise AssertionError(f"wanted {n} workers (not {list(exclude)}), have {self.workers()}:\n"
                                     f"{self.log()}")
            time.sleep(0.05)

    def start(self, workers, timeout=20.0, probe="/pid"):
        """Wait until the port is known, ``workers`` workers run and a request to
        ``probe`` succeeds (``probe=None``: until the port accepts a connection, for
        an app whose every request has effects)."""
        self.port = int(self.wait_for_log(self.port_pattern.pattern, timeout)[0])
        self.wait_for_workers(workers, timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if probe is None:
                    socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
                    return self
                status, _, _ = get(self.url(probe), timeout=2)
                if status == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no answer on port {self.port}:\n{self.log()}")
            time.sleep(0.05)

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self, timeout=10.0):
        """SIGTERM the server, then SIGKILL whatever is left of its process group."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test started
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            self._log.close()


def _cmdline(proc):
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def gunicorn(app, log_path, env, config=os.path.join(APPS, "gunicorn_conf.py"), chdir=APPS):
    from gunicorn.config import KNOWN_SETTINGS

    argv = [sys.executable, "-m", "gunicorn", "-c", config, "--bind", "127.0.0.1:0", "--chdir", chdir]
    if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS):
        argv.append("--no-control-socket")  # gunicorn >= 24 would make one in $HOME
    return Server(argv + [app], env, log_path, r"Listening at: http://127\.0\.0\.1:(\d+)")


def uvicorn(app, log_path, env, workers, app_dir=APPS):
    argv = [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--host", "127.0.0.1", "--port", "0",
            "--workers", str(workers), "--log-level", "info", "--no-access-log",
            "--timeout-graceful-shutdown", "3", app]
    return Server(argv, env, log_path, r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


# --------------------------------------------------------------------------------------
# HTTP


def get(url, timeout=5.0):
    """(status, JSON body, seconds); a new connection per request (so requests spread
    over the workers). Raises OSError (URLError, timeout, reset) on transport errors."""
    start = time.monotonic()
    req = urllib.request.Request(url, headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        body, status = e.read(), e.code
    return status, (json.loads(body) if body[:1] == b"{" else body), time.monotonic() - start


def get_all(urls, timeout=5.0, concurrency=None):
    """Send the requests concurrently; return [(status, body, seconds) or (None, error, seconds)]."""
    def one(url):
        start = time.monotonic()
        try:
            return get(url, timeout)
        except Exception as e:  # noqa: BLE001 - reported to the test
            return None, e, time.monotonic() - start

    with ThreadPoolExecutor(max_workers=concurrency or len(urls)) as pool:
        return list(pool.map(one, urls))
