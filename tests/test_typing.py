"""The public API is typed: `py.typed`, annotations on vela.Cache and the module
functions, a stub of vela._native that matches the built module, and real
signatures in help() (no ``(*args, **kwargs)``, no ``<object object at 0x...>``)."""
import inspect
import os
import pydoc
import re
import shutil
import subprocess
import sys

import pytest

import vela

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.dirname(vela.__file__)


def _mypy_env():
    env = dict(os.environ)
    parent = os.path.dirname(PACKAGE)
    if os.path.exists(os.path.join(parent, "pyproject.toml")):  # an editable install: mypy reads the checkout
        env["MYPYPATH"] = parent
    return env


def _mypy(*args, cwd):
    # --follow-imports=silent: Vela's own modules are not the user's to check (as for
    # any installed package); their types are what the user's code is checked against.
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                           "--no-incremental", *args], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env=_mypy_env())


def test_the_package_ships_its_types():
    assert os.path.exists(os.path.join(PACKAGE, "py.typed"))
    assert os.path.exists(os.path.join(PACKAGE, "_native.pyi"))


def test_mypy_strict_accepts_a_script_that_calls_every_public_method(tmp_path):
    script = tmp_path / "user.py"
    shutil.copy(os.path.join(HERE, "typed_user.py"), script)
    out = _mypy(str(script), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found in 1 source file" in out.stdout
    # and it runs
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok {'name': 'Alice'} 0 text True")


def test_the_types_catch_misuse(tmp_path):
    script = tmp_path / "wrong.py"
    script.write_text(
        "import vela\n"
        "cache = vela.Cache('t', capcity='1MiB')\n"          # a misspelt option
        "cache.put(1.5, 'v')\n"                               # a float key
        "n: str = cache.incr('k')\n"                           # incr returns int
        "cache.put('k', 1, tags='one')\n"                      # ok: a str is an iterable of str
        "cache.get_or_fetch('k', lambda k: k, ttl='soon')\n"   # ttl is seconds
    )
    out = _mypy(str(script), cwd=tmp_path)
    assert out.returncode == 1, out.stdout
    lines = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert [line.split(":")[1] for line in lines] == ["2", "3", "4", "6"], out.stdout


def test_the_native_stub_matches_the_built_module(tmp_path):
    # stubtest compares every name of the stub with the module at run time (a method
    # added to or removed from the C core without the stub fails here).
    stubs = tmp_path / "stubs" / "vela"
    stubs.mkdir(parents=True)
    (stubs / "__init__.pyi").write_text("")
    shutil.copy(os.path.join(PACKAGE, "_native.pyi"), stubs / "_native.pyi")
    flags = ["--ignore-disjoint-bases"] if "--ignore-disjoint-bases" in subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "--help"], capture_output=True, text=True, timeout=120).stdout else []
    # Table cannot be subclassed from Python, yet BridgeTable derives from it in C: the
    # stub cannot mark it @final, which stubtest would ask for.
    allowlist = tmp_path / "allowlist"
    allowlist.write_text("vela._native.Table\n")
    flags += ["--allowlist", str(allowlist)]
    out = subprocess.run([sys.executable, "-m", "mypy.stubtest", *flags, "vela._native"], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path, env=dict(os.environ, MYPYPATH=str(tmp_path / "stubs")))
    assert out.returncode == 0, out.stdout + out.stderr


def _public_callables():
    yield "vela.destroy", vela.destroy
    for name, member in inspect.getmembers(vela.Cache):
        if name.startswith("_") and name not in ("__init__", "__getitem__", "__setitem__", "__delitem__",
                                                 "__contains__", "__len__", "__enter__", "__exit__"):
            continue
        if callable(member):
            yield f"Cache.{name}", member


@pytest.mark.parametrize("name, fn", list(_public_callables()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_public_callable_is_annotated(name, fn):
    sig = inspect.signature(fn)
    unannotated = [p.name for p in sig.parameters.values()
                   if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
    assert unannotated == [], f"{name}{sig}"
    assert sig.return_annotation is not inspect.Signature.empty, f"{name}{sig}"


def test_help_shows_the_real_signature():
    sig = inspect.signature(vela.Cache)
    params = sig.parameters
    assert list(params)[:2] == ["name", "backend"] and "capacity" in params and "unknown" not in params
    assert repr(params["capacity"].default) == "ADOPT"
    assert params["default_ttl"].default is None and params["stampede_timeout"].default == 5.0
    text = pydoc.render_doc(vela.Cache, renderer=pydoc.plaintext)
    # the class line, on one line or (3.13) one parameter a line
    head = text.split("A cache shared by every process", 1)[0]
    flat = re.sub(r"\(\s+", "(", re.sub(r"\s+", " ", head.replace(" | ", " ")))
    assert "Cache(name: 'str', *, backend: 'str' = 'shm'," in flat
    assert "capacity: 'Union[int, str, _Adopt]' = ADOPT," in flat
    assert "*args" not in flat and "**kwargs" not in flat
    assert "object at 0x" not in text
