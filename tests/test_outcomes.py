"""The outcomes of changes made at most once (vela.bridge.outcomes), and their fields in
the bridges' messages. The cluster behaviour (an incr asked again after its owner
died, counted once) is in tests/test_partitioned_faults.py."""
import time

import pytest

from vela.bridge import outcomes, protocol
from vela.bridge.outcomes import Outcomes

RID = b"r" * 12
INCR = dict(op="incr", c="c", id=1, e=1, k=b"k", delta=1, ttl=0)
BREC = dict(c="c", seq=1, recs=[])
HAND = dict(c="c", sid=1, role="own", last=True, ps=[3], chunk=0, entries=[], vers=[])


def test_an_outcome_is_known_by_its_request_id_and_partition():
    o = Outcomes()
    o.remember(RID, 3, 41)
    o.remember(b"s" * 12, 4, True)
    assert o.result(RID, 3) == 41
    assert o.result(b"s" * 12, 4) is True
    assert o.result(RID, 4) is None  # (a request id is about one key: one partition)
    assert o.result(b"t" * 12, 3) is None
    assert o.of({3}) == [[RID, 3, 41]]


def test_an_outcome_of_zero_is_known():
    o = Outcomes()
    o.remember(RID, 0, 0)
    assert o.result(RID, 0) == 0


def test_outcomes_expire_and_the_oldest_go_past_the_limit():
    o = Outcomes(ttl=0.05, limit=3)
    for i in range(5):
        o.remember(bytes([i]) * 8, 0, i)
    assert len(o) == 3 and [o.result(bytes([i]) * 8, 0) for i in range(5)] == [None, None, 2, 3, 4]
    time.sleep(0.06)
    assert o.result(bytes([4]) * 8, 0) is None and o.of({0}) == []
    o.remember(RID, 0, 9)  # (the expired ones make way)
    assert len(o) == 1


def test_only_the_partitions_a_stream_carries_are_taken_from_it():
    o = Outcomes()
    o.take([[RID, 3, 7], [b"s" * 12, 5, 8]], {3})
    assert o.result(RID, 3) == 7 and o.result(b"s" * 12, 5) is None


def test_a_request_first_sent_before_the_process_started_has_an_unknown_outcome():
    o = Outcomes()
    assert o.unknown(1.0)  # first sent a second ago: before this process remembered anything
    o.since -= 10
    assert not o.unknown(1.0)
    assert o.unknown(10.0)
    assert not o.unknown(10.0 - outcomes.AGAIN_MARGIN - 0.1)


def test_request_ids_and_outcomes_are_checked_in_every_message():
    check_req, check_brec, check_hand = (protocol._CHECKS[t] for t in ("req", "brec", "hand"))
    check_req(dict(INCR, rid=RID, again=1500))
    check_req(dict(INCR, op="add", k=b"k", val=b"v", codec=0, tags=[], rid=RID))
    check_brec(dict(BREC, recs=[[b"k", b"1", 0, 0, [], 5, RID, 1], [b"k", None, 0, 0, [], 6]]))
    check_hand(dict(HAND, done=[[RID, 3, 7], [RID, 3, True]]))
    bad = [
        (check_req, dict(INCR, rid=b"short")), (check_req, dict(INCR, rid="text" * 3)),
        (check_req, dict(INCR, rid=RID, again=0)), (check_req, dict(INCR, rid=RID, again=True)),
        (check_brec, dict(BREC, recs=[[b"k", b"1", 0, 0, [], 5, RID]])),
        (check_brec, dict(BREC, recs=[[b"k", b"1", 0, 0, [], 5, RID, False]])),
        (check_brec, dict(BREC, recs=[[b"k", b"1", 0, 0, [], 5, RID, 2**63]])),
        (check_brec, dict(BREC, recs=[[b"k", b"1", 0, 0, [], 5, b"x", 1]])),
        (check_hand, dict(HAND, done=[[RID, 3]])), (check_hand, dict(HAND, done=[[RID, -1, 1]])),
        (check_hand, dict(HAND, done=[[RID, 3, "1"]])), (check_hand, dict(HAND, done={"a": 1})),
    ]
    for check, msg in bad:
        with pytest.raises(protocol.Malformed):
            check(msg)
