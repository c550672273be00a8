"""tools/inspect_shm.py (and `vela inspect`): a live cache, read without waiting for its
locks, also while a frozen process holds one of them."""
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

import vela
import vela.inspect
from conftest import Child, stripe_of_new_key
from vela.inspect import human_bytes, human_seconds, segment_exists

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "inspect_shm.py")


def run_tool(*args, timeout=20, module=False):
    """Run the tool in a child process, bounded in time; (returncode, stdout, stderr, seconds)."""
    argv = ([sys.executable, "-m", "vela.cli", "inspect"] if module else [sys.executable, TOOL])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    start = time.monotonic()
    proc = subprocess.run(argv + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start


@pytest.fixture
def filled(cache):
    for i in range(200):
        cache.put(f"user:{i}", {"id": i, "name": "x" * i}, ttl=600 if i % 2 else None,
                  tags=["users"] if i % 3 == 0 else ())
    cache.put(b"blob", b"\x00" * 5000)
    cache.put(("order", 7), 42)
    cache.get("user:1")
    cache.get("absent")
    return cache


def section(text, title):
    """The lines of a section of the human output, from its title to the next blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start + 1:end]


def test_human_output(filled):
    rc, out, err, _ = run_tool(filled.name, "--keys", 5)
    assert rc == 0, err
    assert f"vela cache {filled.name!r}: segment /vela.{filled.name}, format" in out
    assert re.search(r"capacity\s+8\.0 MiB", out)
    assert re.search(r"memory used\s+\d+\.\d KiB", out)
    assert re.search(r"entries\s+202 ", out)
    assert "eviction policy  lru" in out
    assert "none: every stripe lock and the heap lock are free" in out
    assert "Stampede leases (fetches in progress): 0" in out
    assert "Sweeper: none elected yet" in out  # the fixture's handle sweeps every 30 s: not yet
    assert "tag names are not stored in the segment" in out  # said, not invented
    assert "Cluster view: none" in out

    stats = section(out, "Stats")
    assert len({len(line) for line in stats}) == 1, stats  # right-aligned numbers
    assert re.search(r"hits\s+1$", stats[0])
    assert any(re.search(r"writes\s+202$", line) for line in stats)

    fill = section(out, "Stripe fill")
    assert fill[0].split() == ["entries", "stripes"]
    assert sum(int(line.split()[1]) for line in fill[1:]) == filled.info()["stripes"]

    keys = section(out, "Sampled keys: 5")
    assert keys[0].split() == ["key", "value", "size", "ttl", "left", "codec", "tags"]
    assert len(keys) == 6
    assert all(re.search(r"\d+ B|KiB", line) for line in keys[1:])


def test_json_output(filled):
    rc, out, err, _ = run_tool(filled.name, "--json", "--keys", 500)
    assert rc == 0, err
    snap = json.loads(out)
    assert snap["name"] == filled.name
    assert snap["memory"]["entries"] == 202
    assert snap["header"]["capacity"] == 8 << 20
    assert snap["header"]["eviction_policy"] == "lru"
    assert len(snap["stripes"]) == snap["header"]["stripes"]
    assert sum(s["entries"] for s in snap["stripes"]) == 202
    assert snap["locks"] == [] and snap["leases"] == [] and snap["warnings"] == []
    stats = filled.stats()
    for k in ("hits", "misses", "writes", "deletes"):
        assert snap["stats"][k] == stats[k]
    sample = {e["key"]: e for e in snap["sample"]["entries"]}
    assert len(sample) == 202 and snap["sample"]["busy_stripes"] == []
    assert sample["'user:1'"]["codec"] == "pickle" and 590 < sample["'user:1'"]["ttl"] <= 600
    assert sample["'user:0'"]["ttl"] is None and sample["'user:0'"]["tags"] == 1
    assert sample["b'blob'"] == dict(key="b'blob'", size=5000, ttl=None, codec="bytes", tags=0)
    assert sample["('order', 7)"]["codec"] == "int"


def test_absent_cache_exits_1_without_creating_it(cache_name):
    rc, out, err, _ = run_tool(cache_name)
    assert rc == 1
    assert f"no cache named {cache_name!r} on this host" in err
    assert segment_exists(cache_name) == (False, 0)
    rc, _, err, _ = run_tool("bad/name")
    assert rc == 1 and "name" in err


def _stall(name):
    c = vela.Cache(name, sweep_interval=None)
    c._table.debug_stall(1, "stalled-key", "value")  # stops forever holding a stripe lock


def _fetch_slowly(name):
    c = vela.Cache(name, sweep_interval=None)
    c.get_or_fetch("slow", lambda key: time.sleep(30))


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_frozen_lock_holder(filled):
    """Every other process may be frozen too: the tool only needs the segment."""
    table = filled._table
    staller = Child(_stall, filled.name)
    fetcher = Child(_fetch_slowly, filled.name)
    try:
        _wait(lambda: any(s[3] == staller.pid for s in table.stripes_info()), 5, "no stripe locked")
        _wait(lambda: table.leases_info(), 5, "no lease taken")
        os.kill(staller.pid, signal.SIGSTOP)
        os.kill(fetcher.pid, signal.SIGSTOP)
        stripe = next(i for i, s in enumerate(table.stripes_info()) if s[3] == staller.pid)

        rc, out, err, seconds = run_tool(filled.name, "--keys", 1000, "--check")
        assert seconds < 5, seconds
        assert rc == 3, (rc, out, err)  # the check did not run: not a violation, not clean
        held = section(out, "Locks held now")
        assert held[0].split() == ["lock", "holder", "pid", "process", "write"]
        assert re.search(rf"stripe {stripe}\s+{staller.pid}\s+stopped\s+in progress", held[1]), held
        assert f"stripe {stripe} is held by pid {staller.pid}, which is STOPPED" in out
        assert re.search(rf"skipped busy stripe {stripe}$", out, re.M)
        leases = section(out, "Stampede leases (fetches in progress): 1")
        assert re.search(rf"\s{fetcher.pid}\s+stopped\s", leases[1]), leases
        assert f"Integrity check: not run: stripe {stripe} by pid {staller.pid} (stopped)" in out

        rc, out, err, seconds = run_tool(filled.name, "--json", "--check", module=True)
        assert seconds < 5 and rc == 3, (rc, err)
        snap = json.loads(out)
        assert snap["locks"] == [dict(lock=f"stripe {stripe}", stripe=stripe, pid=staller.pid,
                                      state="stopped", write_in_progress=True)]
        assert [(le["pid"], le["state"]) for le in snap["leases"]] == [(fetcher.pid, "stopped")]
        assert snap["check"]["status"] == "skipped"

        # Thawed, the holder sleeps in the middle of its write: alive, but the lock
        # stays held. The check waits --check-timeout for it, then gives up (exit 3).
        os.kill(staller.pid, signal.SIGCONT)
        rc, out, err, seconds = run_tool(filled.name, "--check", "--check-timeout", 0.5)
        assert rc == 3 and seconds < 5, (rc, out, err)
        assert "Integrity check: not finished: VELA_ETIMEOUT" in out

        # Dead, it leaves the lock to be repaired by the next locker: here the check
        # (--keys only marks it: inspection never repairs, that needs the heap lock).
        staller.kill()
        fetcher.kill()
        rc, out, err, seconds = run_tool(filled.name)
        assert rc == 0
        assert re.search(rf"stripe {stripe}\s+{staller.pid}\s+dead", out)
        assert "a stampede lease (stripe" in out and f"held by pid {fetcher.pid}, which is dead" in out
        rc, out, err, seconds = run_tool(filled.name, "--check")
        assert rc == 0, (out, err)
        assert re.search(r"Integrity check: clean \(.*first repaired 1 stripe", out)
        assert filled.check() == []
        assert filled.get("user:3") == {"id": 3, "name": "xxx"}
    finally:
        staller.close()
        fetcher.close()


def test_check_exit_status(filled, monkeypatch, capsys):
    assert vela.inspect.main([filled.name, "--check"]) == 0
    assert "Integrity check: clean" in capsys.readouterr().out
    # A violation (a real one needs a damaged segment): exit 1, every problem listed.
    monkeypatch.setattr(vela.Cache, "check", lambda self: ["stripe 3: entry at offset 64: bad size",
                                                           "heap: block at offset 128 lost"])
    assert vela.inspect.main([filled.name, "--check"]) == 1
    out = capsys.readouterr().out
    assert "Integrity check: 2 PROBLEM(S)" in out
    assert "  - stripe 3: entry at offset 64: bad size" in out
    assert vela.inspect.main([filled.name, "--check", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["check"]["status"] == "problems"


def test_watch(filled):
    rc, out, err, seconds = run_tool(filled.name, "--watch", 0.1, "--count", 3)
    assert rc == 0, err
    assert out.count(f"vela cache {filled.name!r}") == 3
    rc, out, err, _ = run_tool(filled.name, "--watch", 0.1, "--count", 2, "--json")
    assert rc == 0, err
    assert [json.loads(line)["name"] for line in out.splitlines()] == [filled.name] * 2


def test_vela_command(filled):
    rc, out, err, _ = run_tool(filled.name, "--keys", 2, module=True)
    assert rc == 0, err
    assert f"vela cache {filled.name!r}" in out and "Sampled keys: 2" in out
    rc, out, err, _ = run_tool("--help", module=True)
    assert rc == 0 and "usage: vela inspect" in out
    proc = subprocess.run([sys.executable, "-m", "vela.cli"], capture_output=True, text=True, timeout=20,
                          cwd=ROOT)
    assert proc.returncode == 2 and "inspect" in proc.stderr
    script = shutil.which("vela")
    if script:  # installed by `pip install -e .` ([project.scripts])
        proc = subprocess.run([script, "inspect", filled.name, "--json"], capture_output=True, text=True,
                              timeout=20)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["name"] == filled.name


def test_units():
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(64 << 20) == "64.0 MiB"
    assert human_bytes(3 << 30) == "3.0 GiB"
    assert human_seconds(None) == "never"
    assert human_seconds(0.25) == "250 ms"
    assert human_seconds(12.34) == "12.3 s"
    assert human_seconds(245) == "4 min 05 s"
    assert human_seconds(7380) == "2 h 03 min"


def _raw_segment(name, head):
    import posix_ipc
    seg = posix_ipc.SharedMemory(f"/vela.{name}", posix_ipc.O_CREX, mode=0o600, size=1 << 20)
    try:
        os.pwrite(seg.fd, head, 0)
    finally:
        seg.close_fd()


@pytest.mark.parametrize("head, message", [
    (b"NOTVELA!" * 2, "is not a Vela table (magic 0x21414c4556544f4e)"),
    (struct.pack("<QIII", 0x56454C41A1B2C3D4, 1, 100, 0), "is not a finished Vela table (format 1, no READY"),
    (struct.pack("<QIII", 0x56454C41A1B2C3D4, 0, 100, 0x52454459), "made by another version of Vela"),
], ids=["foreign", "half-made", "other-format"])
def test_a_segment_that_is_not_a_table_is_left_alone(cache_name, head, message):
    """Opening such a segment as a Cache would lay a fresh table over it."""
    _raw_segment(cache_name, head)
    rc, out, err, _ = run_tool(cache_name)
    assert rc == 1 and message in err, (rc, out, err)
    import posix_ipc
    seg = posix_ipc.SharedMemory(f"/vela.{cache_name}")
    try:
        assert os.fstat(seg.fd).st_size == 1 << 20
        assert os.pread(seg.fd, len(head), 0) == head
    finally:
        seg.close_fd()


def test_readme_commands(filled):
    """Every command of the README's inspect_shm section, on a live cache."""
    from apps import readme

    (commands,) = [code for _, lang, code in readme.blocks(readme.section("Diagnostics with inspect_shm"))
                   if lang == "sh"]
    ran = 0
    for line in commands.splitlines():
        argv = line.split("#")[0].split()
        if not argv:
            continue
        argv = [filled.name if a == "shop" else a for a in argv]
        module = argv[:2] == ["vela", "inspect"]
        args = argv[2:]
        assert module or argv[:2] == ["python", "tools/inspect_shm.py"], line
        if "--watch" in args:
            args += ["--count", "1"]
        rc, out, err, _ = run_tool(*args, module=module)
        assert rc == 0, (line, out, err)
        assert filled.name in out, line
        ran += 1
    assert ran == 6


def test_cluster_view(filled):
    """What the host's bridge publishes in the segment is shown (none without a bridge)."""
    rc, out, _, _ = run_tool(filled.name)
    assert "Cluster view: none" in out
    if not hasattr(filled._table, "set_cluster"):
        pytest.skip("this build of the table has no cluster view")
    view = {"node_id": 3, "epoch": 7, "ready": True,
            "members": [{"node_id": 3, "addr": "tcp://127.0.0.1:7700", "state": "alive"},
                        {"node_id": 5, "addr": "tcp://127.0.0.1:7701", "state": "dead"}]}
    filled._table.set_cluster(json.dumps(view).encode())
    rc, out, err, _ = run_tool(filled.name)
    assert rc == 0, err
    members = section(out, "Cluster view (published by the host's vela-bridge)")
    assert re.search(r"epoch\s+7$", "\n".join(members), re.M)
    assert re.search(r"5\s+tcp://127\.0\.0\.1:7701\s+dead", "\n".join(members))
    rc, out, _, _ = run_tool(filled.name, "--json")
    assert json.loads(out)["cluster"]["epoch"] == 7


def _stall_in_put(name, phase, key):
    c = vela.Cache(name, sweep_interval=None)
    c._table.debug_stall(phase, key, b"v" * 3000)  # stops forever at `phase` of the put


def test_sample_never_repairs_a_dead_owners_stripe_while_the_heap_is_held(cache_name):
    """The race of inspection: the repair of a stripe whose owner died frees its pending
    blocks into the heap, so it needs the heap lock. sample() holds none and must not
    wait for it: while another process is stopped inside the heap (stall point 4, in
    vela_heap_take), sample() meets the dead owner's stripe and must leave it alone."""
    with vela.Cache(cache_name, capacity="8MiB", stripes=2, sweep_interval=None) as cache:
        table = cache._table
        keys = {}
        for i in range(100):
            keys.setdefault(stripe_of_new_key(table, f"k{i}"), f"k{i}")
        dead_key, live_key = keys[0], keys[1]
        neighbours = {f"n{i}": bytes([i]) * (100 + i * 37) for i in range(100)}
        for k, v in neighbours.items():
            cache.put(k, v)

        # 1. a writer dies at stall point 1: it holds stripe 0 and a block it allocated
        dead = Child(_stall_in_put, cache_name, 1, dead_key)
        _wait(lambda: table.stripes_info()[0][3] == dead.pid, 10, "stripe 0 not locked")
        dead.kill()
        # 2. another writer stops inside the heap, holding stripe 1 and the heap lock
        holder = Child(_stall_in_put, cache_name, 4, live_key)
        try:
            _wait(lambda: table.info()["heap_lock_holder"] == holder.pid, 10, "heap not locked")
            used_before = table.info()["memory_used"]

            items, busy = table.sample(1000)

            assert busy == [0, 1]  # 1: held by the live process; 0: left by a dead one
            assert items == []
            stripe0 = table.stripes_info()[0]
            assert stripe0[4] == 0, "stripe 0 was repaired without the heap lock"
            assert stripe0[3] == dead.pid  # still named as what the dead writer left
            assert table.info()["memory_used"] == used_before  # nothing freed under the holder
            assert table.info()["heap_lock_holder"] == holder.pid
        finally:
            holder.close()

        # The next real lockers repair both stripes and the heap, under the heap lock.
        assert cache.check() == []
        assert [s[4] for s in table.stripes_info()] == [1, 1]
        assert cache.get(dead_key) is None and cache.get(live_key) is None
        assert {k: cache.get(k) for k in neighbours} == neighbours
        assert cache.stats()["lock_recoveries"] >= 2
