"""vela.near.Numbering: when a receiver of numbered invalidations must drop copies."""
from vela.near import Numbering, split_number


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


def test_numbers_above_what_the_origin_says_it_sent_are_not_trusted():
    n = Numbering()
    n.start("a", 7, 3)
    assert n.received("a", 7, 10**9) is True  # a forged or foreign number
    assert n.announced("a", 7, 4) is True     # the origin's own count wins
    assert n.received("a", 7, 5) is False
    assert n.gaps == 2


def test_numbered_messages_split_and_others_pass_through():
    assert split_number(b"#12:m\x00\x00\x00\x01k") == (12, b"m\x00\x00\x00\x01k")
    assert split_number(b"#12:*") == (12, b"*")
    assert split_number(b"*") == (None, b"*")
    assert split_number(b"#x:*") == (None, b"#x:*")      # malformed: applied as it is (drops all)
    assert split_number(b"#" + b"9" * 30 + b":*")[0] is None
