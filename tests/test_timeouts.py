"""Every worker call returns or raises within its timeout: with the bridge of a
member SIGSTOPped (connected, silent), and with a member that only ever answers
"retry". The raised type is asserted, and the call's measured duration against the
configured timeout (+ 0.5 s): that bound is the call's contract, not a benchmark.
"""
import itertools
import os
import socket
import threading
import time

import pytest

from cluster import Cluster, eventually, free_port

zmq = pytest.importorskip("zmq")

from vela.bridge import dataport, protocol  # noqa: E402

TIMEOUT = 1.0
SLACK = 0.5
FAKE = 3200
FAILURE_TIMEOUT = 3.0


def _timed(host, method, *args):
    """(outcome kind, exception name, seconds) of one call made by the host's worker."""
    start = time.monotonic()
    kind, name, _ = host.call("try", method=method, args=list(args))
    return kind, name, time.monotonic() - start - _agent_overhead(host)


_overheads = {}


def _agent_overhead(host):
    """What a round trip to the host's agent costs (subtracted: not the call's time)."""
    if host.label not in _overheads:
        samples = []
        for _ in range(5):
            start = time.monotonic()
            host.call("try", method="__repr__", args=[])
            samples.append(time.monotonic() - start)
        _overheads[host.label] = min(samples)
    return _overheads[host.label]


CALLS = [("get", "k"), ("exists", "k"), ("ttl", "k"), ("put", "k", 1), ("delete", "k"), ("incr", "k"),
         ("touch", "k"), ("get_many", ["k", "j"]), ("put_many", {"k": 1, "j": 2}), ("delete_many", ["k", "j"]),
         ("size",), ("flush",), ("invalidate_tag", "t"), ("stats",)]


def _on(host, other, name):
    """A key ``other`` owns by ``host``'s partition table."""
    return next(k for k in (f"{name}{i}" for i in range(500)) if host.call("owner", key=k)[0] == other.node_id)


@pytest.fixture
def partitioned(tmp_path):
    # A failure timeout longer than a call: the stopped bridge stays in the partition
    # table while each call goes to it (it is resumed between calls).
    c = Cluster(tmp_path, n=2, topology="partitioned", start=False,
                cache_opts={"topology_opts": {"timeout": TIMEOUT}})
    try:
        a, b = c
        a.start_bridge(join=[b], failure_timeout=FAILURE_TIMEOUT)
        b.start_bridge(join=[a], failure_timeout=FAILURE_TIMEOUT)
        c.wait_members()
        eventually(lambda: all((h.status() or {}).get("caches", {}).get(c.name, {}).get("ready") for h in c),
                   15, what="partition tables")
        yield c
    finally:
        c.close()


def test_calls_to_a_stopped_owner_raise_within_the_timeout(partitioned):
    a, b = partitioned
    k, j = _on(a, b, "k"), _on(a, b, "j")
    a.put(k, 0)
    assert b.get(k) == 0
    _agent_overhead(a)
    for call in CALLS:
        method, args = call[0], [k if x == "k" else j if x == "j" else x for x in call[1:]]
        args = [[k, j] if x == ["k", "j"] else {k: 1, j: 2} if x == {"k": 1, "j": 2} else x for x in args]
        b.pause()
        try:
            kind, name, took = _timed(a, method, *args)
        finally:
            b.resume()
        assert (kind, name) == ("raised", "BridgeUnavailable"), (method, kind, name)
        assert took <= TIMEOUT + SLACK, f"{method} took {took:.2f} s with a {TIMEOUT} s timeout"
        assert a.status()["members"][0]["state"] != "dead", "the test needs B in the table all along"
        eventually(lambda: a.call("try", method="exists", args=[k])[0] == "ok", 10, what="B answers again")


class RetryingMember:
    """A member of the cluster made in the test: it speaks to a bridge like a member
    (hellos with a data port), and its data port answers every request "retry", as a
    member without a partition table does."""

    def __init__(self, target):
        self.inc = protocol.new_incarnation()
        self.numbers = itertools.count(1)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.data = f"vela://127.0.0.1:{self.listener.getsockname()[1]}"
        self.addr = f"tcp://127.0.0.1:{free_port()}"  # bridge messages to it go nowhere
        self.dealer = zmq.Context.instance().socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(target.listen)
        self.stopped = threading.Event()
        self.answered = 0
        self.threads = [threading.Thread(target=self._speak, daemon=True),
                        threading.Thread(target=self._serve, daemon=True)]
        for t in self.threads:
            t.start()

    def _message(self, kind, context=b"", **fields):
        return protocol.pack(b"", dict(fields, t=kind, v=protocol.PROTOCOL, n=next(self.numbers),
                                       **{"from": FAKE, "inc": self.inc}), context)

    def _speak(self):
        while not self.stopped.is_set():
            self.dealer.send_multipart(self._message("hello", addr=self.addr, data=self.data, members=[],
                                                     seqs={}))
            self.stopped.wait(0.1)

    def _serve(self):
        self.listener.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn):
        nonce = os.urandom(dataport.NONCE)
        number = 1
        buf = b""
        try:
            conn.sendall(dataport.frame([b"", nonce]))
            while not self.stopped.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while len(buf) >= dataport.REQUEST.size:
                    length, maclen, _ = dataport.REQUEST.unpack_from(buf)
                    end = dataport.REQUEST.size + maclen + length
                    if len(buf) < end:
                        break
                    ctx = dataport.context(nonce, number)
                    msg = protocol.unpack(b"", [buf[dataport.REQUEST.size:dataport.REQUEST.size + maclen],
                                                buf[dataport.REQUEST.size + maclen:end]], ctx)
                    buf = buf[end:]
                    number += 1
                    self.answered += 1
                    conn.sendall(dataport.frame(self._message("rep", context=ctx, id=msg["id"],
                                                              retry="this member has no partition table yet")))
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stopped.set()
        for t in self.threads:
            t.join(5)
        self.dealer.close()
        self.listener.close()


def test_a_member_that_answers_retry_is_reported_unavailable_within_the_timeout(tmp_path):
    c = Cluster(tmp_path, n=1, topology="partitioned", cache_opts={"topology_opts": {"timeout": TIMEOUT}})
    try:
        a = c[0]
        eventually(lambda: (a.status() or {}).get("caches", {}).get(c.name, {}).get("ready"), 15,
                   what="a partition table")
        member = RetryingMember(a)
        try:
            eventually(lambda: str(FAKE) in (a.cluster() or {}).get("addrs", {}), 10,
                       what="the member in A's partition table")
            k, j = (next(k for k in (f"{p}{i}" for i in range(2000)) if a.call("owner", key=k)[0] == FAKE)
                    for p in ("k", "j"))
            calls = [("size",), ("flush",), ("invalidate_tag", "t"), ("stats",), ("get", k), ("put", k, 1),
                     ("get_many", [k, j]), ("put_many", {k: 1, j: 2}), ("delete_many", [k, j])]
            for method, *args in calls:
                kind, name, took = _timed(a, method, *args)
                assert (kind, name) == ("raised", "BridgeUnavailable"), (method, kind, name)
                assert took <= TIMEOUT + SLACK, f"{method} took {took:.2f} s with a {TIMEOUT} s timeout"
            assert member.answered >= len(calls) * 2, "each call asked the member again after its 'retry'"
        finally:
            member.close()
    finally:
        c.close()


def test_replicated_calls_to_a_stopped_bridge_raise_within_the_timeout(tmp_path):
    c = Cluster(tmp_path, n=2, start=False)
    try:
        a, b = c
        for host in c:  # the bridge_timeout of the replicated workers
            host.call("open", name=c.name, capacity=host.capacity, bridge_timeout=TIMEOUT)
        c.start()
        c.wait_members()
        b.pause()
        try:
            for method, *args in [("flush",), ("invalidate_tag", "t")]:
                kind, name, took = _timed(b, method, *args)
                assert (kind, name) == ("raised", "BridgeUnavailable"), (method, kind, name)
                assert took <= TIMEOUT + SLACK, f"{method} took {took:.2f} s with a {TIMEOUT} s timeout"
        finally:
            b.resume()
    finally:
        c.close()
