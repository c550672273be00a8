"""The README's "Using Vela" example runs as written, and every line whose comment
starts with a value returns that value: the documentation cannot drift."""
import ast
import os
import re
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _using_vela_block():
    from apps import readme

    return readme.python_blocks("Using Vela")[0]


def _expected(comment):
    """The value a comment announces ('# 2: entries removed' -> 2), or a sentinel."""
    for i in range(len(comment), 0, -1):
        if i == len(comment) or comment[i] in ":;( ":
            try:
                return ast.literal_eval(comment[:i].strip())
            except (ValueError, SyntaxError):
                continue
    return _expected


def test_using_vela_example_runs_and_returns_what_its_comments_say():
    name = f"readme{uuid.uuid4().hex[:10]}"
    code = _using_vela_block().replace('"shop"', repr(name))
    lines = code.splitlines()
    tree = ast.parse(code)
    env = {}
    checked = 0
    try:
        for stmt in tree.body:
            src = ast.get_source_segment(code, stmt)
            line = lines[stmt.end_lineno - 1]
            comment = line.split("#", 1)[1].strip() if "#" in line and stmt.lineno == stmt.end_lineno else ""
            if isinstance(stmt, ast.Expr) and comment:
                value = eval(compile(ast.Expression(stmt.value), "README", "eval"), env)
                want = _expected(comment)
                if want is not _expected:
                    assert value == want, f"{src!r} gave {value!r}, the README says {comment!r}"
                    checked += 1
            else:
                exec(compile(ast.Module([stmt], []), "README", "exec"), env)
    finally:
        import vela

        vela.destroy(name)
    assert checked >= 12, checked  # the lines with a value in their comment


# ---- the Quick start and the cluster sections -------------------------------------------------
#
# The shell commands of the cluster sections run as written on two simulated hosts of
# this machine (tests/cluster.py says how hosts are simulated). What changes between
# the README and the run is only what must: each host's own address (10.0.0.5:7700,
# 0.0.0.0:7700) is a loopback port, the peers' addresses the other host's port, the
# /etc/vela files live in a temporary directory, capacities are 32 MiB, and each
# host's caches are in its own VELA_NAMESPACE.

import json  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

from apps import readme  # noqa: E402
from cluster import free_port  # noqa: E402


def _blocks(text, lang):
    return [code for _, language, code in readme.blocks(text) if language == lang]


def _commands(block):
    """The commands of a shell block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", "", block)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def quick_start_commands():
    (block,) = _blocks(readme.section("Quick start"), "sh")
    return _commands(block)


def test_quick_start_runs_the_demo_and_the_test_command():
    assert quick_start_commands() == ["pip install -e '.[bridge]' && python examples/demo.py", "tools/test"]
    tools_test = os.path.join(ROOT, "tools", "test")
    assert os.access(tools_test, os.X_OK)
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert "tools/test" in f.read()  # CI runs the README's command


def _port_pair():
    """A port whose successor is free too (a partitioned bridge's data port is --listen's + 1)."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two free consecutive ports")


class _Hosts:
    """Two simulated hosts, A (10.0.0.5 in the README) and B (10.0.0.6); 10.0.0.7, a
    third host of the README's config, is a port nobody listens on."""

    def __init__(self, tmp_path):
        self.etc = tmp_path / "etc-vela"
        self.etc.mkdir()
        token = uuid.uuid4().hex[:8]
        self.ports = {"A": _port_pair(), "B": _port_pair(), "C": free_port()}
        self.metrics = {"A": free_port(), "B": free_port()}
        self.env = {h: dict(os.environ, VELA_NAMESPACE=f"rd{token}{h}") for h in "AB"}
        self.bin = os.path.dirname(sys.executable)
        self.bridges = []

    def substitute(self, text, host):
        """The README's text as host ``host`` (A or B) runs it."""
        other = "B" if host == "A" else "A"
        me = f"127.0.0.1:{self.ports[host]}"
        for old, new in (("0.0.0.0:7700", me), ("10.0.0.5:7700", me),
                         ("10.0.0.6:7700", f"127.0.0.1:{self.ports[other]}"),
                         ("10.0.0.7:7700", f"127.0.0.1:{self.ports['C']}"),
                         ("0.0.0.0:7701", f"127.0.0.1:{self.ports[host] + 1}"),
                         ("127.0.0.1:9464", f"127.0.0.1:{self.metrics[host]}"),
                         ("/etc/vela/", f"{self.etc}/"), ('"1GiB"', '"32MiB"'), ('"4GiB"', '"32MiB"')):
            text = text.replace(old, new)
        return text

    def argv(self, command, host):
        argv = shlex.split(self.substitute(command, host))
        assert argv[0] in ("vela-bridge", "vela"), argv
        return [os.path.join(self.bin, argv[0])] + argv[1:]

    def run(self, command, host, timeout=60):
        out = subprocess.run(self.argv(command, host), capture_output=True, text=True, timeout=timeout,
                             env=self.env[host])
        assert out.returncode == 0, (command, out.stdout, out.stderr)
        return out.stdout

    def start(self, command, host, log):
        proc = subprocess.Popen(self.argv(command, host), stdout=log, stderr=subprocess.STDOUT,
                                env=self.env[host])
        self.bridges.append(proc)
        return proc

    def worker(self, code, host, timeout=60):
        """Runs a worker process of ``host``: the README's Python block, then ``code``;
        its last printed line, as JSON."""
        code = "import json, vela\n" + self.substitute(code, host)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=timeout, env=self.env[host])
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    def status(self, name, host):
        out = subprocess.run([os.path.join(self.bin, "vela-bridge"), "status", "--cache", name, "--timeout", "1"],
                             capture_output=True, text=True, timeout=60, env=self.env[host])
        return json.loads(out.stdout) if out.returncode == 0 else None

    def wait(self, what, condition, timeout=30):
        deadline = time.monotonic() + timeout
        while not condition():
            for proc in self.bridges:
                assert proc.poll() is None, f"a bridge exited with {proc.returncode} while waiting for {what}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.2)

    def close(self, *names):
        for proc in self.bridges:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.bridges:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for host in "AB":
            for name in names:
                subprocess.run([os.path.join(self.bin, "vela"), "destroy", name], capture_output=True,
                               env=self.env[host], timeout=60)


def _members_alive(status, node_count):
    return status is not None and sum(m["state"] == "alive" for m in status["members"]) >= node_count


def test_replicated_section_runs_as_written(tmp_path):
    section = readme.section("Running a cluster (replicated)")
    (worker_block,) = _blocks(section, "python")
    commands = _commands(_blocks(section, "sh")[0])
    assert [c.split()[1] for c in commands] == ["secret", "keygen", "run", "status"]
    secret_cmd, keygen_cmd, run_cmd, status_cmd = commands
    unit = _blocks(section, "ini")[0]
    (exec_start,) = re.findall(r"^ExecStart=(\S+)\s+(.*)$", unit, re.M)
    (toml,) = _blocks(section, "toml")
    hosts = _Hosts(tmp_path)
    try:
        hosts.run(secret_cmd, "A")
        hosts.run(keygen_cmd, "A")
        assert oct((hosts.etc / "secret").stat().st_mode & 0o777) == "0o600"
        # workers first: they create the cache with its topology
        for host in "AB":
            hosts.worker(worker_block + "\nprint(json.dumps(cache.info()['capacity']))", host)
        # host A: the command line; host B: the systemd unit's command with the README's config
        hosts.start(run_cmd, "A", open(tmp_path / "bridge-A.log", "wb"))
        (hosts.etc / "bridge.toml").write_text(hosts.substitute(toml, "B"))
        assert os.path.basename(exec_start[0]) == "vela-bridge"
        hosts.start("vela-bridge " + exec_start[1], "B", open(tmp_path / "bridge-B.log", "wb"))
        hosts.wait("two live members", lambda: _members_alive(hosts.status("shop", "A"), 1)
                   and _members_alive(hosts.status("shop", "B"), 1))
        # a write on host A reaches host B
        hosts.worker(worker_block + "\ncache.put('greeting', 'hello')\nprint(json.dumps(True))", "A")
        read_b = worker_block + "\nprint(json.dumps(cache.get('greeting')))"
        hosts.wait("the write on host B", lambda: hosts.worker(read_b, "B") == "hello")
        status = json.loads(hosts.run(status_cmd, "A"))
        assert status["caches"]["shop"]["sent"] >= 1
        with urllib.request.urlopen(f"http://127.0.0.1:{hosts.metrics['A']}/metrics", timeout=10) as r:
            assert b"vela_" in r.read()
    finally:
        hosts.close("shop")


def test_partitioned_section_runs_as_written(tmp_path):
    section = readme.section("Running a cluster (partitioned)")
    (block,) = _blocks(section, "python")
    assert 'topology_opts={"secret_file": "/etc/vela/secret"}' in block
    worker_block = "\n".join(line for line in block.splitlines()
                             if not line.startswith(("cache.put", "cache.get")))
    (run_cmd,) = _commands(_blocks(section, "sh")[0])
    secret_cmd = _commands(_blocks(readme.section("Running a cluster (replicated)"), "sh")[0])[0]
    hosts = _Hosts(tmp_path)
    try:
        hosts.run(secret_cmd, "A")  # "set up as for the replicated topology"
        for host in "AB":
            hosts.worker(worker_block + "\nprint(json.dumps(True))", host)
        for host in "AB":
            hosts.start(run_cmd, host, open(tmp_path / f"bridge-{host}.log", "wb"))

        def table_complete():
            owned = []
            for host in "AB":
                status = hosts.status("catalog", host)
                if status is None or not status["caches"]["catalog"]["ready"]:
                    return False
                owned.append(status["caches"]["catalog"]["owned"])
            return min(owned) > 0 and sum(owned) == 271

        hosts.wait("a partition table with both members", table_complete)
        # the README's lines, on each host: the put lands on the key's owner, the get reads it
        run_block = block.replace('cache.get("sku:1")', 'print(json.dumps(cache.get("sku:1")))')
        for host in "AB":
            assert hosts.worker(run_block, host) == {"price": 12}
        assert hosts.worker(worker_block + '\nprint(json.dumps(cache.get("sku:1")))', "B") == {"price": 12}
        # without the secret, the host that does not own the key cannot reach its owner
        no_secret = (re.sub(r",\s*(#[^\n]*)?\n\s*topology_opts=\{[^}]*\}\)", ")", worker_block)
                     + '\ntry:\n    cache.get("sku:1")\n    print(json.dumps("read"))\n'
                     'except vela.BridgeUnavailable:\n    print(json.dumps("refused"))')
        assert "secret_file" not in no_secret
        assert sorted(hosts.worker(no_secret, host) for host in "AB") == ["read", "refused"]
    finally:
        hosts.close("catalog")


def test_install_section_names_extras_that_exist():
    from test_packaging import _pyproject

    commands = _commands(_blocks(readme.section("Install"), "sh")[0])
    extras = _pyproject()["project"]["optional-dependencies"]
    assert commands[0] == "pip install vela"
    named = [re.fullmatch(r"pip install 'vela\[(\w+)\]'", c).group(1) for c in commands[1:]]
    assert named == ["bridge", "redis", "inspect", "msgpack"]
    assert set(named) <= set(extras)


def test_telemetry_example_runs_as_written():
    import vela

    code = readme.python_blocks("Using Vela")[1]
    readme.run_snippet(code, {"vela": vela})
    assert "slow-gets" not in vela.telemetry.list_handlers()


def test_file_backend_example_runs_as_written(tmp_path):
    import vela

    (code,) = readme.python_blocks("The file backend")
    data_dir = tmp_path / "vela"
    data_dir.mkdir()
    code = code.replace("/var/lib/myapp/vela", str(data_dir)).replace('"256MiB"', '"8MiB"')
    env = readme.run_snippet(code, {"vela": vela})
    try:
        env["cache"].put("session:1", {"user": 7})
        env["cache"].close()
        env = readme.run_snippet(code, {"vela": vela})  # a restart: the entries are on disk
        assert env["cache"].get("session:1") == {"user": 7}
        env["cache"].close()
    finally:
        out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "vela"), "destroy", "sessions",
                              "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert os.listdir(data_dir) == []


def test_command_line_section_runs_as_written(tmp_path):
    commands = _commands(_blocks(readme.section("Command line"), "sh")[0])
    assert [" ".join(c.split()[:2]) for c in commands] == [
        "vela ls", "vela ls", "vela inspect", "vela destroy", "vela destroy", "vela --version",
        "vela-bridge secret", "vela-bridge status"]
    hosts = _Hosts(tmp_path)
    data_dir = tmp_path / "var-lib-myapp-vela"
    data_dir.mkdir()
    try:
        # a host with the cache shop (replicated, with its bridge) and a file-backed shop
        hosts.worker('cache = vela.Cache("shop", capacity="8MiB", topology="replicated")\n'
                     'cache.put_many({f"k{i}": i for i in range(6)})\n'
                     f'vela.Cache("shop", backend="file", backend_opts={{"data_dir": {str(data_dir)!r}}},'
                     ' capacity="2MiB").close()\nprint(1)', "A")
        bridge = hosts.start("vela-bridge run --cache shop --listen tcp://0.0.0.0:7700", "A",
                             open(tmp_path / "bridge.log", "wb"))
        hosts.wait("the bridge", lambda: hosts.status("shop", "A") is not None)
        outputs = []
        for command in commands:
            command = command.replace("/var/lib/myapp/vela", str(data_dir))
            if command.startswith("vela --version"):
                command = command.split(" && ")[0]
            outputs.append(hosts.run(command, "A"))
        ls, ls_json, inspect_out, destroyed, destroyed_file, version, secret, status = outputs
        assert ls.split("\n")[1].split() == ["shop", "8.0", "MiB", "6", "replicated", "alive", "(pid",
                                             f"{bridge.pid})"]
        assert [r["name"] for r in json.loads(ls_json)] == ["shop"]
        assert "vela cache 'shop'" in inspect_out and "Sampled keys: 5" in inspect_out
        assert destroyed == "destroyed cache 'shop' on this host\n"
        assert destroyed_file == f"destroyed cache 'shop' in {data_dir}\n" and os.listdir(data_dir) == []
        assert version.startswith("vela ")
        assert (secret, oct((hosts.etc / "secret").stat().st_mode & 0o777)) == ("", "0o600")
        assert json.loads(status)["pid"] == bridge.pid
    finally:
        hosts.close("shop")
