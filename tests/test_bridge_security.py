"""vela-bridge against peers it must not trust: a listen address that needs
authentication, a peer with the wrong secret, 10,000 fuzzed or malformed messages,
and authenticated peers that send nonsense or go away in the middle of a snapshot.

Every bridge here is a real process; the hostile peer is a raw ZeroMQ DEALER in the
test process connected to a bridge's listen port (loopback only).
"""
import itertools
import random
import signal
import subprocess
import sys
import time

import pytest

from cluster import Cluster, eventually, free_port

zmq = pytest.importorskip("zmq")
msgpack = pytest.importorskip("msgpack")

from vela.bridge import protocol  # noqa: E402

SECRET = b"s3cret-for-the-tests-0123456789abcdef"
FAKE = 3000  # node ids of the hostile peer: no real host uses them


@pytest.fixture
def secure2(tmp_path):
    c = Cluster(tmp_path, n=2, secret=SECRET)
    try:
        c.wait_members()
        yield c
    finally:
        c.close()


def counters(host):
    return host.status()["counters"]


def dealer(host):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 10_000)  # closing waits (bounded) until what was sent is out
    sock.setsockopt(zmq.SNDTIMEO, 10_000)
    sock.connect(host.listen)
    return sock


def signed(fields, secret=SECRET):
    """Frames as a bridge with ``secret`` sends them (no field added)."""
    return protocol.pack(secret, fields)


_NUMBERS = itertools.count(1)


def header(kind, node=FAKE, inc=7, **fields):
    """A message's fields as a bridge of ``node`` (incarnation ``inc``) sends them; each
    gets the next message number."""
    return dict(fields, t=kind, v=protocol.PROTOCOL, n=next(_NUMBERS), **{"from": node, "inc": inc})


def replication_works(cluster, tag):
    a, b = cluster[0], cluster[1]
    a.put(f"a-{tag}", tag)
    b.put(f"b-{tag}", tag)
    eventually(lambda: b.get(f"a-{tag}") == tag and a.get(f"b-{tag}") == tag, 10,
               what=f"replication A <-> B still works ({tag})")


# --------------------------------------------------------------------------------------
# listening


def _run_bridge(host, *args, timeout=15):
    return subprocess.run([sys.executable, "-m", "vela.bridge", "run", "--cache", host.cache_name,
                           "--heartbeat", "0.2", "--failure-timeout", "1.0"] + list(args),
                          env=host.env, capture_output=True, text=True, timeout=timeout, cwd=host.workdir)


def test_refuses_a_non_loopback_listen_address_without_authentication(tmp_path):
    c = Cluster(tmp_path, n=1, start=False)
    try:
        host = c[0]
        port = free_port()
        for listen in (f"tcp://0.0.0.0:{port}", f"tcp://*:{port}"):
            out = _run_bridge(host, "--listen", listen, "--advertise", f"tcp://127.0.0.1:{port}")
            assert out.returncode != 0, out
            assert "refusing to listen" in out.stderr and "--secret-file" in out.stderr \
                and "--insecure" in out.stderr, out.stderr
        # a secret shorter than 16 bytes is no secret
        short = c.write_secret(b"short", "short-secret")
        out = _run_bridge(host, "--listen", f"tcp://0.0.0.0:{port}", "--advertise",
                          f"tcp://127.0.0.1:{port}", "--secret-file", short)
        assert out.returncode != 0 and "16 bytes" in out.stderr, out

        # with a secret, or told --insecure, it runs (and answers on its control socket)
        secret = c.write_secret(SECRET, "secret")
        for extra in (["--secret-file", secret], ["--insecure"]):
            host.start_bridge(listen=f"tcp://0.0.0.0:{port}", extra=["--advertise", f"tcp://127.0.0.1:{port}"] + extra)
            assert host.status()["listen"] == f"tcp://0.0.0.0:{port}"
            assert host.kill_bridge(signal.SIGTERM) == 0, "SIGTERM is a clean shutdown"
    finally:
        c.close()


# --------------------------------------------------------------------------------------
# a peer with the wrong secret


def test_a_peer_with_the_wrong_secret_gets_nothing_applied(secure2):
    a, b = secure2
    wrong = secure2.write_secret(b"another-secret-of-enough-length!", "wrong-secret")
    intruder = secure2.add_host(join=[a, b], secret_file=wrong)        # C: a different secret
    unsigned = secure2.add_host(join=[a, b], secret_file=None)         # D: no secret at all
    # the legitimate pair had the --secret-file of the cluster: check it was used
    assert "--secret-file" in a.bridge_args and "--secret-file" not in unsigned.bridge_args

    intruder.put_many([(f"evil{i}", i) for i in range(50)])
    unsigned.put_many([(f"unsigned{i}", i) for i in range(50)])
    a.put("good", "from A")
    eventually(lambda: b.get("good") == "from A", 5, what="A's write on B")
    time.sleep(2 * 1.0)  # two failure timeouts' worth of heartbeats and batches

    for h in (a, b):
        assert h.call("count_present", keys=[f"evil{i}" for i in range(50)]) == 0, h.label
        assert h.call("count_present", keys=[f"unsigned{i}" for i in range(50)]) == 0, h.label
        assert set(h.member_states()) == {a.node_id, b.node_id} - {h.node_id}, \
            f"{h.label} took an unauthenticated peer as a member: {h.member_states()}"
    for h in (intruder, unsigned):
        assert not h.has("good"), f"{h.label} received a change without the secret"
    for h in (a, b):
        assert counters(h)["unauthenticated"] > 0, h.label
    assert a.size() == b.size() == 1


# --------------------------------------------------------------------------------------
# fuzzing


def _fuzz_messages(rng, name, n):
    """n hostile messages: (frames, kind) with kind "unauth" (bad or no MAC),
    "malformed" (a valid MAC over something invalid) or "any" (either counter)."""
    def rb(lo, hi):
        return rng.randbytes(rng.randint(lo, hi))

    good_record = [protocol.PUT, b"key", b"value", 1, 0, [], 12345]
    bad_records = [
        [9] + good_record[1:], [protocol.PUT, b"k" * 2000] + good_record[2:],
        [protocol.PUT, "str-key"] + good_record[2:], [protocol.PUT, b""] + good_record[2:],
        good_record[:2] + ["str-value"] + good_record[3:], good_record[:3] + [99] + good_record[4:],
        good_record[:3] + [-3] + good_record[4:], good_record[:4] + [-5] + good_record[5:],
        good_record[:4] + ["x"] + good_record[5:], good_record[:4] + [2**63] + good_record[5:],
        good_record[:5] + [list(range(40))] + good_record[6:], good_record[:5] + [[-1]] + good_record[6:],
        good_record[:5] + [["tag"]] + good_record[6:], [protocol.TAG, b"", b"", 0, 0, [1, 2], 5],
        good_record[:6] + [0], good_record[:6] + [-1], good_record[:6] + [2.5],
        good_record[:6] + [True], good_record[:6], good_record + [1], "record", None, {"op": 1},
        [True] + good_record[1:],
    ]
    base_hello = header("hello", addr="tcp://127.0.0.1:9", members=[], seqs={})

    def bad_field_message():
        choice = rng.randrange(12)
        if choice == 0:
            return header("batch", c=name, seq=1, recs=[good_record] * rng.randint(0, 3) + [rng.choice(bad_records)])
        if choice == 1:
            return header("batch", c=name, seq=rng.choice([-1, "1", None, 2**64 - 1]), recs=[good_record])
        if choice == 2:
            return header("batch", c=rng.choice(["", 5, None, "x" * 300]), seq=1, recs=[])
        if choice == 3:
            bad = rng.choice([{"entries": [good_record[1:6]]}, {"entries": [[b"k"]]}, {"tombs": [[b"", 5]]},
                              {"tombs": [[b"k", 0]]}, {"tagwm": [[-1, 5]]}, {"flushwm": -1},
                              {"last": 1}, {"entries": "x"}, {"tombs": [[b"k"]]}])
            return header("snap", **dict({"c": name, "req": 1, "last": False, "entries": [], "tombs": [],
                                          "tagwm": [], "flushwm": 0}, **bad))
        if choice == 4:
            return header("rpc", c=name, id=1, op=rng.choice(["drop", "flush", "tag"]),
                          version=rng.choice([0, -1, "v"]), tag=rng.choice([None, -1, "t"]))
        if choice == 5:
            return header("rpcr", id=rng.choice([-1, "x", None]), removed=rng.choice([-1, "x", 2**64 - 1]))
        if choice == 6:
            bad = rng.choice([{"members": [[99999, "tcp://127.0.0.1:1"]]}, {"members": [[1, 5]]},
                              {"members": [[1, "x" * 300]]}, {"members": [[1, "a", 3]]}, {"members": "x"},
                              {"addr": ""}, {"addr": 5}, {"addr": "x" * 300}, {"seqs": {"c": "x"}},
                              {"seqs": [1]}, {"seqs": {"c": -5}}])
            return dict(base_hello, **bad)
        if choice == 7:
            return dict(header(rng.choice(["batch", "hello", "snap"]), c=name), **{
                rng.choice(["from", "inc", "v"]): rng.choice([-1, "x", None, True, 5000, 2.5])})
        if choice == 8:
            return header(rng.choice(["ping", "", "BATCH", None, 7, "x" * 100]), c=name)
        if choice == 9:
            return header("snapreq", c=name, req=rng.choice([-1, "x", None]))
        if choice == 10:
            msg = header("batch", c=name, seq=1, recs=[good_record])
            del msg[rng.choice(["t", "from", "inc", "v", "c", "seq", "recs"])]
            return msg
        return header("resync", c=rng.choice([None, 3, ""]))

    def huge_declared():
        heads = [b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff",
                 b"\xdf\xff\xff\xff\xff", b"\xda\xff\xff", b"\xdc\xff\xff", b"\xc9\xff\xff\xff\xff\x01"]
        head = rng.choice(heads)
        inner = msgpack.packb(header("batch", c=name, seq=1, recs=[]), use_bin_type=True)
        # a huge declared size, at the top or nested in a map, followed by a few bytes
        return rng.choice([head + rb(0, 64), inner[:-1] + head + rb(0, 16),
                           b"\x85\xa1t\xa5batch\xa4recs" + head + rb(0, 32)])

    out = []
    for i in range(n):
        kind = i % 10
        if kind == 0:   # random bytes, one frame
            out.append(([rb(0, 300)], "any"))
        elif kind == 1:  # two frames, random MAC
            out.append(([rb(0, 40), rb(0, 400)], "unauth"))
        elif kind == 2:  # a well-formed message without or with a forged MAC
            frames = signed(header("batch", c=name, seq=i, recs=[good_record]), secret=b"")
            frames[0] = rng.choice([b"", rb(32, 32), frames[0]])
            out.append((frames, "unauth"))
        elif kind == 3:  # many frames
            out.append(([rb(0, 50) for _ in range(rng.randint(3, 6))], "any"))
        elif kind == 4:  # valid MAC over random bytes
            out.append((signed_raw(rb(0, 500)), "malformed"))
        elif kind == 5:  # valid MAC over truncated msgpack
            payload = msgpack.packb(header("batch", c=name, seq=i, recs=[good_record] * 3), use_bin_type=True)
            out.append((signed_raw(payload[:rng.randrange(len(payload))]), "malformed"))
        elif kind == 6:  # valid MAC over msgpack that is not a map
            value = rng.choice([[1, 2], 5, "batch", b"\x00" * 10, None, True, 1.5, [header("batch")]])
            out.append((signed_raw(msgpack.packb(value, use_bin_type=True)), "malformed"))
        elif kind == 7:  # valid MAC, huge declared sizes
            out.append((signed_raw(huge_declared()), "malformed"))
        else:           # valid MAC, the right shape, a wrong field or record
            out.append((signed(bad_field_message()), "malformed"))
    # a few real-size ones: more records than a batch may carry
    for _ in range(3):
        out.append((signed(header("batch", c=name, seq=1, recs=[0] * (protocol.MAX_RECORDS + 1))), "malformed"))
    return out[:n]


def signed_raw(payload, secret=SECRET):
    import hashlib
    import hmac

    return [hmac.new(secret, payload, hashlib.sha256).digest(), payload]


def test_ten_thousand_fuzzed_messages_crash_nothing(secure2):
    a, b = secure2
    a.put_many([(f"pre{i}", i) for i in range(100)])
    secure2.wait_converged(expect=100)
    before = counters(a)
    messages = _fuzz_messages(random.Random(20240601), secure2.name, 10_000)
    assert len(messages) == 10_000
    sock = dealer(a)
    try:
        for i, (frames, _) in enumerate(messages):
            sock.send_multipart(frames)
            if i % 1000 == 999:
                assert a.bridge_alive(), f"the bridge died after {i + 1} messages:\n{a.bridge_output()}"
    finally:
        sock.close()
    expected = {"unauth": sum(k == "unauth" for _, k in messages),
                "malformed": sum(k == "malformed" for _, k in messages)}

    def all_received():
        if not a.bridge_alive():
            raise AssertionError(f"the bridge died:\n{a.bridge_output()}")
        now = counters(a)
        delta = {k: now[k] - before[k] for k in ("malformed", "unauthenticated", "messages_in")}
        return delta if delta["messages_in"] >= 10_000 else None

    eventually(all_received, 30, 0.2, what="the bridge received every fuzzed message")
    time.sleep(0.5)
    assert a.bridge_alive() and b.bridge_alive()
    # nothing of it reached the table or the membership, and replication goes on
    assert a.size() == 100
    assert set(a.member_states()) == {b.node_id}
    replication_works(secure2, "after-fuzz")
    secure2.wait_converged(expect=102)

    # every one was counted and dropped
    now = counters(a)
    delta = {k: now[k] - before[k] for k in ("malformed", "unauthenticated")}
    accepted = []
    for frames, _ in messages:
        try:
            accepted.append(protocol.unpack(SECRET, frames))
        except protocol.Malformed:
            pass
    assert delta["malformed"] + delta["unauthenticated"] == 10_000, \
        f"{10_000 - sum(delta.values())} fuzzed messages were not counted as malformed; the validator " \
        f"accepts these: {accepted[:5]}"
    assert delta["unauthenticated"] >= expected["unauth"], (delta, expected)
    assert delta["malformed"] >= expected["malformed"], (delta, expected)


# --------------------------------------------------------------------------------------
# authenticated peers that send nonsense or go away


def test_a_member_address_that_cannot_be_dialled_is_dropped_not_fatal(secure2):
    """An authenticated peer (a misconfigured --advertise, say) announces addresses
    that are not ZeroMQ endpoints: the bridge must drop them and keep running."""
    a, b = secure2
    sock = dealer(a)
    try:
        for i, addr in enumerate(["nonsense", "tcp://", "tcp://127.0.0.1:notaport", "udp://127.0.0.1:5",
                                  "ipc://" + "/x" * 100]):
            sock.send_multipart(signed(header("hello", node=FAKE + i, addr=addr, members=[], seqs={})))
            sock.send_multipart(signed(header("hello", node=FAKE + 50, addr="tcp://127.0.0.1:9",
                                              members=[[FAKE + 100 + i, addr]], seqs={})))
        time.sleep(1.0)
    finally:
        sock.close()
    assert a.bridge_alive(), f"the bridge died on a bad member address:\n{a.bridge_output()}"
    assert a.status(timeout=2) is not None, "the bridge stopped answering"
    replication_works(secure2, "after-bad-address")


def test_a_snapshot_for_a_peer_that_went_away_does_not_stall_the_bridge(secure2):
    """A peer asks for a snapshot and is gone before it is served (killed, or its
    address unreachable): the bridge must give up on it, not block its loop: it keeps
    answering, heartbeating and replicating."""
    a, b = secure2
    a.put_many([(f"s{i}", "x" * 100) for i in range(5000)])
    secure2.wait_converged(expect=5000)
    gone = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    sock = dealer(a)
    try:
        sock.send_multipart(signed(header("hello", addr=gone, members=[], seqs={})))
        time.sleep(0.3)
        sock.send_multipart(signed(header("snapreq", c=secure2.name, req=1)))
    finally:
        sock.close()
    time.sleep(1.5)  # past B's failure timeout, if A stalled
    assert a.status(timeout=2) is not None, "the bridge stopped answering (blocked sending a snapshot)"
    assert b.member_states().get(a.node_id) == "alive", f"B lost A: {b.member_states()}"
    replication_works(secure2, "after-snapshot-to-nowhere")


# --------------------------------------------------------------------------------------
# encryption


def _keygen(cluster, filename):
    out = subprocess.run([sys.executable, "-m", "vela.bridge", "keygen"], capture_output=True, text=True,
                         timeout=30, check=True)
    lines = out.stdout.split()
    assert len(lines) == 2 and all(len(k) == 40 for k in lines), out.stdout
    return cluster.write_secret(out.stdout, filename)


def test_curve_encrypted_links_replicate_and_keep_others_out(tmp_path):
    """With --curve-key-file every link is encrypted: bridges sharing the cluster key
    replicate; a bridge with another key (and the right HMAC secret) gets no link at all."""
    c = Cluster(tmp_path, n=0, secret=SECRET)
    try:
        key = _keygen(c, "curve")
        other = _keygen(c, "curve-other")
        a = c.add_host(join=[], extra=["--curve-key-file", key])
        b = c.add_host(join=[a], extra=["--curve-key-file", key])
        eventually(lambda: a.member_states().get(b.node_id) == "alive", 10, what="A and B linked")
        a.put("k", "over curve")
        eventually(lambda: b.get("k") == "over curve", 10, what="A's write on B")

        stranger = c.add_host(join=[a, b], extra=["--curve-key-file", other])
        stranger.put("s", "from a stranger")
        a.put("k2", "second")
        eventually(lambda: b.get("k2") == "second", 10, what="A's second write on B")
        time.sleep(2.0)
        for h in (a, b):
            assert not h.has("s"), h.label
            assert stranger.node_id not in h.member_states(), h.member_states()
        assert not stranger.has("k2")

        bad = c.write_secret(b"not a key file\n", "bad-curve")
        out = _run_bridge(a, "--listen", f"tcp://127.0.0.1:{free_port()}", "--curve-key-file", bad)
        assert out.returncode != 0 and "two z85 keys" in out.stderr, out
    finally:
        c.close()


# --------------------------------------------------------------------------------------
# the control socket


def test_the_control_socket_lives_next_to_the_segment_owner_only(tmp_path):
    """The socket that can flush the whole cluster is in the segment's directory
    (/dev/shm: whoever shares the segment reaches it, a sidecar container too), mode
    0600, found by workers and `vela-bridge status` whatever their TMPDIR, and removed
    when the bridge exits."""
    import os
    import stat

    from cluster import control_path_in

    c = Cluster(tmp_path, n=1)
    try:
        host = c[0]
        path = control_path_in(host.namespace, c.name)
        assert os.path.dirname(path) == "/dev/shm"
        assert os.path.basename(path) == f"vela.{host.namespace}.{c.name}.bridge"
        assert os.path.exists(f"/dev/shm/vela.{host.namespace}.{c.name}")  # the segment, next to it
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
        host.env["TMPDIR"] = str(tmp_path / "elsewhere")
        out = host.cli("status", "--cache", c.name)
        assert out.returncode == 0 and f'"pid": {host.bridge.pid}' in out.stdout, out
        assert host.kill_bridge(signal.SIGTERM) == 0
        assert not os.path.exists(path), "the control socket outlived its bridge"
        out = host.cli("status", "--cache", c.name, "--timeout", "0.5")
        assert out.returncode == 2 and path in out.stderr, out  # (an operator mistake: one line, exit 2)
    finally:
        c.close()
