"""Shared fixtures and multi-process helpers for the Vela test suite.

Child processes are always started with the multiprocessing "fork" context, report
their result through a Pipe, and are bounded in time: a child that does not report
within its timeout fails the test (and is SIGKILLed) instead of blocking the run.
"""
import multiprocessing
import os
import signal
import sys
import time
import traceback
import uuid
from multiprocessing.connection import wait as wait_connections

import pytest

import vela

FORK = multiprocessing.get_context("fork")


def new_name():
    """A segment name that no other test (or earlier run) uses."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def _no_zeromq_threads_left():
    """A test that used ZeroMQ in this process ends the global context after it: its
    I/O threads would make every later fork of the suite a fork with threads running
    (unsafe, and warned about by Python 3.12+)."""
    yield
    zmq = sys.modules.get("zmq")
    ctx = getattr(getattr(zmq, "Context", None), "_instance", None)
    if ctx is not None and not ctx.closed:
        ctx.destroy(linger=0)


@pytest.fixture
def cache_name():
    name = new_name()
    yield name
    vela.destroy(name)


@pytest.fixture
def cache(cache_name):
    c = vela.Cache(cache_name, capacity="8MiB")
    yield c
    try:
        c.close()
    except vela.CacheClosed:
        pass


# --------------------------------------------------------------------------------------
# child processes


class Child:
    """A forked child running fn(*args); its return value (or traceback) comes back
    through a pipe."""

    def __init__(self, fn, *args):
        self.fn = fn
        self.args = args
        self.conn, child_conn = FORK.Pipe(duplex=False)
        self.proc = FORK.Process(target=_child_main, args=(child_conn, fn, args), daemon=True)
        self.proc.start()
        child_conn.close()
        self.reported = False
        self.status = None
        self.payload = None

    @property
    def pid(self):
        return self.proc.pid

    def kill(self):
        """SIGKILL the child (no-op when it is gone) and reap it."""
        if self.proc.is_alive():
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.join(5)

    def receive(self):
        """Read the report; call when self.conn is readable."""
        try:
            self.status, self.payload = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            self.status, self.payload = "died", f"exit code {self.proc.exitcode}"
        self.reported = True

    def close(self):
        self.kill()
        self.conn.close()


def _child_main(conn, fn, args):
    try:
        result = fn(*args)
    except BaseException:  # noqa: BLE001 - report everything to the parent
        conn.send(("error", traceback.format_exc()))
    else:
        conn.send(("ok", result))
    conn.close()


def collect(children, timeout):
    """Wait for every child's report; return the results in order.

    Fails the test when a child raised, died without reporting, or did not report
    within `timeout` seconds. Leftover children are killed.
    """
    deadline = time.monotonic() + timeout
    try:
        pending = {c.conn: c for c in children if not c.reported}
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                late = [children.index(c) for c in pending.values()]
                pytest.fail(f"children {late} did not report within {timeout} s (hang?)")
            for conn in wait_connections(list(pending), timeout=remaining):
                child = pending.pop(conn)
                child.receive()
        problems = [
            f"child {i} ({c.status}):\n{c.payload}"
            for i, c in enumerate(children)
            if c.status != "ok"
        ]
        if problems:
            pytest.fail("\n".join(problems))
        for c in children:
            c.proc.join(10)
        return [c.payload for c in children]
    finally:
        for c in children:
            c.close()


def run_children(fn, arg_tuples, timeout=60.0):
    """Fork one child per argument tuple, each running fn(*args); return their results."""
    children = []
    try:
        for args in arg_tuples:
            children.append(Child(fn, *args))
    except BaseException:
        for c in children:
            c.close()
        raise
    return collect(children, timeout)


def run_in_child(fn, *args, timeout=30.0):
    """Run fn(*args) in one forked child (so that a hang in native code fails the test
    instead of blocking pytest) and return its result."""
    return run_children(fn, [args], timeout=timeout)[0]


def stripe_of_new_key(table, key):
    """The stripe a key lands in, seen from the entry counters (put, then deleted)."""
    before = [s[0] for s in table.stripes_info()]
    table.put(key, b"probe", 0, None)
    after = [s[0] for s in table.stripes_info()]
    table.delete(key)
    return next(i for i, (a, b) in enumerate(zip(after, before)) if a != b)
