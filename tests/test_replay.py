"""Captured traffic replayed against real bridges: nothing of it is applied.

The attacker here has recorded messages that a holder of the cluster's secret
sent (a worker's requests on a data port, a bridge's batch and bye) and sends
the same bytes again later: on another connection, on the same connection, after
the tombstones that stopped them have expired, after the sender restarted. Every
replay must be counted and dropped. Multi-host with real bridges (tests/cluster.py).
"""
import itertools
import json
import time

import pytest

from cluster import Cluster, DataPortSession, eventually, free_port, partitioned_with_secret

zmq = pytest.importorskip("zmq")

from vela import _native  # noqa: E402
from vela.bridge import protocol  # noqa: E402

SECRET = b"replay-tests-s3cret-0123456789abcdef"
FAKE = 3100  # node id of the recorded peer: no real host of these tests uses it


def counters(host):
    return host.status()["counters"]


# --------------------------------------------------------------------------------------
# a worker's requests on the data port


@pytest.fixture
def partitioned(tmp_path):
    with partitioned_with_secret(tmp_path, SECRET) as c:
        yield c


def _request(name, op, e=0, **fields):
    """A worker request; ``e``: the partition table's epoch it claims (a write routed by
    an older table than the owner's is answered "retry")."""
    return dict(fields, t="req", v=protocol.PROTOCOL, id=1, e=e, c=name, op=op, inc=0, **{"from": 0})


def _json(value):
    return json.dumps(value).encode(), _native.CODEC_JSON


def _replays_refused(host, captured):
    """Send ``captured`` (the bytes of one request) on a new connection: the bridge
    hangs up at its header and counts it."""
    before = counters(host)["unauthenticated"]
    other = DataPortSession(host.data_addr, SECRET)
    try:
        other.send_raw(captured)
        assert other.closed_by_bridge(), "a request replayed on another connection was not refused"
    finally:
        other.close()
    eventually(lambda: counters(host)["unauthenticated"] > before, 5, what="the replay counted")


def _replayed_on_its_own_connection(host, session, captured):
    before = counters(host)["unauthenticated"]
    session.send_raw(captured)
    assert session.closed_by_bridge(), "a request replayed on its own connection was not refused"
    eventually(lambda: counters(host)["unauthenticated"] > before, 5, what="the replay counted")


def test_five_replayed_data_port_requests_are_refused(partitioned):
    a, b = partitioned
    name = partitioned.name
    survivor = next(k for k in (f"s{i}" for i in range(200)) if a.call("owner", key=k)[0] == b.node_id)
    key = next(k for k in (f"k{i}" for i in range(200)) if a.call("owner", key=k)[0] == b.node_id)
    gone = next(k for k in (f"d{i}" for i in range(200)) if a.call("owner", key=k)[0] == b.node_id)
    counter = next(k for k in (f"n{i}" for i in range(200)) if a.call("owner", key=k)[0] == b.node_id)
    tagged = [k for k in (f"t{i}" for i in range(400)) if a.call("owner", key=k)[0] == b.node_id][:5]

    epoch = b.status()["ring_epoch"]
    sessions = {}
    for what in ("flush", "put", "del", "incr", "tag"):
        sessions[what] = DataPortSession(b.data_addr, SECRET)
    try:
        # Each request is made once, for real (the attacker records it), then the state moves on.
        a.put(survivor, "x")
        sessions["flush"].ask(_request(name, "flush", e=epoch))
        assert a.get(survivor) is None
        a.put(survivor, "after flush")

        val, codec = _json("old")
        assert sessions["put"].ask(_request(name, "put", e=epoch, k=_native.encode_key(key), val=val, codec=codec,
                                            ttl=0, tags=[]))["ok"] is True
        assert a.get(key) == "old"
        a.put(key, "new")

        a.put(gone, "first")
        assert sessions["del"].ask(_request(name, "del", e=epoch, k=_native.encode_key(gone)))["ok"] is True
        a.put(gone, "written again")

        assert sessions["incr"].ask(_request(name, "incr", e=epoch, k=_native.encode_key(counter), delta=1,
                                             ttl=0))["ok"] == 1

        a.put_many([(k, "before") for k in tagged], tags=["grp"])
        assert sessions["tag"].ask(_request(name, "tag", e=epoch, tag=_native.tag_hash("grp")))["ok"] == len(tagged)
        a.put_many([(k, "after") for k in tagged], tags=["grp"])

        for what, session in sessions.items():
            data = session.raw[-1]
            for _ in range(5 if what == "incr" else 1):
                _replays_refused(b, data)
            _replayed_on_its_own_connection(b, session, data)
    finally:
        for session in sessions.values():
            session.close()

    assert b.bridge_alive() and a.bridge_alive()
    assert a.get(key) == "new", "a replayed put wrote an old value over a new one"
    assert a.get(gone) == "written again", "a replayed delete was applied"
    assert a.get(counter) == 1, "a replayed incr was applied"
    assert [a.get(k) for k in tagged] == ["after"] * 5, "a replayed tag invalidation or flush was applied"
    assert a.get(survivor) == "after flush", "a replayed flush was applied"
    # the same requests made afresh (new connection, new numbers) are served: the refusals
    # above were the replays', not a broken session
    fresh = DataPortSession(b.data_addr, SECRET)
    try:
        assert fresh.ask(_request(name, "incr", e=epoch, k=_native.encode_key(counter), delta=1, ttl=0))["ok"] == 2
    finally:
        fresh.close()


def test_unauthenticated_connections_declaring_huge_frames_do_not_grow_the_bridge(partitioned):
    psutil = pytest.importorskip("psutil")
    import socket
    import struct

    a, _ = partitioned
    proc = psutil.Process(a.bridge.pid)
    before = proc.memory_info().rss
    host, port = a.data_addr[len("vela://"):].rsplit(":", 1)
    body = b"\0" * (1 << 20)
    pushed = []
    for _ in range(6):
        s = socket.create_connection((host, int(port)), timeout=5)
        try:
            s.settimeout(5)
            sent = 0
            try:
                s.sendall(struct.pack(">IB16s", 64 << 20, 32, b"\1" * 16) + b"\2" * 32)
                while sent < 64 << 20:
                    s.sendall(body)
                    sent += len(body)
            except OSError:  # the bridge hung up: what it had was the header
                pass
            pushed.append(sent)
        finally:
            s.close()
    assert a.bridge_alive()
    grown = proc.memory_info().rss - before
    assert grown < 32 << 20, f"6 connections declaring 64 MiB frames grew the bridge by {grown >> 20} MiB"
    assert all(p < 64 << 20 for p in pushed), f"the bridge read whole declared frames: {pushed}"


# --------------------------------------------------------------------------------------
# a bridge's messages


class RecordedPeer:
    """A peer of the cluster made in the test: it holds the secret, so its messages
    stand for what a real bridge sent (and an attacker recorded)."""

    def __init__(self, target, inc):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 5000)
        self.sock.connect(target.listen)
        self.addr = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there: our replies go nowhere
        self.inc = inc
        self.numbers = itertools.count(1)

    def message(self, kind, **fields):
        return protocol.pack(SECRET, dict(fields, t=kind, v=protocol.PROTOCOL, n=next(self.numbers),
                                          **{"from": FAKE, "inc": self.inc}))

    def hello(self, name):
        return self.message("hello", addr=self.addr, members=[], seqs={name: -1})

    def send(self, frames):
        self.sock.send_multipart(frames)

    def close(self):
        self.sock.close()


def _version_now(node):
    ms = int(time.time() * 1000) - 1577836800000
    return ms << 20 | node


def test_a_replayed_batch_after_the_tombstone_ttl_does_not_bring_back_an_invalidated_key(tmp_path):
    c = Cluster(tmp_path, n=2, secret=SECRET, bridge_extra=["--tombstone-ttl", "0.5"])
    try:
        c.wait_members()
        a, b = c
        peer = RecordedPeer(a, inc=protocol.new_incarnation())
        try:
            peer.send(peer.hello(c.name))
            record = [protocol.PUT, _native.encode_key("victim"), json.dumps("resurrected?").encode(),
                      _native.CODEC_JSON, 0, [_native.tag_hash("doomed")], _version_now(FAKE)]
            batch = peer.message("batch", c=c.name, seq=0, recs=[record])
            peer.send(batch)
            eventually(lambda: a.get("victim") == "resurrected?", 5, what="the peer's batch applied once")
            # (the recorded peer never confirms it: the call says so, and B's part is made;
            # it speaks again first, so that A counts it in, however long the above took)
            peer.send(peer.hello(c.name))
            eventually(lambda: a.member_states().get(FAKE) == "alive", 5, what="the recorded peer alive again")
            assert a.call("try", method="invalidate_tag", args=["doomed"])[:2] == ["raised", "BridgeUnavailable"]
            eventually(lambda: a.get("victim") is None and b.get("victim") is None, 5, what="invalidated")
            time.sleep(0.5 + 3 * 0.2 + 0.3)  # the tag mark's ttl, and heartbeats that prune it
            before = counters(a)
            peer.send(batch)  # the recorded batch, again
            eventually(lambda: counters(a)["replayed"] > before["replayed"], 5, what="the replay counted")
            time.sleep(0.3)
            assert a.get("victim") is None and b.get("victim") is None, "the replayed batch brought it back"
            # The same record in a new message is refused too, though the mark expired: the
            # invalidation left a tombstone with the entry's version. A newer put goes in.
            peer.send(peer.message("batch", c=c.name, seq=1, recs=[record]))
            newer = record[:6] + [_version_now(FAKE)]
            peer.send(peer.message("batch", c=c.name, seq=2, recs=[newer[:2] + [json.dumps("newer").encode()]
                                                                  + newer[3:]]))
            eventually(lambda: a.get("victim") == "newer", 5, what="a newer put applied")
        finally:
            peer.close()
    finally:
        c.close()


def test_a_replayed_bye_of_an_old_incarnation_does_not_mark_a_live_member_dead(tmp_path):
    c = Cluster(tmp_path, n=1, secret=SECRET)
    try:
        a = c[0]
        old = RecordedPeer(a, inc=protocol.new_incarnation())
        new = RecordedPeer(a, inc=protocol.new_incarnation(old.inc))
        try:
            old.send(old.hello(c.name))
            eventually(lambda: a.member_states().get(FAKE) == "alive", 5, what="the peer is a member")
            bye = old.message("bye")
            old.send(bye)  # the old incarnation leaves (recorded)
            eventually(lambda: a.member_states().get(FAKE) == "dead", 5, what="the bye taken")
            new.send(new.hello(c.name))  # it comes back as a new incarnation
            eventually(lambda: a.member_states().get(FAKE) == "alive", 5, what="the restart seen")
            before = counters(a)
            assert before["restarts_seen"] >= 1
            for _ in range(10):  # alive all along: it speaks every 0.2 s while the bye is replayed
                new.send(new.hello(c.name))
                old.send(bye)
                time.sleep(0.2)
                assert a.member_states().get(FAKE) == "alive", "a replayed bye marked a live member dead"
            assert counters(a)["stale_incarnation"] - before["stale_incarnation"] == 10
        finally:
            old.close()
            new.close()
    finally:
        c.close()


def test_a_replayed_message_of_the_current_incarnation_is_refused(tmp_path):
    c = Cluster(tmp_path, n=1, secret=SECRET)
    try:
        a = c[0]
        peer = RecordedPeer(a, inc=protocol.new_incarnation())
        try:
            hello = peer.hello(c.name)
            peer.send(hello)
            eventually(lambda: a.member_states().get(FAKE) == "alive", 5, what="the peer is a member")
            bye = peer.message("bye")
            before = counters(a)
            for _ in range(3):
                peer.send(hello)  # replayed: it must not count as a sign of life either
            eventually(lambda: counters(a)["replayed"] - before["replayed"] == 3, 5, what="3 replays counted")
            peer.send(bye)
            eventually(lambda: a.member_states().get(FAKE) == "dead", 5, what="the real bye taken")
            peer.send(hello)  # a replayed hello does not bring it back
            time.sleep(0.5)
            assert a.member_states().get(FAKE) == "dead"
            assert counters(a)["replayed"] - before["replayed"] == 4
        finally:
            peer.close()
    finally:
        c.close()


def test_the_replay_window_takes_each_number_once():
    w = protocol.ReplayWindow()
    assert w.accept(500)
    assert not w.accept(499) and not w.accept(1), "before first contact counts as seen"
    assert not w.accept(500)
    assert w.accept(503) and w.accept(501) and w.accept(502), "late but unseen (gaps, reordering)"
    assert not any(w.accept(n) for n in (501, 502, 503))
    assert w.accept(503 + protocol.ReplayWindow.SIZE + 5)
    assert not w.accept(504), "older than the window"
    assert w.accept(503 + protocol.ReplayWindow.SIZE)
