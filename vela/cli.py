"""The `vela` console command (also `python -m vela`).

    vela ls [--json]                      the caches of this host: size, entries, topology, bridge
    vela inspect NAME [--json] [--check] [--keys N] [--watch SECONDS]
    vela destroy NAME [--data-dir DIR]    remove a cache (its segment, or its file)
    vela --version

``inspect`` is ``tools/inspect_shm.py`` (the code lives in :mod:`vela.inspect`).
Exit status: 0 fine; 1 no such cache (or what the command reports); 2 an operator
mistake (bad arguments, a missing package), said in one line with its fix.
"""
import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from . import __version__, _native

__all__ = ["main"]

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2

COMMANDS = {
    "ls": "list the caches of this host: size, entries, topology, whether a bridge serves them",
    "inspect": "show a live cache of this host without waiting for its locks",
    "destroy": "remove a cache of this host (workers that still have it open keep their copy)",
}

USAGE = ("usage: vela [--version] COMMAND [ARGS...]\n\ncommands:\n"
         + "".join(f"  {name:10} {text}\n" for name, text in COMMANDS.items())
         + "\n`vela COMMAND --help` shows the options of a command.\n")

SHM_DIR = "/dev/shm"
# Files a cache keeps beside its segment (vela.stores.replicated.control_endpoint and
# marks_path, vela.bridge.presence, vela.stores.near.HostElection): vela.<name>.<suffix>, not caches.
SIDE_FILES = ("bridge", "marks", "listener", "alive")
TOPOLOGIES = {_native.TOPOLOGY_LOCAL: "local", _native.TOPOLOGY_REPLICATED: "replicated",
              _native.TOPOLOGY_PARTITIONED: "partitioned"}


class OperatorError(Exception):
    """A mistake the operator can fix: printed as one line, exit status 2."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `vela`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return EXIT_OK
    if argv and argv[0] in ("-V", "--version"):
        print(f"vela {__version__}")
        return EXIT_OK
    if not argv or argv[0] not in COMMANDS:
        if argv:
            sys.stderr.write(f"vela: unknown command {argv[0]!r}\n")
        sys.stderr.write(USAGE)
        return EXIT_USAGE
    command, args = argv[0], argv[1:]
    try:
        if command == "inspect":
            from ._extras import need

            need("psutil", "vela inspect")
            from .inspect import main as inspect_main

            return inspect_main(args, prog="vela inspect")
        if command == "ls":
            return ls(args)
        return destroy(args)
    except OperatorError as exc:
        print(f"vela {command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:  # a feature's extra is not installed; the message says which
        print(f"vela {command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


# ---- vela ls ----------------------------------------------------------------------------


def segment_names() -> List[str]:
    """Names of the caches whose shared-memory segment is on this host (in this
    VELA_NAMESPACE when one is set)."""
    namespace = os.environ.get("VELA_NAMESPACE")
    prefix = f"vela.{namespace}." if namespace else "vela."
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    # Beside a segment live files of its own (vela.<name>.bridge, .marks, .listener, .alive): not caches.
    return sorted(e[len(prefix):] for e in entries
                  if e.startswith(prefix) and len(e) > len(prefix) and e.rsplit(".", 1)[-1] not in SIDE_FILES
                  and os.path.isfile(os.path.join(SHM_DIR, e)))


def describe(name: str) -> Dict[str, Any]:
    """One row of `vela ls`: read without waiting for any lock of the cache."""
    from . import inspect as inspect_mod

    row: Dict[str, Any] = dict(name=name, segment_bytes=None, entries=None, memory_used=None,
                               topology=None, bridge=None, problem=None)
    try:
        cache = inspect_mod.attach(name)
    except inspect_mod.NoSuchCache as exc:
        row["problem"] = str(exc)
        return row
    except Exception as exc:  # another version's or an unfinished segment: reported, not fatal
        row["problem"] = str(exc)
        found, size = inspect_mod.segment_exists(name)
        row["segment_bytes"] = size if found else None
        return row
    try:
        info = cache.info()
        row.update(segment_bytes=info["capacity"], entries=info["entries"], memory_used=info["memory_used"],
                   topology=TOPOLOGIES.get(cache._table.log_state()["replicated"], "unknown"))
        if row["topology"] != "local":
            row["bridge"] = bridge_state(cache.cluster())
    finally:
        cache.close()
    return row


def bridge_state(view: Optional[Dict[str, Any]]) -> str:
    """'alive (pid N)', 'dead (pid N)' or 'none': from the cluster view the bridge
    writes into the segment (a partitioned bridge clears it when it stops)."""
    pid = view.get("pid") if isinstance(view, dict) else None
    if not isinstance(pid, int) or pid <= 0:
        return "none"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"dead (pid {pid})"
    except PermissionError:  # another user's process: alive
        pass
    return f"alive (pid {pid})"


def ls(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="vela ls", description=COMMANDS["ls"])
    p.add_argument("--json", action="store_true", help="one JSON list, for scripts")
    args = p.parse_args(argv)
    from . import inspect as inspect_mod

    rows = [describe(name) for name in segment_names()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no caches on this host (no {SHM_DIR}/vela.* segment)")
        return EXIT_OK
    table = [("NAME", "SIZE", "ENTRIES", "TOPOLOGY", "BRIDGE")]
    for r in rows:
        if r["problem"]:
            table.append((r["name"], inspect_mod.human_bytes(r["segment_bytes"]), "-", "-", r["problem"]))
        else:
            table.append((r["name"], inspect_mod.human_bytes(r["segment_bytes"]), f"{r['entries']:,}", r["topology"],
                          r["bridge"] or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
    return EXIT_OK


# ---- vela destroy -------------------------------------------------------------------------


def destroy(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="vela destroy", description=COMMANDS["destroy"])
    p.add_argument("name")
    p.add_argument("--data-dir", help="the directory of a file-backed cache (backend='file')")
    args = p.parse_args(argv)
    from . import options
    from .cache import destroy as destroy_cache

    try:
        options.check_name(args.name)
    except ValueError as exc:
        raise OperatorError(str(exc)) from None
    if args.data_dir:
        removed = destroy_cache(args.name, backend="file", backend_opts={"data_dir": args.data_dir})
        where = f"in {args.data_dir}"
    else:
        removed = destroy_cache(args.name)
        where = "on this host"
    if not removed:
        print(f"vela destroy: no cache named {args.name!r} {where} (`vela ls` lists them)", file=sys.stderr)
        return EXIT_PROBLEM
    print(f"destroyed cache {args.name!r} {where}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
