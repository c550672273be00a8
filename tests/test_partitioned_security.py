"""A partitioned cache's bridges against requests they must not trust: workers
without the cluster's secret, and thousands of malformed requests and handoff
messages sent straight to a bridge's port by a raw ZeroMQ DEALER in the test.
"""
import random

import pytest

from cluster import Cluster, DataPortSession, eventually, partitioned_with_secret

zmq = pytest.importorskip("zmq")
msgpack = pytest.importorskip("msgpack")

from vela import _native  # noqa: E402
from vela.bridge import protocol  # noqa: E402

SECRET = b"another-s3cret-for-partitions-0123456789"


@pytest.fixture
def secure_partitioned(tmp_path):
    with partitioned_with_secret(tmp_path, SECRET) as c:
        yield c


def counters(host):
    return host.status()["counters"]


def req(name, op, **fields):
    return dict(fields, t="req", v=protocol.PROTOCOL, id=1, e=0, c=name, op=op, inc=0, **{"from": 0})


def test_workers_need_the_clusters_secret(secure_partitioned, tmp_path):
    a, b = secure_partitioned
    a.put("k", "v")
    assert b.get("k") == "v"
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"not-the-secret-but-long-enough")
    # A key of the other host: it takes the bridges' word (a key of this host is written
    # in place, in shared memory, which the secret does not guard: the host's own users do).
    on_b = next(k for k in (f"via-other-{i}" for i in range(100)) if a.call("owner", key=k)[0] == b.node_id)
    kind, name, msg = a.call("open_other", topology_opts={"secret_file": str(wrong), "timeout": 1.0}, key=on_b)
    assert (kind, name) == ("raised", "BridgeUnavailable")
    assert a.call("open_other", topology_opts={"timeout": 1.0}, key=on_b)[:2] == ["raised", "BridgeUnavailable"]
    assert a.get(on_b) is None and b.get(on_b) is None  # nothing unauthenticated was applied
    assert counters(a)["unauthenticated"] + counters(b)["unauthenticated"] >= 2
    short = tmp_path / "short"
    short.write_bytes(b"short")
    assert a.call("open_other", topology_opts={"secret_file": str(short)})[:2] == ["raised", "OptionError"]
    assert a.call("open_other", topology_opts={"bridge": "x"})[:2] == ["raised", "OptionError"]


def _hostile(rng, name, n):
    """n signed messages, each invalid in one field: (frames, counted as malformed?)."""
    key = _native.encode_key("victim")
    good_put = dict(k=key, val=b"v", codec=0, ttl=0, tags=[])
    bad_requests = [
        req(name, "drop", k=key), req(name, "get", k="str"), req(name, "get", k=b""),
        req(name, "get", k=b"x" * 2000), req(name, "get", k=key, fb="yes"), req(name, "get"),
        req(name, "put", **dict(good_put, val="str")), req(name, "put", **dict(good_put, codec=7)),
        req(name, "put", **dict(good_put, codec=-1)), req(name, "put", **dict(good_put, ttl=-5)),
        req(name, "put", **dict(good_put, tags=["t"])), req(name, "put", **dict(good_put, tags=list(range(40)))),
        req(name, "put", **dict(good_put, holder="h" * 100)), req(name, "incr", k=key, delta=2**63, ttl=0),
        req(name, "incr", k=key, delta="1", ttl=0), req(name, "getm", ks=[key] * 10_001),
        req(name, "getm", ks=[key, 5]), req(name, "putm", items=[[key, b"v"]], ttl=0, tags=[]),
        req(name, "putm", items=[[key, b"v", 9]], ttl=0, tags=[]), req(name, "tag", tag=-1),
        req(name, "stats", reset="yes"), req(name, "fetch", k=key, holder=""),
        dict(req(name, "get", k=key), id=-1), dict(req(name, "get", k=key), e="x"),
        dict(req(name, "get", k=key), c=""),
    ]
    peer = dict(v=protocol.PROTOCOL, inc=9, **{"from": 3000})
    bad_peer = [
        dict(peer, t="hand", c=name, sid=1, role="own", ps=[1], last=True, entries=[[key, b"v", 0, 0, []]],
             vers=[]),
        dict(peer, t="hand", c=name, sid=1, role="steal", ps=[], last=True, entries=[], vers=[]),
        dict(peer, t="hand", c=name, sid=1, role="own", ps=[70000], last=True, entries=[], vers=[]),
        dict(peer, t="hand", c=name, sid=1, role="own", ps=[1], last=True, entries=[[key, b"v", 0, -1, []]],
             vers=[5]),
        dict(peer, t="hand", c=name, sid=1, role="own", ps=[1], last=True, entries="x", vers=[]),
        dict(peer, t="handack", c=name, sid=1, ps=["1"]),
        dict(peer, t="brec", c=name, recs=[[key, b"v", 0, 0]]),
        dict(peer, t="brec", c=name, recs=[[key, 5, 0, 0, [], 7]]),
        dict(peer, t="brec", c=name, recs=[[key, b"v", 0, 0, []]]),  # no version
        dict(peer, t="brec", c=name, recs=[[key, b"v", 0, 0, [], 0]]),
        dict(peer, t="inval", c=name, ks=[5]),
        dict(peer, t="rep", id="x"),
    ]
    out = []
    for i in range(n):
        if i % 3 == 2:
            payload = msgpack.packb(rng.choice(bad_requests), use_bin_type=True)
            out.append((_signed(payload[:rng.randrange(1, len(payload))]), True))  # truncated
        else:
            out.append((protocol.pack(SECRET, rng.choice(bad_requests + bad_peer)), True))
    return out


def _signed(payload):
    import hashlib
    import hmac

    return [hmac.new(SECRET, payload, hashlib.sha256).digest(), payload]


def test_five_thousand_malformed_requests_crash_nothing(secure_partitioned):
    a, b = secure_partitioned
    a.put_many([(f"pre{i}", i) for i in range(100)])
    before = counters(a)
    messages = _hostile(random.Random(8), secure_partitioned.name, 5000)
    rejected = 0
    for frames, _ in messages:
        try:
            protocol.unpack(SECRET, frames)
        except protocol.Malformed:
            rejected += 1
    assert rejected == 5000, "the validator accepts some of the hostile messages"
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 10_000)
    sock.connect(a.listen)
    try:
        for i, (frames, _) in enumerate(messages):
            sock.send_multipart(frames)
            if i % 1000 == 999:
                assert a.bridge_alive(), a.bridge_output()
    finally:
        sock.close()
    eventually(lambda: counters(a)["messages_in"] - before["messages_in"] >= 5000
               or counters(a)["malformed"] - before["malformed"] >= 5000, 30, 0.2,
               what="every hostile message received")
    assert counters(a)["malformed"] - before["malformed"] == 5000
    assert a.bridge_alive() and b.bridge_alive()
    assert a.get("victim") is None and b.size() == 100
    a.put("after", "still fine")
    assert b.get("after") == "still fine"


def test_signed_requests_that_make_no_sense_get_an_error_reply(secure_partitioned):
    a, b = secure_partitioned
    a.put("text", "not a number")
    owner = a.call("owner", key="text")[0]
    host = a if owner == a.node_id else b
    session = DataPortSession(host.data_addr, SECRET)
    try:
        epoch = host.status()["ring_epoch"]  # (a write routed by an older table is answered "retry")

        def ask(msg):
            return session.ask(dict(msg, e=epoch))

        reply = ask(req(secure_partitioned.name, "incr", k=_native.encode_key("text"), delta=1, ttl=0))
        assert reply["err"] == "TypeError"
        reply = ask(req("no-such-cache", "get", k=_native.encode_key("text")))
        assert reply["err"] == "BridgeUnavailable" and "does not carry" in reply["msg"]
        reply = ask(req(secure_partitioned.name, "put", k=_native.encode_key("text"), val=b"\x80junk", codec=3,
                        ttl=0, tags=[]))
        assert reply["ok"] is True  # the bridge stores bytes; it never unpickles them
        kind, name, _ = a.call("try", method="get", args=["text"])
        # the reader's own pickle.loads rejects the bytes; the bridge never tried
        assert kind == "raised" and name in ("UnpicklingError", "ValueError")
    finally:
        session.close()
    assert host.bridge_alive()
    a.put("text", "fine again")
    assert b.get("text") == "fine again"


def test_with_curve_keys_workers_use_the_encrypted_router(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "vela.bridge", "keygen"], capture_output=True, text=True,
                         timeout=30, check=True)
    keyfile = tmp_path / "curve"
    keyfile.write_text(out.stdout)
    c = Cluster(tmp_path, n=2, topology="partitioned", bridge_extra=["--curve-key-file", str(keyfile)],
                cache_opts={"topology_opts": {"curve_key_file": str(keyfile)}})
    try:
        c.wait_members()
        eventually(lambda: all((h.status() or {}).get("caches", {}).get(c.name, {}).get("ready") for h in c),
                   15, what="partition tables")
        a, b = c
        # no data port with CURVE: the view sends workers to the (encrypted) ROUTERs
        assert sorted(a.cluster()["addrs"].values()) == sorted([a.listen, b.listen])
        a.put_many([(f"k{i}", i) for i in range(200)])
        assert dict(b.call("get_many", keys=[f"k{i}" for i in range(200)])) == {f"k{i}": i for i in range(200)}
        assert b.incr("n", 3) == 3 and a.get("n") == 3
        # a worker without the keys gets no link to a bridge
        on_b = next(k for k in (f"k{i}" for i in range(200)) if a.call("owner", key=k)[0] == b.node_id)
        assert a.call("open_other", topology_opts={"timeout": 1.0}, key=on_b)[:2] == \
            ["raised", "BridgeUnavailable"]
    finally:
        c.close()


def test_garbage_on_the_data_port_closes_that_connection_only(secure_partitioned):
    import socket
    import struct

    a, b = secure_partitioned
    a.put("kept", "yes")
    before = counters(a)
    host, port = a.data_addr[len("vela://"):].rsplit(":", 1)
    rng = random.Random(5)
    well_framed = 0
    for i in range(300):
        s = socket.create_connection((host, int(port)), timeout=5)
        try:
            kind = i % 3
            if kind == 0:  # a declared size past the bound: the bridge hangs up
                s.sendall(struct.pack(">IB", 1 << 30, 32) + rng.randbytes(40))
                s.settimeout(5)
                received = b""
                while chunk := s.recv(100):
                    received += chunk
                assert len(received) == 5 + 16  # its challenge (a 16-byte nonce), nothing more
            elif kind == 1:  # well framed, unauthenticated junk: counted, no answer
                payload = rng.randbytes(rng.randint(0, 200))
                s.sendall(struct.pack(">IB16s", len(payload), 32, rng.randbytes(16)) + rng.randbytes(32)
                          + payload)
                well_framed += 1
            else:  # a frame cut short, then the connection goes away
                s.sendall(struct.pack(">IB", 100, 0) + rng.randbytes(rng.randint(0, 50)))
        finally:
            s.close()
    eventually(lambda: counters(a)["unauthenticated"] - before["unauthenticated"] >= well_framed, 10,
               what="every junk frame counted")
    assert counters(a)["malformed"] - before["malformed"] >= 100  # the oversized frames
    assert a.bridge_alive()
    assert b.get("kept") == "yes" and a.get("kept") == "yes"


def test_refuses_an_exposed_data_port_without_authentication(tmp_path):
    """The data port serves the cache's contents: off loopback it needs the secret too."""
    import subprocess
    import sys

    from cluster import free_port

    c = Cluster(tmp_path, n=1, start=False, topology="partitioned")
    try:
        host = c[0]
        port = free_port()
        out = subprocess.run([sys.executable, "-m", "vela.bridge", "run", "--cache", host.cache_name,
                              "--listen", f"tcp://127.0.0.1:{port}", "--data-listen", f"0.0.0.0:{port + 1}"],
                             env=host.env, capture_output=True, text=True, timeout=15, cwd=host.workdir)
        assert out.returncode != 0, out
        assert f"refusing to listen on 0.0.0.0:{port + 1} (--data-listen)" in out.stderr \
            and "--secret-file" in out.stderr, out.stderr
    finally:
        c.close()


def test_without_curve_the_router_takes_no_worker_request(secure_partitioned):
    """Without CURVE workers use the data port, whose requests are good once on one
    connection; a request on the ROUTER (where nothing would tie it to a connection,
    so a recorded one could be replayed) is counted and dropped, unanswered."""
    a, b = secure_partitioned
    a.put("k", "v")
    before = counters(a)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(a.listen)
    try:
        for op in ("get", "flush"):
            sock.send_multipart(protocol.pack(SECRET, dict(req(secure_partitioned.name, op, k=_native.encode_key("k")),
                                                         n=1)))
        assert not sock.poll(1000), "the ROUTER answered a worker's request without CURVE"
    finally:
        sock.close()
    assert counters(a)["malformed"] - before["malformed"] == 2
    assert a.get("k") == "v" and b.get("k") == "v"
