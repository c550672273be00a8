"""Packaging: what `pip install vela` gets, and what an sdist needs to build.

The full round trip (build the sdist and the wheel, install each into a fresh
virtualenv far from the checkout, run tools/smoke.py there) is a CI step
(`.ci/run`, install_check); here are the checks that need no second install.
"""
import email.parser
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

import vela

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist `python -m build --sdist` makes of this checkout: (members, PKG-INFO)."""
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), ROOT],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = glob.glob(str(out / "*.tar.gz"))
    with tarfile.open(path) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        top = tar.getnames()[0].split("/")[0]
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
    return names, email.parser.Parser().parsestr(pkg_info)


def test_sdist_holds_every_file_the_c_core_includes_and_the_licences(sdist):
    names, _ = sdist
    wanted = set()
    for source in glob.glob(os.path.join(ROOT, "native", "**", "*.[ch]"), recursive=True):
        wanted.add(os.path.relpath(source, ROOT))
        for header in re.findall(r'#include "([^"]+)"', open(source, encoding="utf-8").read()):
            found = [os.path.relpath(p, ROOT) for d in ("native", "native/third_party/xxhash")
                     for p in [os.path.join(ROOT, d, header)] if os.path.exists(p)]
            assert found, f"{source} includes {header}, which is not in the checkout"
            wanted.add(found[0])
    wanted |= {"LICENSE", "native/third_party/xxhash/LICENSE", "CHANGELOG.md", "setup.py", "vela/py.typed",
               "vela/_native.pyi", "tools/smoke.py"}
    assert "native/third_party/xxhash/xxhash.h" in wanted and "native/vela.h" in wanted
    assert sorted(wanted - names) == []


def test_metadata_says_licence_platform_versions_urls_and_keywords(sdist):
    _, meta = sdist
    assert meta["Name"] == "vela" and meta["Version"] == vela.__version__
    assert meta["License-Expression"] == "MIT AND BSD-2-Clause"
    assert set(meta.get_all("License-File")) == {"LICENSE", "native/third_party/xxhash/LICENSE"}
    classifiers = set(meta.get_all("Classifier"))
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert "Typing :: Typed" in classifiers
    versions = sorted(c.rsplit(" ", 1)[1] for c in classifiers
                      if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert versions == ["3.10", "3.11", "3.12", "3.13"]  # what .ci/run tests
    assert meta["Requires-Python"] == ">=3.10"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Homepage", "Source", "Issues", "Changelog", "Documentation"} <= set(urls)
    assert "cache" in meta["Keywords"].split(",")
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        assert f.readline().strip() == "MIT License"


def test_the_local_cache_depends_on_what_it_uses_and_each_feature_has_an_extra():
    project = _pyproject()["project"]
    assert sorted(re.split(r"[<>=;\[ ]", d)[0] for d in project["dependencies"]) == ["posix-ipc", "xxhash"]
    extras = project["optional-dependencies"]
    names = {extra: {re.split(r"[<>=;\[ ]", d)[0] for d in deps} for extra, deps in extras.items()}
    assert {"pyzmq", "msgpack", "tomli"} <= names["bridge"]
    assert {"redis", "hiredis"} <= names["redis"]
    assert names["inspect"] == {"psutil"}
    assert any("tomli" in d and "python_version < '3.11'" in d for d in extras["bridge"])


def test_the_version_has_one_source():
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vela.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", vela.__version__)
    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as f:
        assert f"## [{vela.__version__}]" in f.read()
    for command in (["-m", "vela", "--version"], ["-m", "vela.cli", "--version"]):
        out = subprocess.run([sys.executable] + command, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert (out.returncode, out.stdout) == (0, f"vela {vela.__version__}\n"), out


def test_the_vela_logger_prints_nothing_unless_the_application_configures_logging():
    code = ("import logging, vela; "
            "logging.getLogger('vela.bridge').warning('should not be printed'); "
            "print([type(h).__name__ for h in logging.getLogger('vela').handlers])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['NullHandler']"
    assert out.stderr == ""


# Runs `code` with the given modules made unimportable, as in an install without the extra.
_WITHOUT = """
import sys
for module in {modules!r}:
    sys.modules[module] = None  # `import module` raises ImportError
{code}
"""


def _without(modules, code, *args):
    return subprocess.run([sys.executable, "-c", _WITHOUT.format(modules=modules, code=code), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.mark.parametrize("options, missing, extra", [
    ({"topology": "replicated"}, ["zmq"], "bridge"),
    ({"topology": "partitioned"}, ["msgpack"], "bridge"),
    ({"backend": "redis"}, ["redis"], "redis"),
])
def test_a_missing_extra_is_named_in_the_import_error(options, missing, extra):
    code = f"""
import vela
try:
    vela.Cache("never-made", **{options!r})
except ImportError as exc:
    print(exc)
else:
    print("no ImportError")
"""
    out = _without(missing, code)
    assert out.returncode == 0, out.stderr
    assert f"pip install 'vela[{extra}]'" in out.stdout, out.stdout


def test_the_local_cache_works_without_any_extra(cache_name):
    code = f"""
import vela
with vela.Cache({cache_name!r}, capacity="2MiB") as c:
    c.put("k", {{"v": 1}})
    print(c.get("k"))
try:
    vela.Cache("x", serializer="msgpack")
except vela.OptionError as exc:
    print(exc)
"""
    out = _without(["zmq", "msgpack", "psutil", "redis"], code)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first == "{'v': 1}"
    assert "pip install 'vela[msgpack]'" in second


@pytest.mark.parametrize("command, missing, extra", [
    ("from vela.bridge.cli import main; sys.exit(main(['status', '--cache', 'x']))", ["zmq"], "bridge"),
    ("from vela.cli import main; sys.exit(main(['inspect', 'x']))", ["psutil"], "inspect"),
])
def test_a_command_without_its_extra_says_what_to_install_in_one_line(command, missing, extra):
    out = _without(missing, command)
    assert out.returncode == 2, out
    assert len(out.stderr.splitlines()) == 1 and f"pip install 'vela[{extra}]'" in out.stderr, out.stderr


def test_docs_cite_only_files_of_the_repository():
    cited = []
    for doc in glob.glob(os.path.join(ROOT, "docs", "*.md")) + [os.path.join(ROOT, "README.md")]:
        text = open(doc, encoding="utf-8").read()
        if os.path.basename(doc) != "README.md":  # a doc page names no design file it cannot link
            cited += [(doc, m) for m in re.findall(r"\b[A-Z][A-Z_]+\.md\b", text)]
        cited += [(doc, m) for m in re.findall(r"(?<![\w/.])((?:vela|tools|examples|native|docs|tests)/[\w./-]*\w)",
                                               text)]
    assert cited, "the pattern finds the files the docs cite"
    missing = [f"{os.path.relpath(doc, ROOT)}: {path}" for doc, path in cited
               if not os.path.exists(os.path.join(ROOT, path))]
    assert missing == []


# ---- tools/test, the README's test command ------------------------------------------------


def _tools_test(*args, env=None, prefix=(), script=os.path.join(ROOT, "tools", "test")):
    env = dict(os.environ if env is None else env)
    env["VENV"] = os.path.dirname(os.path.dirname(sys.executable))  # this run's venv: no second install
    return subprocess.run([*prefix, "bash", script, *args], capture_output=True, text=True, timeout=600, env=env)


def test_tools_test_fails_on_a_skipped_test(tmp_path):
    (tmp_path / "test_one.py").write_text(
        "import pytest\n\ndef test_runs():\n    pass\n\n"
        "def test_needs_a_server():\n    pytest.skip('no such server')\n")
    out = _tools_test(str(tmp_path / "test_one.py"), "-p", "no:cacheprovider")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 passed, 1 skipped" in out.stdout
    assert "1 test(s) skipped" in out.stderr and "a skip is a failure here" in out.stderr
    (tmp_path / "test_one.py").write_text("def test_runs():\n    pass\n")
    out = _tools_test(str(tmp_path / "test_one.py"), "-p", "no:cacheprovider")
    assert out.returncode == 0, out.stdout + out.stderr


def test_tools_test_names_what_to_install_when_it_cannot():
    # A machine without redis-server, run by a user who cannot install it: one line
    # saying what to install (the programs are hidden by a PATH without them).
    import pathlib
    import tempfile

    home = pathlib.Path(tempfile.mkdtemp(prefix="vela-tools-test-"))  # the other user must reach it
    home.chmod(0o755)
    bin_dir = home / "bin"
    bin_dir.mkdir()
    for program in ("bash", "cat", "sort", "id", "mktemp", "cksum", "tail", "rm", "dirname"):
        os.symlink(subprocess.run(["bash", "-c", f"command -v {program}"], capture_output=True, text=True,
                                  check=True).stdout.strip(), bin_dir / program)
    # a copy of the script, where that user can read it (the checkout may be in /root)
    (home / "tools").mkdir()
    shutil.copy(os.path.join(ROOT, "tools", "test"), home / "tools" / "test")
    env = {"PATH": str(bin_dir), "HOME": str(home)}
    try:
        out = _tools_test(env=env, prefix=(shutil.which("setpriv"), "--reuid=65534", "--regid=65534",
                                           "--clear-groups"), script=str(home / "tools" / "test"))
    finally:
        shutil.rmtree(home)
    assert out.returncode == 2, out.stdout + out.stderr
    line = out.stderr.strip()
    assert len(line.splitlines()) == 1, line
    for package in ("redis-server", "memcached", "iproute2", "iptables", "faketime", "valgrind", "gcc"):
        assert package in line, (package, line)
    assert line.startswith("tools/test: missing ") and "apt-get install" in line
