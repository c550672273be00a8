"""Smoke test of an installed Vela (a wheel or an sdist in a fresh environment).

    python tools/smoke.py

Run it from outside the source tree, so that it imports the installed package.
It needs nothing but what `pip install vela` brings (no extras): a cache shared by
two processes, the counters, the integrity check, the console commands.
"""
import os
import subprocess
import sys
import uuid

import vela


def main():
    assert not os.path.exists(os.path.join(os.getcwd(), "vela", "__init__.py")), \
        "run the smoke test outside the source tree: it must test the installed package"
    name = f"smoke{uuid.uuid4().hex[:10]}"
    cache = vela.Cache(name, capacity="4MiB", default_ttl=60)
    try:
        cache.put("user:1", {"name": "Alice"}, tags=["users"])
        pid = os.fork()
        if pid == 0:  # another worker of the host sees the same table
            code = 0 if vela.Cache(name).get("user:1") == {"name": "Alice"} else 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "a forked worker did not read the value"
        assert cache.incr("hits", 5) == 5
        assert cache.invalidate_tag("users") == 1
        assert cache.check() == []
        stats = cache.stats()
        assert stats["writes"] == 2 and stats["size"] == 1, stats
    finally:
        assert vela.destroy(name) is True
    scripts = os.path.dirname(sys.executable)
    for command in ([os.path.join(scripts, "vela"), "--version"], [sys.executable, "-m", "vela", "--version"]):
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        assert out.strip() == f"vela {vela.__version__}", (command, out)
    print(f"vela {vela.__version__} from {os.path.dirname(vela.__file__)}: smoke test passed")


if __name__ == "__main__":
    main()
