"""The bridge's native data port (native/dataserver.c). A worker's get of a key in a
partition its bridge may serve from the table is answered by a native thread, with
what the Python path answers; everything else (other requests, gets it does not read
whole, partitions being handed over, any request after the loop stalled) still goes
to the bridge's Python loop, which answers and counts exactly as before."""
import contextlib
import hashlib
import hmac
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster import DataPortSession, eventually, partitioned_with_secret

from vela import _native
from vela.bridge import dataport, protocol

SECRET = b"native-data-port-s3cret-0123456789abcdef"


@given(st.binary(max_size=150), st.binary(max_size=100), st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_the_native_mac_is_hmac_sha256(secret, a, b):
    assert _native.DataServer.hmac(secret, a, b) == hmac.new(secret, a + b, hashlib.sha256).digest()


@pytest.fixture
def pair(tmp_path):
    with partitioned_with_secret(tmp_path, SECRET) as c:
        yield c


def keys_of(host, node_id, n, prefix="k"):
    out, i = [], 0
    while len(out) < n:
        key = f"{prefix}{i}"
        if host.call("owner", key=key)[0] == node_id:
            out.append(key)
        i += 1
    return out


@contextlib.contextmanager
def session_to(host):
    """A connection to the host's data port made as a worker makes it."""
    session = DataPortSession(host.data_addr, SECRET)
    try:
        yield session
    finally:
        session.close()


def native_gets(host, name):
    return host.status()["caches"][name]["native_gets"]


def get(name, key, **extra):
    msg = dict(extra, t="req", v=protocol.PROTOCOL, id=7, e=0, c=name, op="get", k=_native.encode_key(key),
               inc=0)
    msg["from"] = 0
    return msg


SAME = ("val", "codec", "tags", "miss", "id", "t", "v", "from", "inc", "epoch")


def test_gets_of_every_size_are_answered_natively_as_the_python_path_answers(pair):
    a, b = pair
    sizes = [0, 1, 31, 32, 255, 256, 65535, 65536, 300_000]
    keys = keys_of(a, b.node_id, len(sizes) + 1)
    for i, (key, size) in enumerate(zip(keys, sizes)):
        a.put(key, chr(97 + i) * size, ttl=60 if i % 2 else None, tags=[f"t{j}" for j in range(i % 4)])
    with session_to(b) as session:
        before = native_gets(b, pair.name)
        native = [session.ask(get(pair.name, k, clk=1)) for k in keys]
        assert native_gets(b, pair.name) - before == len(keys)
        # "own" (the former holder said it holds nothing) is a field the native thread
        # does not read: the same get, answered by the Python loop
        python = [session.ask(get(pair.name, k, own=True)) for k in keys]
        assert native_gets(b, pair.name) - before == len(keys)
    for key, n, p in zip(keys, native, python):  # (the last one a miss)
        assert {f: n.get(f) for f in SAME} == {f: p.get(f) for f in SAME}, key
        assert n["ver"] > 0 and n["n"] > 0
        assert ("ttl" in n) == ("ttl" in p) and abs(n.get("ttl", 0) - p.get("ttl", 0)) < 5e9
    for i, (n, size) in enumerate(zip(native, sizes)):
        assert n["val"] == (chr(97 + i) * size).encode() and n["codec"] == _native.CODEC_STR
        assert n["tags"] == [_native.tag_hash(f"t{j}") for j in range(i % 4)]
        assert 55e9 < n["ttl"] <= 60e9 if i % 2 else n["ttl"] == 0
    assert native[-1]["miss"] is True and "val" not in native[-1]


def test_a_worker_reads_other_hosts_keys_through_the_native_thread(pair):
    a, b = pair
    keys = keys_of(a, b.node_id, 20)
    a.put_many([(k, {"n": i}) for i, k in enumerate(keys)])
    before = native_gets(b, pair.name)
    assert [a.get(k) for k in keys] == [{"n": i} for i in range(20)]
    assert native_gets(b, pair.name) - before == 20
    a.delete(keys[0])
    assert a.get(keys[0]) is None  # (a delete goes to the Python loop; the next get sees it)


def test_requests_the_native_thread_does_not_read_whole_go_to_the_python_loop(pair):
    a, b = pair
    key = keys_of(a, b.node_id, 1)[0]
    a.put(key, "v")
    with session_to(b) as session:
        before, counted = native_gets(b, pair.name), b.status()["counters"]["malformed"]
        # not well formed: counted, never answered (the Python loop's rule)
        for bad in (dict(get(pair.name, key), id=True), dict(get(pair.name, key), k="text"),
                    dict(get(pair.name, key), clk=0), dict(get(pair.name, key), v=2)):
            session.send(bad)
        eventually(lambda: b.status()["counters"]["malformed"] - counted == 4, 5, what="4 malformed counted")
        # well formed, but not a get the native thread answers
        reply = session.ask(get("no-such-cache", key))
        assert reply["err"] == "BridgeUnavailable" and "does not carry" in reply["msg"]
        assert session.ask(dict(get(pair.name, key), op="has"))["ok"] is True
        assert native_gets(b, pair.name) == before
        # and the connection goes on: the next get is answered natively
        assert session.ask(get(pair.name, key))["codec"] == _native.CODEC_STR
        assert native_gets(b, pair.name) == before + 1


def test_a_get_that_waited_through_a_stall_is_not_answered_from_the_old_table(pair):
    # A bridge stopped long enough to be declared dead may have lost its partitions to
    # the others: a request that waited in its socket meanwhile is for the Python loop,
    # which starts over first (a fresh incarnation) and then decides.
    a, b = pair
    key = keys_of(a, b.node_id, 1)[0]
    a.put(key, "old")
    with session_to(b) as session:
        assert session.ask(get(pair.name, key))["val"]
        before, inc = native_gets(b, pair.name), b.status()["incarnation"]
        b.pause()
        try:
            _, ctx = session.send(get(pair.name, key))
            time.sleep(1.5)  # past the stall limit (the failure timeout is 1 s)
        finally:
            b.resume()
        reply = protocol.unpack(SECRET, session.client.recv(5), ctx)
        # The loop started over before it answered: "retry" (no table yet), a fallback,
        # or the value from the table it has taken again, by the timing; the native
        # thread answered nothing.
        assert "retry" in reply or "fb" in reply or reply.get("val") == b"old", reply
        status = b.status()
        assert status["incarnation"] > inc and status["caches"][pair.name]["native_gets"] == before
    eventually(lambda: a.get(key) == "old", 15, what="the key read again once the tables settle")


def test_requests_waiting_for_the_python_loop_hold_the_thread_back_not_the_memory():
    # 128 requests of 1 MiB that only the Python loop can answer, while the loop takes
    # nothing: the thread stops reading past 64 MiB queued (the rest waits in the
    # sockets, whose buffers are kept small here), and reads on as soon as the loop
    # takes what waits.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)  # (inherited by the accepted one)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    server = _native.DataServer(listener.fileno(), b"", 16, 2 << 20, protocol.PROTOCOL)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 << 10)
    client.connect(listener.getsockname())
    try:
        nonce = client.recv(dataport.HEADER.size + dataport.NONCE)[dataport.HEADER.size:]
        assert len(nonce) == dataport.NONCE
        payload = b"x" * (1 << 20)
        data = b"".join(dataport.request_bytes(b"", dataport.context(nonce, n), [b"", payload])
                        for n in range(1, 129))
        client.setblocking(False)
        sent, until = 0, time.monotonic() + 3
        while sent < len(data) and time.monotonic() < until:
            try:
                sent += client.send(data[sent:sent + (1 << 20)])
            except BlockingIOError:
                time.sleep(0.01)
        assert 64 << 20 < sent < 68 << 20, sent  # held back: 64 MiB queued, and what the socket buffers hold
        taken = []
        until = time.monotonic() + 20
        while len(taken) < 128 and time.monotonic() < until:
            if sent < len(data):
                try:
                    sent += client.send(data[sent:sent + (1 << 20)])
                except BlockingIOError:
                    pass
            taken += [item for item in server.take() if item[1] is not None]
            time.sleep(0.005)
        assert len(taken) == 128 and all(item[3] == payload for item in taken)
        assert [item[1] for item in taken] == [dataport.context(nonce, n) for n in range(1, 129)]
    finally:
        client.close()
        server.close()
        listener.close()


def test_a_bridge_may_serve_any_number_of_caches(tmp_path):
    import vela

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    server = _native.DataServer(listener.fileno(), b"", 16, 1 << 20, protocol.PROTOCOL)
    cache = vela.Cache(f"ds-caches-{tmp_path.name}", capacity="4MiB")
    try:
        for i in range(200):
            server.set_cache(f"cache-{i}", cache._table, 271, bytes([i % 2]) * 271)
        server.set_cache("cache-7", cache._table, 271, None)  # (again: changed, not added)
        assert [server.served(f"cache-{i}") for i in (0, 7, 199)] == [0, 0, 0]
        with pytest.raises(ValueError, match="one flag per partition"):
            server.set_cache("cache-0", cache._table, 271, b"\x01")
    finally:
        server.close()
        cache.destroy()
        listener.close()
