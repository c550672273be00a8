"""Run the fault scenarios on the topologies and print the table of anomalies.

    python tools/faults.py                       # every scenario, every topology
    python tools/faults.py -s split-1|2 -t partitioned --duration 40 --seed 7
    python tools/faults.py --list
    python tools/faults.py --recheck WORKDIR     # the kept runs checked again, no new run

Each run keeps its history (``history.jsonl``, one operation a line), the per-process
records, the bridges' logs and ``result.json`` under ``--workdir`` (a new temporary
directory by default, printed at the start). Needs root (network namespaces,
iptables) and libfaketime for the clock scenario. Exit status 1 when any cell is
not 0 / converged.
"""
import argparse
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from faults import net, nemesis, runner  # noqa: E402

HEADER = ("scenario", "topology", "lost acknowledged writes", "resurrected deletes",
          "invalidations not respected", "stale reads", "converged", "calls over timeout",
          "replayed/forged applied")


def row(scenario, topology, result):
    if result is None:
        return [scenario, topology] + ["error"] * 7
    replay = result.extra.get("replay")
    lost = result["lost"] if not result["ties"] else f"{result['lost']} (+{result['ties']} same-ms tie)"
    return [scenario, topology, lost, result["resurrected"], result["invalidations"],
            result["stale_reads"], "yes" if result.converged else f"no ({result['diverging']} keys)",
            result["over_timeout"], "—" if replay is None else replay["changed_keys"]]


def markdown(rows):
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def cell_dir(workdir, scenario, topology):
    return os.path.join(workdir, f"{scenario}--{topology}".replace("|", "-"))


def recheck(workdir):
    rows = []
    for name in nemesis.SCENARIOS:
        for topology in runner.TOPOLOGIES:
            where = cell_dir(workdir, name, topology)
            if os.path.exists(os.path.join(where, "reads.json")):
                rows.append(row(name, topology, runner.recheck(where, topology)))
    print(markdown(rows))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-s", "--scenario", action="append", choices=sorted(nemesis.SCENARIOS),
                        help="a scenario to run (repeat; default: all)")
    parser.add_argument("-t", "--topology", action="append", choices=sorted(runner.TOPOLOGIES),
                        help="a topology (repeat; default: all)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of workload per run (default 30)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", help="where histories and logs go (default: a new temporary directory)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and topologies")
    parser.add_argument("--recheck", metavar="WORKDIR",
                        help="check the runs kept in WORKDIR again (no new run) and print their table")
    args = parser.parse_args(argv)
    if args.recheck:
        return recheck(args.recheck)
    if args.list:
        print("scenarios: " + ", ".join(nemesis.SCENARIOS))
        print("topologies: " + ", ".join(runner.TOPOLOGIES))
        return 0
    reason = net.unavailable()
    if reason:
        print(f"faults: cannot run here: {reason}", file=sys.stderr)
        return 2
    workdir = args.workdir or tempfile.mkdtemp(prefix="vela-faults-")
    print(f"histories and logs in {workdir}", flush=True)
    rows = []
    for name in args.scenario or list(nemesis.SCENARIOS):
        for topology in args.topology or list(runner.TOPOLOGIES):
            where = cell_dir(workdir, name, topology)
            started = time.monotonic()
            try:
                result = runner.run(nemesis.SCENARIOS[name], topology, where, args.duration, args.seed)
            except Exception:  # noqa: BLE001 - one broken run must not hide the others
                traceback.print_exc()
                result = None
            rows.append(row(name, topology, result))
            print(" | ".join(str(c) for c in rows[-1]) + f"   ({time.monotonic() - started:.0f} s, {where})",
                  flush=True)
            if result is not None:
                for kind, examples in result.examples.items():
                    print(f"    {kind}: {json.dumps(examples[:2], default=str)[:400]}")
                for note in result.notes:
                    print(f"    note: {note}")
    print()
    print(markdown(rows))
    bad = [r for r in rows if r[3:6] != [0, 0, 0] or str(r[2]).split()[0] != "0" or r[6] != "yes" or r[7] != 0 or r[8] not in ("—", 0)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
