"""The README's first command, `pip install -e '.[bridge]' && python examples/demo.py`,
must keep working: the demo runs with only what that command installs (the
packages of the other extras are made unimportable, in the demo and in every
process it starts)."""
import os
import re
import subprocess
import sys

from test_packaging import _pyproject
from test_readme import quick_start_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# distribution -> the module it provides, for the extras' packages
MODULE_OF = {"pyzmq": "zmq", "msgpack": "msgpack", "tomli": "tomli", "redis": "redis", "hiredis": "hiredis",
             "psutil": "psutil"}


def _extras_of(command):
    match = re.search(r"pip install -e '\.\[([\w,]+)\]'", command)
    assert match, command
    return set(match.group(1).split(","))


def _modules_not_installed_by(extras):
    wanted, others = set(), set()
    for extra, deps in _pyproject()["project"]["optional-dependencies"].items():
        if extra in ("test", "bench"):
            continue
        names = {re.split(r"[<>=;\[ ]", d)[0] for d in deps}
        (wanted if extra in extras else others).update(names)
    return sorted(MODULE_OF[d] for d in others - wanted if d in MODULE_OF)


def test_demo_runs_with_what_the_readme_installs_and_reports_what_it_promises(tmp_path):
    install, run = quick_start_commands()[0].split(" && ")
    assert run == "python examples/demo.py"
    blocked = _modules_not_installed_by(_extras_of(install))
    assert blocked == ["hiredis", "psutil", "redis"], blocked  # pyzmq and msgpack come with [bridge]
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        f"for _name in {blocked!r}:\n"
        "    sys.modules[_name] = None  # as if not installed\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH"))
                                                      if p))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py")], capture_output=True,
                         text=True, timeout=180, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    assert "fetch_fn ran once" in text
    assert "hits + misses" in text and ": match" in text
    assert "holds 1000 entries" in text
    assert "1000 entries removed (on each host)" in text  # issue 14: counts mean keys
    assert "host A now holds 0 entries" in text
    assert "host B reads 1000 orders" in text
    assert "reads 1000 orders (0 lost), size 1000" in text
