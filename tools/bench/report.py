"""Tables, ratios and targets from one run's results.

results[workload][store][nprocs] -> {"ops_per_s", "ns_per_op", ...} or {"error": ...}
"""

from workloads import BY_NAME


def _fig(results, workload, store, nprocs, key="ops_per_s"):
    cell = results.get(workload, {}).get(store, {})
    return cell.get(nprocs, {}).get(key) if "error" not in cell else None


def _rate(x):
    if x is None:
        return "-"
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _ns(x):
    if x is None:
        return "-"
    return f"{x / 1000:.1f}us" if x >= 10_000 else f"{x:.0f}"


def _ratio(x):
    if x is None:
        return "-"
    return f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def _table(title, results, stores, row_fn, fmt):
    width = max(10, *(len(s) + 1 for s in stores))
    print(f"\n== {title} ==")
    print(f"{'workload':<14}" + "".join(f"{s:>{width}}" for s in stores))
    for workload in results:
        print(f"{workload:<14}" + "".join(f"{fmt(row_fn(workload, s)):>{width}}" for s in stores))


def scaling(results, workload, store, lo=1, hi=2):
    """ops/s with `hi` processes / with `lo`, or None."""
    a, b = _fig(results, workload, store, lo), _fig(results, workload, store, hi)
    return b / a if a and b else None


def scaling_vs_floor(results, workload, lo=1, hi=2):
    """Vela's scaling / the dict floor's (1: Vela scales as well as a process-local dict)."""
    vela, floor = scaling(results, workload, "vela", lo, hi), scaling(results, workload, "floor", lo, hi)
    return vela / floor if vela and floor else None


def ratios(results, stores, procs_list):
    """Vela ops/s / peer ops/s for every workload, peer and process count."""
    out = {}
    for nprocs in procs_list:
        for workload in results:
            vela = _fig(results, workload, "vela", nprocs)
            for store in stores:
                peer = _fig(results, workload, store, nprocs)
                if store != "vela" and vela and peer:
                    out.setdefault(str(nprocs), {}).setdefault(workload, {})[store] = vela / peer
    return out


def tables(results, stores, procs_list):
    peers = [s for s in stores if s != "vela"]
    for nprocs in procs_list:
        what = "1 process" if nprocs == 1 else f"{nprocs} processes at once"
        _table(f"ops/s, {what}" + ("" if nprocs == 1 else " (aggregate)"), results, stores,
               lambda w, s: _fig(results, w, s, nprocs), _rate)
        _table(f"ns/op, {what} (mean time of one call in one process)", results, stores,
               lambda w, s: _fig(results, w, s, nprocs, "ns_per_op"), _ns)
        r = ratios(results, stores, [nprocs]).get(str(nprocs), {})
        _table(f"Vela / peer, ops/s (>1: Vela is faster), {what}", results, peers,
               lambda w, s: r.get(w, {}).get(s), _ratio)
    if len(procs_list) > 1:
        lo, hi = min(procs_list), max(procs_list)
        _table(f"scaling: ops/s with {hi} processes / with {lo}", results, stores + ["vela/floor"],
               lambda w, s: scaling_vs_floor(results, w, lo, hi) if s == "vela/floor"
               else scaling(results, w, s, lo, hi), _ratio)
    errors = [(w, s, cell["error"]) for w, row in results.items() for s, cell in row.items()
              if "error" in cell]
    for w, s, err in errors:
        print(f"ERROR {s} / {w}: {err}")
    print("\nworkloads: " + "; ".join(f"{name}: {BY_NAME[name].title}" for name in results))


# (label, workload, peer, minimum ratio of Vela's ops/s to the peer's), 1 process
RATIO_TARGETS = [  # (label, workload, Vela's store, peer, at least)
    ("get-hit 100 B >= 0.5x the floor", "get_hit_100b", "vela", "floor", 0.5),
    ("get-hit small dict >= 0.4x the floor", "get_hit_dict", "vela", "floor", 0.4),
    ("get-hit small dict, local_objects >= 1.0x the floor", "get_hit_dict", "vela-objects", "floor", 1.0),
    ("get_many 20 small dicts, local_objects >= 1.0x the floor", "get_many_dict_20", "vela-objects", "floor", 1.0),
    ("get_or_fetch hit small dict, local_objects >= 1.0x the floor", "fetch_hit_dict", "vela-objects", "floor",
     1.0),
    ("get-hit 100 B >= 30x redis-py (unix socket)", "get_hit_100b", "vela", "redis-unix", 30),
    ("get-hit 100 B >= 10x diskcache", "get_hit_100b", "vela", "diskcache", 10),
    ("get-hit 100 B >= 1x lmdb", "get_hit_100b", "vela", "lmdb", 1),
    ("put 100 B >= 10x diskcache", "put_100b", "vela", "diskcache", 10),
    ("put 100 B >= 20x redis-py (unix socket)", "put_100b", "vela", "redis-unix", 20),
]


def targets(results, mem, tele, remote=None):
    """Print and return every target: met, NOT met, or not measured in this run.
    ``remote``: tools/bench/partitioned.py's results, when it ran."""
    rows = []
    for label, workload, store, peer, want in RATIO_TARGETS:
        vela, other = _fig(results, workload, store, 1), _fig(results, workload, peer, 1)
        value = vela / other if vela and other else None
        rows.append((label, value, value is not None and value >= want, f"{_ratio(value)}"))
    one, two = _fig(results, "get_hit_100b", "vela", 1), _fig(results, "get_hit_100b", "vela", 2)
    value = two / one if one and two else None
    rows.append(("get-hit 100 B, Vela: 2 processes >= 1.7x the ops/s of 1", value,
                 value is not None and value >= 1.7, _ratio(value)))
    value = scaling_vs_floor(results, "put_100b")
    rows.append(("put 100 B, Vela's 2-process/1-process ops/s >= 0.9x the floor's", value,
                 value is not None and value >= 0.9, _ratio(value)))
    for what, key in (("heap only", "heap_overhead_per_entry"),
                      ("whole segment: header and index included", "segment_overhead_per_entry")):
        value = mem[key] if mem else None
        rows.append((f"per-entry overhead beyond key + value <= 64 B ({what})", value,
                     value is not None and value <= 64, f"{value:.1f} B" if mem else "-"))
    value = tele["ratio"] if tele else None
    rows.append(("get with telemetry idle within 5 % of cache._table.get", value,
                 value is not None and value <= 1.05, f"{value:.3f}x" if tele else "-"))
    ratios = (remote or {}).get("ratios", {})
    for label, key, want, below in (
            ("partitioned remote get p50 <= 1.0x a redis-py GET", "remote_p50_over_redis_p50", 1.0, True),
            ("partitioned remote gets/s through one bridge >= 1.0x one redis-server's", "bridge_over_redis_server",
             1.0, False)):
        value = ratios.get(key)
        rows.append((label, value, value is not None and (value <= want if below else value >= want),
                     _ratio(value)))
    print("\n== targets (from this run) ==")
    out = []
    for label, value, met, shown in rows:
        state = "not measured" if value is None else ("met" if met else "NOT met")
        print(f"  {state:<12} {label}: {shown}")
        out.append({"target": label, "value": value, "met": None if value is None else bool(met)})
    return out
