"""The checker of recorded histories (tests/cluster.py ``_history`` records them).

Every key is written by one worker, in order, and carries one tag that only that
worker invalidates; so what a key may hold at the end follows from its worker's
history alone. An acknowledged operation fixes the key's state (a put: its value; a
delete, or an invalidation of its tag: absent); an operation that failed may or may
not have happened, so it adds its outcome to the states allowed. A final value
outside the allowed states is charged to the last acknowledged operation on the key:
a put (a lost write), a delete (a delete undone) or a tag invalidation (an
invalidation not respected).
"""

ABSENT = None


def expected_states(histories):
    """{key: (allowed final states, kind of the last acknowledged operation or None)}."""
    out = {}
    for history in histories:
        keys_of_tag = {}
        for op, target, value, acked, _error in history:
            if op == "tag":
                keys = keys_of_tag.get(target, ())
            else:
                keys = (target,)
                keys_of_tag.setdefault(_tag_of(target), set()).add(target)
            outcome = value if op == "put" else ABSENT
            for key in keys:
                allowed, last = out.get(key, ({ABSENT}, None))
                if acked:
                    out[key] = ({outcome}, op)
                else:
                    out[key] = (allowed | {outcome}, last)
    return out


def _tag_of(key):
    prefix, _, i = key.rpartition(":")
    return f"{prefix}:t{int(i) % 10}"


def check(histories, finals):
    """``finals``: {host label: {key: value}} read after the faults healed. Returns
    {"lost", "undone", "not_invalidated", "disagree", "phantom", "acked", "failed", "examples"}."""
    expected = expected_states(histories)
    report = {"lost": 0, "undone": 0, "not_invalidated": 0, "disagree": 0, "phantom": 0, "examples": [],
              "acked": sum(1 for h in histories for e in h if e[3]),
              "failed": sum(1 for h in histories for e in h if not e[3])}
    labels = sorted(finals)
    for key, (allowed, last) in sorted(expected.items()):
        seen = [finals[label].get(key, ABSENT) for label in labels]
        if any(v != seen[0] for v in seen[1:]):
            report["disagree"] += 1
            report["examples"].append(["disagree", key, dict(zip(labels, seen))])
        if seen[0] in allowed:
            continue
        kind = {"put": "lost", "del": "undone", "tag": "not_invalidated"}.get(last)
        report[kind or "phantom"] += 1  # phantom: a value no operation on the key could leave
        if len(report["examples"]) < 10:
            report["examples"].append([kind, key, seen[0], sorted(allowed, key=repr)])
    return report
