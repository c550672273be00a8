"""Instructions per get (or put), counted by callgrind (stable on a noisy machine).

    python tools/bench/callgrind_get.py           # cache.get, hit, 100 B
    python tools/bench/callgrind_get.py --put     # cache.put, overwrite, 100 B

Runs the same script twice under `valgrind --tool=callgrind`, once with N operations
on a 100 B bytes value and once with none, and prints (difference) / N: the
instructions one call costs, Python call included. Repeatable for the same build.
With --put it also prints the locks one put takes (pthread_mutex_trylock calls: every
lock of the core is tried first): 1 is the stripe lock alone, the heap lock not taken.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

SCRIPTS = {
    "get": r"""
import sys, vela
n = int(sys.argv[1])
c = vela.Cache(sys.argv[2], capacity="8MiB", sweep_interval=None)
c.put("key:42", b"v" * 100)
get = c.get
for _ in range(n):
    get("key:42")
c.destroy()
""",
    "put": r"""
import sys, vela
n = int(sys.argv[1])
c = vela.Cache(sys.argv[2], capacity="8MiB", sweep_interval=None)
put, value = c.put, b"v" * 100
keys = [f"key:{i}" for i in range(1000)]
for key in keys:
    put(key, value)
for i in range(n):
    put(keys[i % 1000], value)
c.destroy()
""",
}


def measure(op, n, name):
    """(instructions, pthread_mutex_trylock calls) of the script with n operations."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        script = os.path.join(tmp, "run.py")
        with open(script, "w") as f:
            f.write(SCRIPTS[op])
        proc = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                               script, str(n), name], capture_output=True, text=True, check=True)
        instructions = int(re.search(r"Collected : (\d+)", proc.stderr).group(1))
        calls = 0
        if op == "put":
            annotated = subprocess.run(["callgrind_annotate", "--threshold=100", "--inclusive=yes", out],
                                       capture_output=True, text=True, check=True).stdout
            m = re.search(r"=> \S*pthread_mutex_trylock\S* \(([\d,]+)x\)", annotated)
            calls = int(m.group(1).replace(",", "")) if m else 0
        return instructions, calls


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--put", action="store_true", help="count cache.put (overwrites) instead of cache.get")
    op = "put" if ap.parse_args().put else "get"
    n = 200_000 if op == "get" else 50_000
    name = f"cg{os.getpid()}"
    (base, base_locks), (loaded, locks) = measure(op, 0, name), measure(op, n, name)
    what = "cache.get (100 B bytes value, hit)" if op == "get" else "cache.put (100 B bytes value, overwrite)"
    print(f"callgrind: {(loaded - base) / n:.0f} instructions per {what}, over {n} {op}s")
    if op == "put":
        print(f"callgrind: {(locks - base_locks) / n:.2f} locks taken per put")


if __name__ == "__main__":
    main()
