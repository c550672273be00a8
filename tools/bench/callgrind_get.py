"""Instructions per get, counted by callgrind (stable on a noisy machine).

    python tools/bench/callgrind_get.py

Runs the same script twice under `valgrind --tool=callgrind`, once with N gets of a
100 B bytes value and once with none, and prints (difference) / N: the instructions
one `cache.get` costs, Python call included. Repeatable for the same build.
"""
import os
import re
import subprocess
import sys
import tempfile

SCRIPT = r"""
import sys, vela
n = int(sys.argv[1])
c = vela.Cache(sys.argv[2], capacity="8MiB", sweep_interval=None)
c.put("key:42", b"v" * 100)
get = c.get
for _ in range(n):
    get("key:42")
c.destroy()
"""


def instructions(n, name):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        script = os.path.join(tmp, "run.py")
        with open(script, "w") as f:
            f.write(SCRIPT)
        proc = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                               script, str(n), name], capture_output=True, text=True, check=True)
        m = re.search(r"Collected : (\d+)", proc.stderr)
        return int(m.group(1))


def main():
    n = 200_000
    name = f"cg{os.getpid()}"
    base, loaded = instructions(0, name), instructions(n, name)
    print(f"callgrind: {(loaded - base) / n:.0f} instructions per cache.get (100 B bytes value, hit), "
          f"over {n} gets")


if __name__ == "__main__":
    main()
