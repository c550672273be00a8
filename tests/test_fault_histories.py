"""Fault histories: the checker on hand-written histories, then real runs under faults.

The checker tests are small histories written out by hand, one per anomaly, and a
clean one: fast and deterministic. The runs are the Jepsen-style part: 3 simulated
hosts (network namespaces, their own bridge and writers), one fault scenario each,
the history checked after the heal; every column of the table must be 0.
``tools/faults.py`` runs every scenario on every topology and prints the table.

``CI_SCENARIOS`` is the list CI runs: the cells of the README's "Fault histories"
table that are clean on this code (the rest of the table is run by tools/faults.py).
"""
import math

import pytest

from faults import checker, nemesis, net, runner
from faults.history import op

# ---- the checker on hand-written histories -----------------------------------------------


def check(ops, reads, **kw):
    return checker.check(ops, reads, timeout=3.0, grace=1.0, **kw)


def both(reads):
    return {"A": dict(reads), "B": dict(reads)}


def test_a_clean_history_passes():
    ops = [op("put", "k1", "A:1", 0, 1, tags=["t1"], host="A"),
           op("put", "k1", "B:1", 2, 3, host="B"),
           op("get", "k1", "B:1", 4, 5, host="A"),
           op("put", "k2", "A:2", 0, 1),
           op("delete", "k2", None, 2, 3),
           op("get", "k2", None, 4, 5),
           op("put", "k3", "A:3", 0, 1, tags=["t1"]),
           op("invalidate_tag", t0=2, t1=3, tag="t1"),
           op("incr", "c1", 1, 0, 1), op("incr", "c1", 2, 2, 3)]
    result = check(ops, both({"k1": "B:1", "k2": None, "k3": None, "c1": 2}))
    assert result.clean(), result.as_dict()
    assert result.converged


def test_an_acknowledged_write_read_back_as_the_older_value_is_lost():
    ops = [op("put", "k1", "A:1", 0, 1), op("put", "k1", "B:1", 2, 3, host="B")]
    result = check(ops, both({"k1": "A:1"}))
    assert (result["lost"], result["resurrected"], result["invalidations"]) == (1, 0, 0)


def test_an_acknowledged_write_that_vanished_is_lost():
    ops = [op("put", "k1", "A:1", 0, 1)]
    result = check(ops, both({"k1": None}))
    assert result["lost"] == 1
    assert result.examples["lost"][0]["last_acknowledged"] == "A:1"


def test_concurrent_writes_may_end_either_way():
    ops = [op("put", "k1", "A:1", 0, 2), op("put", "k1", "B:1", 1, 3, host="B")]
    assert check(ops, both({"k1": "A:1"})).clean()
    assert check(ops, both({"k1": "B:1"})).clean()


def test_a_write_of_unknown_outcome_may_or_may_not_have_happened():
    ops = [op("put", "k1", "A:1", 0, 1), op("put", "k1", "A:2", 2, math.inf, type="info")]
    assert check(ops, both({"k1": "A:1"})).clean()
    assert check(ops, both({"k1": "A:2"})).clean()
    failed = [op("put", "k1", "A:1", 0, 1), op("delete", "k1", None, 2, 3, type="fail", err="BridgeUnavailable")]
    assert check(failed, both({"k1": None})).clean()
    assert check(failed, both({"k1": "A:1"})).clean()


def test_a_value_read_back_after_its_acknowledged_delete_is_resurrected():
    ops = [op("put", "k1", "A:1", 0, 1), op("delete", "k1", None, 2, 3, host="B")]
    result = check(ops, both({"k1": "A:1"}))
    assert (result["lost"], result["resurrected"], result["invalidations"]) == (0, 1, 0)


def test_a_later_write_explains_a_value_after_a_delete():
    ops = [op("put", "k1", "A:1", 0, 1), op("delete", "k1", None, 2, 3), op("put", "k1", "A:2", 4, 5)]
    assert check(ops, both({"k1": "A:2"})).clean()


def test_an_entry_alive_after_its_tag_was_invalidated_is_reported():
    ops = [op("put", "k1", "A:1", 0, 1, tags=["t1"]), op("put", "k2", "A:2", 0, 1, tags=["t2"]),
           op("invalidate_tag", t0=2, t1=3, tag="t1", host="B")]
    result = check(ops, both({"k1": "A:1", "k2": "A:2"}))
    assert (result["lost"], result["resurrected"], result["invalidations"]) == (0, 0, 1)
    flushed = [op("put", "k1", "A:1", 0, 1), op("flush", t0=2, t1=3)]
    assert check(flushed, both({"k1": "A:1"}))["invalidations"] == 1


def test_a_read_after_a_completed_invalidation_that_returns_the_old_value_is_stale():
    ops = [op("put", "k1", "A:1", 0, 1, tags=["t1"]),
           op("invalidate_tag", t0=2, t1=3, tag="t1", host="A"),
           op("get", "k1", "A:1", 2.5, 2.6, host="B"),  # concurrent with the invalidation: allowed
           op("get", "k1", "A:1", 4, 4.1, host="B"),  # after it: stale
           op("get", "k1", "A:1", 5, 5.1, host="C")]  # after it, on a host under a fault
    ops.append({"f": "fault", "type": "fault", "fault": "isolate", "hosts": ["C"], "t0": 4.5, "t1": 6})
    result = check(ops, both({"k1": None}))
    assert result["stale_reads"] == 1
    assert result.examples["stale_reads"][0]["host"] == "B"


def test_a_delete_is_seen_cluster_wide_only_where_the_topology_promises_it():
    ops = [op("put", "k1", "A:1", 0, 1), op("delete", "k1", None, 2, 3, host="A"),
           op("get", "k1", "A:1", 4, 5, host="B")]
    assert check(ops, both({"k1": None}), delete_scope="host")["stale_reads"] == 0
    assert check(ops, both({"k1": None}), delete_scope="cluster")["stale_reads"] == 1
    own = ops + [op("get", "k1", "A:1", 4, 5, host="A")]
    assert check(own, both({"k1": None}), delete_scope="host")["stale_reads"] == 1


def test_hosts_that_read_differently_have_not_converged():
    ops = [op("put", "k1", "A:1", 0, 1)]
    result = check(ops, {"A": {"k1": "A:1"}, "B": {"k1": None}})
    assert result["diverging"] == 1 and not result.converged
    assert result["lost"] == 1  # B lost it
    assert check(ops, {"A": {"k1": "A:1"}, "B": None})["diverging"] == 1


def test_calls_longer_than_the_timeout_are_counted():
    ops = [op("get", "k1", None, 0, 3.4), op("get", "k1", None, 0, 3.6), op("get", "k1", None, 0, math.inf,
                                                                              type="info")]
    assert check(ops, both({"k1": None}))["over_timeout"] == 1


def test_counters_lose_nothing_acknowledged_and_count_nothing_twice():
    ops = [op("incr", "c1", 1, 0, 1), op("incr", "c1", 2, 2, 3), op("incr", "c1", None, 4, math.inf, type="info")]
    assert check(ops, both({"c1": 2})).clean()
    assert check(ops, both({"c1": 3})).clean()
    assert check(ops, both({"c1": 1}))["lost"] == 1
    assert check(ops, both({"c1": 4}))["over_counted"] == 1
    flushed = ops + [op("flush", t0=3.5, t1=3.8), op("incr", "c1", 1, 5, 6)]
    assert check(flushed, both({"c1": 1})).clean()
    assert check(flushed, both({"c1": None}))["lost"] == 1


def test_a_write_overridden_within_the_same_millisecond_is_a_tie_not_a_loss():
    ops = [op("delete", "k1", None, 0, 1.0, host="C"), op("put", "k1", "B:1", 1.0004, 1.0005, host="B")]
    result = check(ops, both({"k1": None}))
    assert (result["lost"], result["ties"]) == (0, 1)
    later = [op("delete", "k1", None, 0, 1.0, host="C"), op("put", "k1", "B:1", 1.01, 1.02, host="B")]
    assert check(later, both({"k1": None}))["lost"] == 1
    read = [op("put", "k1", "C:1", 0, 1.0, host="C"), op("delete", "k1", None, 1.0001, 1.0002, host="A"),
            op("get", "k1", "C:1", 2, 2.1, host="A")]
    assert check(read, both({"k1": "C:1"}))["stale_reads"] == 0


def test_replicated_counters_are_registers_of_the_value_each_incr_returned():
    ops = [op("incr", "c1", 1, 0, 1, host="A"), op("incr", "c1", 1, 2, 3, host="B"),  # B had not seen A's
           op("incr", "c1", 2, 4, 5, host="B")]
    assert check(ops, both({"c1": 2}), counters="register").clean()
    assert check(ops, both({"c1": 1}), counters="register")["lost"] == 1
    assert check(ops, both({"c1": 2}))["lost"] == 1  # as an owner's counter, an increment is missing


# ---- runs under faults ---------------------------------------------------------------------

# (scenario, topology) pairs CI runs, each a real run of CI_DURATION seconds of workload, or
# of the scenario's min_duration (about 20 s with setup and convergence, on 2 cores). Edit
# this list to choose.
CI_SCENARIOS = [
    # Clean in every run made of them on this code (the README's table says which other
    # cells still show anomalies; they join this list when they pass every time).
    ("none", "replicated"),
    ("none", "partitioned"),
    ("none", "partitioned+near"),
    ("bridge-pause", "replicated"),
    ("worker-kill", "replicated"),
    ("bridge-kill-fast", "partitioned"),
    ("bridge-kill-slow", "partitioned"),  # (a write in place just before the kill: stale read, fixed)
    ("split-1|2", "partitioned"),
    ("clock-3s-behind+isolate", "partitioned"),
    ("isolate+freeze+kill", "partitioned"),
]
CI_DURATION = 10.0


@pytest.mark.parametrize("scenario,topology", CI_SCENARIOS, ids=[f"{s}-{t}" for s, t in CI_SCENARIOS])
def test_no_anomaly_under_the_fault(scenario, topology, tmp_path):
    reason = net.unavailable()
    assert reason is None, f"the fault histories need root, ip and iptables: {reason}"
    result = runner.run(nemesis.SCENARIOS[scenario], topology, tmp_path, duration=CI_DURATION, seed=1)
    counts = {c: result[c] for c in checker.Result.COLUMNS + ("over_counted",)}
    assert counts == dict.fromkeys(counts, 0), (
        f"{scenario} on {topology}: {counts}\nexamples: {dict(result.examples)}\n"
        f"notes: {result.notes}\nhistory and logs: {tmp_path}")
    assert result.extra.get("replay", {}).get("changed_keys", 0) == 0, result.extra
