"""The file backend: the same table in a memory-mapped file that survives
restarts, checks itself when first opened, and never serves a damaged value."""
import json
import os
import random
import signal
import time

import pytest

import vela

from conftest import FORK, new_name


@pytest.fixture
def file_cache(tmp_path):
    name = new_name()
    opts = {"data_dir": str(tmp_path)}
    yield name, opts, tmp_path / f"{name}.vela"
    vela.destroy(name, backend="file", backend_opts=opts)


def open_file(name, opts, **kw):
    return vela.Cache(name, backend="file", backend_opts=opts, sweep_interval=None, **kw)


def test_clean_close_then_reopen_loses_nothing(file_cache):
    name, opts, path = file_cache
    with open_file(name, opts, capacity="4MiB") as c:
        for i in range(2000):
            c.put(("k", i), {"i": i} if i % 3 else b"raw%d" % i,
                  ttl=3600 if i % 2 else None, tags=["odd"] if i % 2 else ["even"])
        c.incr("counter", 41)
    assert path.stat().st_size == 4 << 20
    with open_file(name, opts) as c:
        assert c._segment.last_rebuild == (2001, 0)
        assert len(c) == 2001
        assert all(c[("k", i)] == ({"i": i} if i % 3 else b"raw%d" % i) for i in range(2000))
        assert 3500 < c.ttl(("k", 1)) <= 3600 and c.ttl(("k", 2)) is None
        assert c.incr("counter") == 42
        assert c.invalidate_tag("odd") == 1000
        assert c.check() == []
        assert c.info()["capacity"] == 4 << 20


def _writer(name, opts, worker, n, ready_w):
    c = vela.Cache(name, backend="file", backend_opts=opts, sweep_interval=None)
    for i in range(n):
        c.put((worker, i), b"w%d-%d" % (worker, i), ttl=3600 if i % 2 else None, tags=[f"w{worker}"])
    os.write(ready_w, b"x")
    time.sleep(60)  # SIGKILLed here, with the file open


def test_sigkill_every_process_then_reopen(file_cache):
    """10,000 entries with tags and TTLs from 4 processes, all SIGKILLed: every
    entry is there on reopen, with its tags and remaining TTL."""
    name, opts, _ = file_cache
    open_file(name, opts, capacity="16MiB").close()
    r, w = os.pipe()
    procs = [FORK.Process(target=_writer, args=(name, opts, k, 2500, w), daemon=True) for k in range(4)]
    try:
        for p in procs:
            p.start()
        got = b""
        deadline = time.monotonic() + 60
        while len(got) < 4 and time.monotonic() < deadline:
            got += os.read(r, 4)
        assert len(got) == 4
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(5)
        os.close(r)
        os.close(w)
    with open_file(name, opts) as c:
        kept, dropped = c._segment.last_rebuild
        assert (kept, dropped) == (10000, 0)
        for k in range(4):
            for i in range(2500):
                assert c[(k, i)] == b"w%d-%d" % (k, i)
        assert 3500 < c.ttl((0, 1)) <= 3600 and c.ttl((0, 2)) is None
        assert [c.invalidate_tag(f"w{k}") for k in range(4)] == [2500] * 4
        assert c.check() == []


def test_expiry_is_wall_clock_and_survives_reopen(file_cache):
    name, opts, _ = file_cache
    with open_file(name, opts, capacity="2MiB") as c:
        c.put("short", 1, ttl=0.3)
        c.put("long", 2, ttl=60)
    time.sleep(0.4)
    with open_file(name, opts) as c:
        assert c._segment.last_rebuild == (1, 1)  # the expired one was dropped on open
        assert "short" not in c and c["long"] == 2
        assert 58 < c.ttl("long") <= 60


def test_options_that_disagree_raise_and_do_not_rebuild(file_cache):
    name, opts, _ = file_cache
    with open_file(name, opts, capacity="2MiB") as c:
        c.put("a", 1)
    with pytest.raises(vela.LayoutMismatch, match="capacity"):
        open_file(name, opts, capacity="4MiB")
    with open_file(name, opts) as c:
        assert c["a"] == 1


def test_another_host_is_refused_while_the_file_is_open(file_cache):
    name, opts, _ = file_cache
    with open_file(name, opts, capacity="2MiB") as c:
        c._table.host = "other-host"  # as if another host had opened it first
        with pytest.raises(vela.VelaError, match="open on host 'other-host'"):
            open_file(name, opts)
        c._table.host = c._segment.host


def test_bad_backend_options(tmp_path):
    with pytest.raises(vela.OptionError, match="data_dir"):
        vela.Cache(new_name(), backend="file")
    with pytest.raises(vela.OptionError, match="on_corrupt"):
        vela.Cache(new_name(), backend="file", backend_opts={"data_dir": str(tmp_path), "on_corrupt": "x"})
    with pytest.raises(vela.OptionError, match="sync_interval"):
        vela.Cache(new_name(), backend="file", backend_opts={"data_dir": str(tmp_path), "sync_interval": 0})
    with pytest.raises(vela.OptionError, match="colour"):
        vela.Cache(new_name(), backend="file", backend_opts={"data_dir": str(tmp_path), "colour": 1})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", ["random", "truncated", "empty-header"])
def test_damaged_file_raises_or_rebuilds(file_cache, content):
    name, opts, path = file_cache
    with open_file(name, opts, capacity="2MiB") as c:
        c.put("a", 1)
    data = path.read_bytes()
    if content == "random":
        path.write_bytes(os.urandom(len(data)))
    elif content == "truncated":
        path.write_bytes(data[: len(data) // 3])
    else:
        path.write_bytes(b"\0" * 4096 + data[4096:])
    with pytest.raises(vela.SegmentCorrupt, match="on_corrupt='raise'"):
        open_file(name, dict(opts, on_corrupt="raise"))
    with open_file(name, opts, capacity="2MiB") as c:
        assert len(c) == 0 and c.check() == []
        c.put("b", 2)
        assert c["b"] == 2


def _trial(path_str, name, opts, expected, seed, conn):
    """In a child: damage the file, open it, verify; report problems."""
    rng = random.Random(seed)
    data = bytearray(open(path_str, "rb").read())
    if rng.random() < 0.2:
        del data[rng.randrange(len(data)):]
    else:
        for _ in range(rng.randint(1, 16)):
            pos = rng.randrange(len(data))
            data[pos] = rng.randrange(256)
    open(path_str, "wb").write(bytes(data))
    try:
        c = open_file(name, opts)
    except vela.VelaError as exc:
        conn.send(("refused", str(exc)))
        return
    problems = c.check()
    wrong = [k for k, v in expected.items() if c.get(k, v) != v]
    c.close()
    conn.send(("opened", (problems, wrong)))


def test_random_damage_never_crashes_nor_serves_a_wrong_value(file_cache):
    """Hundreds of trials: flip bytes anywhere or truncate the file, then open it.
    Each trial runs in its own process, so a crash would show as a dead child."""
    name, opts, path = file_cache
    expected = {("k", i): bytes([i % 256]) * (i % 300) for i in range(400)}
    with open_file(name, opts, capacity="1MiB") as c:
        for k, v in expected.items():
            c.put(k, v, tags=["t"])
    pristine = path.read_bytes()
    outcomes = {"refused": 0, "opened": 0}
    for seed in range(300):
        path.write_bytes(pristine)
        parent, child = FORK.Pipe(duplex=False)
        p = FORK.Process(target=_trial, args=(str(path), name, opts, expected, seed, child))
        p.start()
        child.close()
        assert parent.poll(30), f"trial {seed}: no answer (hang?)"
        try:
            kind, detail = parent.recv()
        except EOFError:
            p.join(5)
            pytest.fail(f"trial {seed}: the opener died with exit code {p.exitcode}")
        p.join(5)
        assert p.exitcode == 0, f"trial {seed}: exit code {p.exitcode}"
        outcomes[kind] += 1
        if kind == "opened":
            problems, wrong = detail
            assert problems == [], f"trial {seed}: {problems}"
            assert wrong == [], f"trial {seed}: values differ for {wrong[:5]}"
    assert outcomes["opened"] == 300, outcomes  # on_corrupt="rebuild": never refused


def test_inspect_shm_reads_a_file_backed_cache(file_cache):
    import subprocess
    import sys

    name, opts, path = file_cache
    with open_file(name, opts, capacity="2MiB") as c:
        c.put("k", b"v" * 10, ttl=60)
        out = subprocess.run([sys.executable, "tools/inspect_shm.py", name, "--data-dir", opts["data_dir"],
                              "--keys", "5", "--check", "--json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["segment"] == str(path) and report["header"]["backend"] == "file"
        assert report["memory"]["entries"] == 1 and report["check"]["status"] == "clean"
        assert c["k"] == b"v" * 10
