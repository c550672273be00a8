"""vela.stores.near.Numbering: when a receiver of numbered invalidations must drop copies."""
from vela.stores.near import Numbering, split_number


def test_in_order_messages_lose_nothing_after_the_first_contact():
    n = Numbering()
    assert n.received("a", 7, 1) is True      # a first contact: what came before is unknown
    assert [n.received("a", 7, i) for i in (2, 3, 4)] == [False, False, False]
    assert n.announced("a", 7, 4) is False    # the heartbeat names the last one received
    assert n.gaps == 0


def test_a_skipped_number_is_a_loss():
    n = Numbering()
    n.start("a", 7, 3)
    assert n.received("a", 7, 5) is True      # 4 never came
    assert n.received("a", 7, 6) is False
    assert n.gaps == 1


def test_a_lost_last_message_shows_in_the_heartbeat():
    n = Numbering()
    n.start("a", 7, 3)
    assert n.announced("a", 7, 4) is True
    assert n.announced("a", 7, 4) is False    # once
    assert n.received("a", 7, 5) is False
    assert n.gaps == 1


def test_a_new_incarnation_drops_and_restarts_the_count():
    n = Numbering()
    n.start("a", 7, 40)
    assert n.received("a", 8, 1) is True      # the origin restarted: its copies go
    assert n.received("a", 8, 2) is False
    assert n.announced("b", 1, 0) is True     # first word from another origin
    assert n.gaps == 0                        # neither is a gap in a known numbering


def test_numbers_above_the_origins_count_are_not_trusted():
    n = Numbering()
    n.start("a", 7, 3)
    assert n.received("a", 7, 4) is False
    assert n.counted("a", 7, 4) is False      # the count as it is: nothing in flight
    assert n.counted("a", 7, 6) is False      # 5 and 6 may be on their way: not a loss (yet)
    assert n.received("a", 7, 10**9) is True  # a forged or foreign number
    assert n.counted("a", 7, 7) is True       # the origin's own count wins
    assert n.received("a", 7, 8) is False
    assert n.gaps == 2


def test_a_count_taken_before_messages_still_in_flight_is_no_loss():
    """Redis: the listener reads the count, messages published after it arrive, then
    the pong of the ping sent after the read."""
    n = Numbering()
    n.start(None, None, 373)
    assert n.counted(None, None, 374) is False
    assert [n.received(None, None, i) for i in (374, 375, 376)] == [False] * 3
    assert n.announced(None, None, 374) is False
    assert n.gaps == 0


def test_numbered_messages_split_and_others_pass_through():
    assert split_number(b"#12:m\x00\x00\x00\x01k") == (12, b"m\x00\x00\x00\x01k")
    assert split_number(b"#12:*") == (12, b"*")
    assert split_number(b"*") == (None, b"*")
    assert split_number(b"#x:*") == (None, b"#x:*")      # malformed: applied as it is (drops all)
    assert split_number(b"#" + b"9" * 30 + b":*")[0] is None


# ---- on the wire (vela.bridge.protocol): what a bridge refuses ----------------------

def _peer(**fields):
    from vela.bridge import protocol

    return protocol.pack(b"s" * 32, dict(fields, v=protocol.PROTOCOL, inc=9, n=1, **{"from": 3}))


def _refused(frames):
    import pytest

    from vela.bridge import protocol

    with pytest.raises(protocol.Malformed):
        protocol.unpack(b"s" * 32, frames)


def test_invalidations_without_a_number_or_with_a_bad_one_are_refused():
    from vela.bridge import protocol

    key = __import__("vela")._native.encode_key("k")
    assert protocol.unpack(b"s" * 32, _peer(t="inval", c="c", seq=1, ks=[key, b""]))["seq"] == 1
    for seq in (None, 0, -1, "1", True, 2**63 + 1):
        fields = dict(t="inval", c="c", ks=[key])
        if seq is not None:
            fields["seq"] = seq
        _refused(_peer(**fields))


def test_heartbeat_numbers_and_near_requests_are_checked():
    from vela.bridge import protocol

    hello = dict(t="hello", addr="tcp://127.0.0.1:1", members=[], seqs={})
    assert protocol.unpack(b"s" * 32, _peer(**hello, iseqs={"c": 4}))["iseqs"] == {"c": 4}
    for bad in ({"c": -1}, {"c": "4"}, ["c"], {1: 4}):
        _refused(_peer(**hello, iseqs=bad))
    req = dict(t="req", c="c", id=1, e=0, op="near")
    assert protocol.unpack(b"s" * 32, _peer(**req))["op"] == "near"          # flush: every copy
    assert protocol.unpack(b"s" * 32, _peer(**req, tag=256))["tag"] == 256   # one tag's copies
    for bad in (-1, "t", [1]):
        _refused(_peer(**req, tag=bad))
