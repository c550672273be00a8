"""The console commands an operator types: `vela` and `vela-bridge`.

An operator mistake (a missing file, a cache of another layout, no bridge, a bad
name) gets one line on stderr naming the problem and the fix, and exit status 2:
never a traceback.
"""
import json
import os
import select
import stat
import subprocess
import sys
import time
import uuid

import pytest

import vela
from cluster import Cluster, eventually, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env)


def vela_cmd(*args, env=None):
    return run("-m", "vela", *args, env=env)


def bridge_cmd(*args, env=None, timeout=60):
    return run("-m", "vela.bridge", *args, env=env, timeout=timeout)


def assert_one_line_error(out, *words):
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    for word in words:
        assert word in out.stderr, (word, out.stderr)


@pytest.fixture
def namespace():
    """Its own VELA_NAMESPACE: `vela ls` sees only the caches of this test."""
    ns = f"cli{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, VELA_NAMESPACE=ns)
    yield env
    for name in os.listdir("/dev/shm"):
        if name.startswith(f"vela.{ns}."):
            os.unlink(os.path.join("/dev/shm", name))


def open_in(env, name, **options):
    """A cache of the namespace ``env`` names, made in a child process."""
    out = run("-c", f"import vela; vela.Cache({name!r}, **{options!r}).put_many({{i: i for i in range(10)}})",
              env=env)
    assert out.returncode == 0, out.stderr


# ---- vela -----------------------------------------------------------------------------------


def test_version_and_usage():
    assert vela_cmd("--version").stdout == f"vela {vela.__version__}\n"
    out = vela_cmd()
    assert out.returncode == 2 and "usage: vela" in out.stderr
    out = vela_cmd("--help")
    assert out.returncode == 0 and all(c in out.stdout for c in ("ls", "inspect", "destroy"))
    out = vela_cmd("frobnicate")
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr


def test_ls_lists_the_caches_of_the_host_with_size_entries_and_topology(namespace):
    out = vela_cmd("ls", env=namespace)
    assert (out.returncode, out.stdout) == (0, "no caches on this host (no /dev/shm/vela.* segment)\n")
    open_in(namespace, "alpha", capacity="2MiB")
    open_in(namespace, "beta", capacity="4MiB", topology="replicated")
    rows = json.loads(vela_cmd("ls", "--json", env=namespace).stdout)
    assert [(r["name"], r["segment_bytes"], r["entries"], r["topology"], r["bridge"], r["problem"]) for r in rows] \
        == [("alpha", 2 << 20, 10, "local", None, None), ("beta", 4 << 20, 10, "replicated", "none", None)]
    lines = vela_cmd("ls", env=namespace).stdout.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "ENTRIES", "TOPOLOGY", "BRIDGE"]
    assert lines[1].split() == ["alpha", "2.0", "MiB", "10", "local", "-"]
    assert lines[2].split() == ["beta", "4.0", "MiB", "10", "replicated", "none"]


def test_ls_says_whether_the_bridge_of_a_cache_is_alive(tmp_path):
    c = Cluster(tmp_path, n=1)
    try:
        host = c[0]
        (row,) = json.loads(vela_cmd("ls", "--json", env=host.env).stdout)
        assert (row["name"], row["topology"], row["bridge"]) == (c.name, "replicated", f"alive (pid {host.bridge.pid})")
        pid = host.bridge.pid
        host.kill_bridge()
        (row,) = json.loads(vela_cmd("ls", "--json", env=host.env).stdout)
        assert row["bridge"] == f"dead (pid {pid})"
    finally:
        c.close()


def test_ls_reports_a_segment_that_is_not_a_table_without_touching_it(namespace):
    path = f"/dev/shm/vela.{namespace['VELA_NAMESPACE']}.junk"
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    (row,) = json.loads(vela_cmd("ls", "--json", env=namespace).stdout)
    assert row["name"] == "junk" and row["segment_bytes"] == 4096 and "not a Vela table" in row["problem"]
    assert open(path, "rb").read() == b"\0" * 4096


def test_destroy_removes_a_cache_and_says_so(namespace):
    open_in(namespace, "gone", capacity="2MiB")
    segment = f"/dev/shm/vela.{namespace['VELA_NAMESPACE']}.gone"
    assert os.path.exists(segment)
    out = vela_cmd("destroy", "gone", env=namespace)
    assert (out.returncode, out.stdout) == (0, "destroyed cache 'gone' on this host\n"), out.stderr
    assert not os.path.exists(segment)
    out = vela_cmd("destroy", "gone", env=namespace)
    assert out.returncode == 1 and "no cache named 'gone'" in out.stderr and "vela ls" in out.stderr
    assert_one_line_error(vela_cmd("destroy", "../etc", env=namespace), "cache name '../etc' is not valid")


def test_destroy_a_file_backed_cache(tmp_path, cache_name):
    with vela.Cache(cache_name, backend="file", backend_opts={"data_dir": str(tmp_path)}, capacity="2MiB") as c:
        c.put("k", 1)
    assert os.listdir(tmp_path)
    out = vela_cmd("destroy", cache_name, "--data-dir", str(tmp_path))
    assert out.returncode == 0 and f"in {tmp_path}" in out.stdout, out.stderr
    assert [f for f in os.listdir(tmp_path) if cache_name in f] == []


# ---- vela-bridge ----------------------------------------------------------------------------


def test_secret_out_writes_a_file_only_its_owner_reads(tmp_path):
    path = tmp_path / "secret"
    out = bridge_cmd("secret", "--out", str(path))
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = path.read_text().strip()
    assert len(secret) >= 40
    # an existing secret is never overwritten: the cluster may be using it
    assert_one_line_error(bridge_cmd("secret", "--out", str(path)), "the file exists")
    assert path.read_text().strip() == secret
    out = bridge_cmd("keygen", "--out", str(tmp_path / "curve"))
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE((tmp_path / "curve").stat().st_mode) == 0o600
    assert [len(k) for k in (tmp_path / "curve").read_text().split()] == [40, 40]


def test_secret_redirected_to_a_file_others_can_read_warns(tmp_path):
    path = tmp_path / "secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w") as f:
        out = subprocess.run([sys.executable, "-m", "vela.bridge", "secret"], stdout=f, stderr=subprocess.PIPE,
                             text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0
    assert "readable by other users (mode 0644)" in out.stderr and "--out FILE" in out.stderr
    assert len(path.read_text().strip()) >= 40


def test_run_with_a_missing_secret_or_key_file_or_config_is_one_line(tmp_path):
    listen = f"tcp://127.0.0.1:{free_port()}"
    missing = str(tmp_path / "nope")
    assert_one_line_error(bridge_cmd("run", "--cache", "x", "--listen", listen, "--secret-file", missing),
                          f"--secret-file {missing}: no such file", f"vela-bridge secret --out {missing}")
    assert_one_line_error(bridge_cmd("run", "--cache", "x", "--listen", listen, "--curve-key-file", missing),
                          f"--curve-key-file {missing}: no such file", "vela-bridge keygen")
    assert_one_line_error(bridge_cmd("run", "--config", missing), f"--config {missing}: no such file")
    bad = tmp_path / "bad.toml"
    bad.write_text('cache = "x\n')
    assert_one_line_error(bridge_cmd("run", "--config", str(bad)), "not valid TOML")
    bad.write_text('cache = "x"\nlisten = "tcp://127.0.0.1:1"\nsecrets = "/x"\n')
    assert_one_line_error(bridge_cmd("run", "--config", str(bad)), "unknown option(s) secrets", "secret_file")
    assert_one_line_error(bridge_cmd("run", "--cache", "x"), "--cache and --listen are required")


def test_run_on_a_cache_of_another_layout_is_one_line(namespace):
    open_in(namespace, "plain", capacity="2MiB")  # a local cache: no bridge carries it
    out = bridge_cmd("run", "--cache", "plain", "--listen", f"tcp://127.0.0.1:{free_port()}", env=namespace)
    assert_one_line_error(out, "cache 'plain' exists but is local", "topology='replicated'")


def test_run_before_the_workers_made_the_cache_waits_says_so_and_leaves_nothing(namespace, tmp_path):
    """Issue 14: a bridge started before any worker waits for the cache (one line says
    so), makes no segment of its own, and serves the cache once the workers made it."""
    log = open(tmp_path / "bridge.log", "w+")
    bridge = subprocess.Popen([sys.executable, "-m", "vela.bridge", "run", "--cache", "early", "--listen",
                               f"tcp://127.0.0.1:{free_port()}"], env=namespace, stdout=log, stderr=log, text=True, cwd=ROOT)
    try:
        eventually(lambda: "does not exist on this host yet" in (tmp_path / "bridge.log").read_text(), 20,
                   what="the bridge says it waits")
        assert bridge.poll() is None
        assert json.loads(vela_cmd("ls", "--json", env=namespace).stdout) == []  # no local segment made
        open_in(namespace, "early", capacity="2MiB", topology="replicated")  # the workers make it
        eventually(lambda: "listening on" in (tmp_path / "bridge.log").read_text(), 20,
                   what="the bridge serves the cache")
        assert bridge.poll() is None
        text = (tmp_path / "bridge.log").read_text()
        assert "Traceback" not in text and text.count("does not exist on this host yet") == 1, text
    finally:
        bridge.terminate()
        bridge.wait(10)
        log.close()


def test_run_on_ports_in_use_is_one_line(namespace):
    import socket

    open_in(namespace, "busy", capacity="2MiB", topology="replicated")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = bridge_cmd("run", "--cache", "busy", "--listen", f"tcp://127.0.0.1:{port}", env=namespace)
        assert_one_line_error(out, "Address already in use")
        out = bridge_cmd("run", "--cache", "busy", "--listen", f"tcp://127.0.0.1:{free_port()}",
                         "--metrics-listen", f"127.0.0.1:{port}", env=namespace)
        assert_one_line_error(out, f"--metrics-listen 127.0.0.1:{port}: Address already in use")


def test_status_without_a_bridge_is_one_line(namespace):
    out = bridge_cmd("status", "--cache", "nobody", "--timeout", "0.3", env=namespace)
    assert_one_line_error(out, "bridge of cache 'nobody' did not answer", "vela-bridge run --cache nobody")


def test_the_bridge_warns_about_a_secret_file_others_can_read(namespace, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s" * 43 + "\n")
    secret.chmod(0o644)
    open_in(namespace, "shared", capacity="2MiB", topology="replicated")
    proc = subprocess.Popen([sys.executable, "-m", "vela.bridge", "run", "--cache", "shared", "--listen",
                             f"tcp://127.0.0.1:{free_port()}", "--secret-file", str(secret)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=namespace, cwd=ROOT)
    try:
        lines = []
        deadline = time.monotonic() + 30
        while not any("listening on" in line for line in lines) and time.monotonic() < deadline:
            if select.select([proc.stderr], [], [], 1)[0]:
                line = proc.stderr.readline().decode()
                if not line:
                    break
                lines.append(line)
        text = "".join(lines)
        assert "listening on" in text, text
        assert f"--secret-file {secret} is readable by its group and other users (mode 0644): chmod 600 {secret}" in text
    finally:
        proc.terminate()
        proc.wait(30)
