"""One host's wall clock set behind the others with libfaketime (LD_PRELOAD).

The offset applies to the host's bridge and workers. It changes CLOCK_REALTIME
(``time.time()`` in Python, ``clock_gettime(CLOCK_REALTIME)`` in the C extension:
what versions and the hybrid logical clock read) and deliberately not
CLOCK_MONOTONIC (``DONT_FAKE_MONOTONIC=1``): a real host has one monotonic clock for
all its processes, and this host's table is shared with a process that runs without
the shim (the test's agent), where lock-holder and expiry times in CLOCK_MONOTONIC
must agree; history times stay on the one monotonic clock of the machine too.
"""
import glob
import os
import subprocess
import sys

CANDIDATES = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
              "/usr/lib64/faketime/libfaketime.so.1", "/usr/local/lib/faketime/libfaketime.so.1")


def libfaketime():
    """The path of libfaketime.so.1, or None when it is not installed."""
    for path in CANDIDATES + tuple(glob.glob("/usr/lib/*/faketime/libfaketime.so.1")):
        if os.path.exists(path):
            return path
    return None


def skewed_env(env, seconds):
    """``env`` with the wall clock ``seconds`` off (negative: behind)."""
    lib = libfaketime()
    if lib is None:
        raise RuntimeError("libfaketime is not installed (apt-get install libfaketime): "
                           "the clock-offset scenario needs it")
    preload = " ".join(p for p in (lib, env.get("LD_PRELOAD")) if p)
    return dict(env, LD_PRELOAD=preload, FAKETIME=f"{seconds:+g}s", DONT_FAKE_MONOTONIC="1",
                FAKETIME_DONT_RESET="1")


PROBE = """
import ctypes, json, time
class ts(ctypes.Structure):
    _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]
libc = ctypes.CDLL(None)
def clock(cid):
    t = ts(); libc.clock_gettime(cid, ctypes.byref(t)); return t.s + t.ns / 1e9
print(json.dumps([time.time(), clock(0), clock(1)]))
"""


def measure(env):
    """(time.time() offset, C CLOCK_REALTIME offset, CLOCK_MONOTONIC offset) in seconds
    of a process started with ``env``, against this process."""
    import json
    import time

    before_real, before_mono = time.time(), time.monotonic()
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=30,
                         check=True)
    after_real, after_mono = time.time(), time.monotonic()
    py_real, c_real, c_mono = json.loads(out.stdout)
    mid_real, mid_mono = (before_real + after_real) / 2, (before_mono + after_mono) / 2
    slack = (after_real - before_real) / 2
    return round(py_real - mid_real, 1), round(c_real - mid_real, 1), round(c_mono - mid_mono, 1), slack
