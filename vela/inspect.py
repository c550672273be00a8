"""Look into a live cache without waiting for any of its locks.

The code behind ``tools/inspect_shm.py`` and ``vela inspect``. It must work when
every worker of the host is frozen (SIGSTOP) while one of them holds a stripe
lock, so it only uses the table's lock-free readers (``info``,
``stripes_info``, ``leases_info``, the stats counters) and ``sample``, which
try-locks each stripe and skips the busy ones. The one exception is the
integrity check (``--check``), which must take every lock: it is skipped when
a lock is held by a stopped process, and otherwise bounded by a lock timeout.

Exit status of :func:`main`: 0 fine; 1 the cache cannot be opened (absent,
another layout) or ``--check`` found a problem; 2 bad arguments; 3 ``--check``
could not run (a lock is held by a stopped process, or stayed held too long).
"""

import argparse
import datetime
import json
import os
import struct
import sys
import time

import posix_ipc

try:
    import psutil
except ImportError:  # vela[inspect]; `vela ls` reads segments without it, `vela inspect` says so
    psutil = None

from . import _native, options
from .segments import shm
from .errors import LayoutMismatch, LockTimeout, VelaError

__all__ = ["NoSuchCache", "NotATable", "attach", "segment_exists", "peek_identity", "snapshot", "render", "run_check", "main"]

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_UNCHECKED = 0, 1, 2, 3

CODECS = {_native.CODEC_BYTES: "bytes", _native.CODEC_STR: "str", _native.CODEC_INT: "int",
          _native.CODEC_PICKLE: "pickle", _native.CODEC_JSON: "json", _native.CODEC_MSGPACK: "msgpack",
          _native.CODEC_CUSTOM: "custom"}
EVICTION = {_native.EVICT_LRU: "lru", _native.EVICT_LFU: "lfu", _native.EVICT_TTL_ONLY: "ttl_only"}
# psutil statuses of a process that exists but cannot release a lock right now
FROZEN = {"stopped", "tracing-stop"}  # psutil.STATUS_STOPPED, STATUS_TRACING_STOP

TAGS_NOTE = ("tag names are not stored in the segment (only 64-bit hashes), "
             "so entries per tag cannot be listed by name yet")
CLUSTER_NOTE = "none: local topology (no vela-bridge writes a cluster view into this segment)"


class NoSuchCache(VelaError, LookupError):
    """There is no segment of that name on this host (or it was never laid out)."""


class NotATable(VelaError):
    """The segment exists but is not a finished Vela table: it is left alone."""


# --------------------------------------------------------------------------------------
# attaching without creating


# The identity fields that open native/table.h's vela_header (little-endian, at
# offset 0): u64 magic, u32 format, u32 header_size, u32 ready. They are checked
# before anything else of a segment is trusted, so they do not move between formats.
_IDENTITY = struct.Struct("<QIII")
_MAGIC = _native.MAGIC
_READY = _native.READY


def segment_exists(name):
    """(exists, size in bytes) of the shared-memory segment of cache ``name``."""
    try:
        seg = posix_ipc.SharedMemory(shm.segment_name(name))
    except posix_ipc.ExistentialError:
        return False, 0
    try:
        return True, os.fstat(seg.fd).st_size
    finally:
        seg.close_fd()


def peek_identity(name):
    """(magic, format, ready) read from the segment's first bytes, without mapping it
    for writing and without any lock; None when the segment is absent or too short."""
    try:
        seg = posix_ipc.SharedMemory(shm.segment_name(name))
    except posix_ipc.ExistentialError:
        return None
    try:
        data = os.pread(seg.fd, _IDENTITY.size, 0)
    finally:
        seg.close_fd()
    if len(data) < _IDENTITY.size:
        return None
    magic, fmt, _, ready = _IDENTITY.unpack(data)
    return magic, fmt, ready


def attach_file(name, data_dir, lock_timeout=10.0):
    """Open the existing file-backed cache ``name`` in ``data_dir`` as an observer.

    When no process has the file open, this open is the first one and checks and
    rebuilds the table as any first opener does (see the file backend).
    """
    from .segments import file as file_backend
    from .cache import Cache

    options.check_name(name)
    path = file_backend.path_of(name, data_dir)
    try:
        with open(path, "rb") as f:
            data = f.read(_IDENTITY.size)
    except FileNotFoundError:
        raise NoSuchCache(f"no file-backed cache named {name!r} in {data_dir} (no {path})") from None
    if len(data) < _IDENTITY.size or _IDENTITY.unpack(data)[0] != _MAGIC:
        raise NotATable(f"{path} is not a Vela table")
    return Cache(name, backend="file", backend_opts={"data_dir": data_dir, "sync_interval": None,
                                                      "on_corrupt": "raise"},
                 sweep_interval=None, lock_timeout=lock_timeout)


def attach(name, lock_timeout=10.0):
    """Open the existing cache ``name`` as an observer.

    Opening a :class:`vela.Cache` of a name that does not exist creates it, so
    the segment is looked up first. The handle adopts the segment's layout (no
    layout option is passed) and does not take part in the background sweep.

    :raises NoSuchCache: no segment of that name, or an empty one.
    :raises NotATable: the segment is not a finished Vela table (it is left alone).
    :raises vela.LayoutMismatch: the segment was made by another version of Vela.
    """
    from .cache import Cache

    options.check_name(name)
    found, size = segment_exists(name)
    if not found:
        raise NoSuchCache(f"no cache named {name!r} on this host "
                          f"(no shared-memory segment {shm.segment_name(name)})")
    seg = shm.segment_name(name)
    identity = peek_identity(name) if size else None
    if identity is None:
        raise NoSuchCache(f"the segment {seg} of cache {name!r} is empty or truncated "
                          f"({size} bytes): its creator is laying it out, or died before it could")
    magic, fmt, ready = identity
    # Opening a segment that is not a finished table would lay a new table over it:
    # a diagnostic must never do that.
    if magic != _MAGIC:
        raise NotATable(f"{seg} is not a Vela table (magic {magic:#018x}), or was made on a "
                        "machine of the other byte order")
    if ready != _READY:
        raise NotATable(f"{seg} is not a finished Vela table (format {fmt}, no READY mark): its "
                        "creator is laying it out, or died while doing so (the next worker that "
                        "opens the cache lays it out afresh)")
    try:
        return Cache(name, sweep_interval=None, lock_timeout=lock_timeout)
    except LayoutMismatch as e:
        raise LayoutMismatch(f"{seg} was made by another version of Vela (segment format {fmt}): "
                             f"{e}") from None


# --------------------------------------------------------------------------------------
# processes


def process_state(pid, start_ticks=None):
    """What the process ``pid`` is doing, as one word: running, sleeping, stopped,
    zombie, dead, ... (``start_ticks`` tells a reused pid from the original holder)."""
    if not pid:
        return "-"
    if start_ticks and _native.proc_start_time(pid) != start_ticks:
        return "dead"
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "dead"
    except psutil.Error:
        return "unknown"
    if status == psutil.STATUS_ZOMBIE:
        return "dead (zombie)"
    if status in FROZEN:
        return "stopped"
    return status


def _is_dead(state):
    return state.startswith("dead")


# --------------------------------------------------------------------------------------
# the snapshot: everything, read without waiting


def snapshot(cache, keys=0):
    """A dict describing the cache now, read lock-free (``keys`` > 0 also samples
    that many entries, try-locking each stripe and skipping the busy ones)."""
    t = cache._table
    info = t.info()
    stripes = [dict(stripe=i, entries=e, bytes=b, seq=seq, holder_pid=pid, recoveries=rec)
               for i, (e, b, seq, pid, rec) in enumerate(t.stripes_info())]
    locks = []
    for s in stripes:
        if s["holder_pid"] or s["seq"] & 1:
            locks.append(dict(lock=f"stripe {s['stripe']}", stripe=s["stripe"], pid=s["holder_pid"],
                              state=process_state(s["holder_pid"]), write_in_progress=bool(s["seq"] & 1)))
    if info["heap_lock_holder"]:
        pid = info["heap_lock_holder"]
        locks.append(dict(lock="heap", stripe=None, pid=pid, state=process_state(pid),
                          write_in_progress=None))
    leases = [dict(stripe=st, slot=slot, key_hash=h, pid=pid, age_seconds=age,
                   state=process_state(pid, start))
              for st, slot, h, pid, start, age in t.leases_info()]
    counters = cache.stats()
    snap = dict(
        name=cache.name,
        segment=getattr(cache._segment, "path", None) or shm.segment_name(cache.name),
        read_at=time.time(),
        header=dict(
            format=info["format"],
            backend="shm" if info["backend"] == _native.BACKEND_SHM else "file",
            created=info["created_ns"] / 1e9,
            eviction_policy=info["eviction_policy"],
            capacity=info["capacity"],
            stripes=info["stripes"],
            buckets_per_stripe=info["buckets_per_stripe"],
            tag_buckets_per_stripe=info["tag_buckets_per_stripe"],
            max_size=info["max_size"] or None,
            max_entry_size=info["max_entry_size"],
            poisoned=bool(info["poisoned"]),
            version_clock=info["version_clock"],
        ),
        memory=dict(
            capacity=info["capacity"],
            index_bytes=info["index_bytes"],
            heap_bytes=info["heap_bytes"],
            used=info["memory_used"],
            free=max(0, info["heap_bytes"] - info["memory_used"]),
            entries=info["entries"],
        ),
        stripes=stripes,
        fill=_fill(stripes),
        locks=locks,
        leases=leases,
        stats=counters,
        sweeper=dict(pid=info["sweeper_pid"] or None,
                     state=process_state(info["sweeper_pid"]) if info["sweeper_pid"] else None),
        tags=dict(by_name=None, note=TAGS_NOTE),
        cluster=_cluster_view(t),
        warnings=_warnings(info, locks, leases),
    )
    if keys:
        items, busy = t.sample(keys)
        snap["sample"] = dict(
            requested=keys,
            busy_stripes=busy,
            entries=[dict(key=k, size=size, ttl=ttl, codec=CODECS.get(codec, str(codec)), tags=ntags)
                     for k, size, ttl, codec, ntags in items],
        )
    return snap


def _cluster_view(t):
    """The view the host's vela-bridge publishes in the segment (read lock-free), with
    the state of the change log it ships; None when no bridge ever wrote one."""
    raw = t.cluster() if hasattr(t, "cluster") else b""
    if not raw:
        return None
    try:
        view = json.loads(raw)
    except ValueError:
        view = {"unreadable": raw[:200].decode(errors="replace")}
    if hasattr(t, "log_state") and isinstance(view, dict):
        view["change_log"] = t.log_state()
    return view


def _fill(stripes):
    """Entries per stripe: min, median, max and a histogram of 8 equal ranges."""
    counts = sorted(s["entries"] for s in stripes)
    lo, hi = counts[0], counts[-1]
    width = max(1, -(-(hi - lo + 1) // 8))  # ceil: at most 8 ranges
    bins = []
    start = lo
    while start <= hi:
        end = start + width - 1
        bins.append(dict(low=start, high=end, stripes=sum(start <= c <= end for c in counts)))
        start = end + 1
    return dict(min=lo, median=counts[len(counts) // 2], max=hi, bins=bins)


def _warnings(info, locks, leases):
    out = []
    if info["poisoned"]:
        out.append("the table is POISONED (a repair failed): every call fails; "
                   "destroy and recreate the cache")
    for lock in locks:
        what, pid, state = lock["lock"], lock["pid"], lock["state"]
        if state == "stopped":
            out.append(f"{what} is held by pid {pid}, which is STOPPED: processes that need it wait "
                       f"lock_timeout, then raise LockTimeout. Resume it (kill -CONT {pid}) or kill it "
                       "(the next process to lock it repairs it)")
        elif _is_dead(state):
            out.append(f"{what} was left locked by pid {pid}, which is {state}: the next process "
                       "that locks it repairs it (counted in lock_recoveries)")
        elif not pid and lock["write_in_progress"]:
            out.append(f"{what}: a write is in progress (odd sequence) with no holder recorded")
    for lease in leases:
        if _is_dead(lease["state"]):
            out.append(f"a stampede lease (stripe {lease['stripe']}) is held by pid {lease['pid']}, which "
                       "is dead: the next get_or_fetch of that key takes it over "
                       "(cache.release_leases(pid) frees it now)")
    return out


# --------------------------------------------------------------------------------------
# the integrity check, which takes every lock


def run_check(cache, snap, timeout):
    """Run ``cache.check()`` unless that would wait for a stopped process.

    :returns: dict(status="clean"|"problems"|"skipped"|"timeout"|"error",
              problems=[...], reason=str or None, seconds=float)
    """
    frozen = [lock for lock in snap["locks"] if lock["state"] == "stopped"]
    if frozen:
        held = ", ".join(f"{lock['lock']} by pid {lock['pid']}" for lock in frozen)
        return dict(status="skipped", problems=[], seconds=0.0, repaired=0,
                    reason=f"not run: {held} (stopped); the check takes every lock, so it would "
                           "wait for that process while holding the others")
    cache._table.lock_timeout = timeout
    # A lock left by a dead process is repaired by whoever takes it next: the check, here.
    recoveries = sum(s[4] for s in cache._table.stripes_info())
    start = time.monotonic()
    try:
        problems = cache.check()
    except LockTimeout as e:
        return dict(status="timeout", problems=[], seconds=time.monotonic() - start,
                    reason=f"not finished: {e}", repaired=0)
    except VelaError as e:  # poisoned, corrupt: a real violation
        return dict(status="problems", problems=[f"{type(e).__name__}: {e}"],
                    seconds=time.monotonic() - start, reason=None, repaired=0)
    repaired = sum(s[4] for s in cache._table.stripes_info()) - recoveries
    return dict(status="problems" if problems else "clean", problems=problems,
                seconds=time.monotonic() - start, reason=None, repaired=repaired)


# --------------------------------------------------------------------------------------
# rendering for humans


def human_bytes(n):
    """1536 -> '1.5 KiB'."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024.0
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def human_seconds(s):
    """Remaining or elapsed time: '850 ms', '12.3 s', '4 min 05 s', '2 h 03 min', '3 d 04 h'."""
    if s is None:
        return "never"
    if s < 0:
        return "expired"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    s = int(s)
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def table(headers, rows, right=()):
    """Rows under headers, columns padded to their widest cell; columns whose index
    is in ``right`` are right-aligned (numbers)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  " + "  ".join(parts).rstrip())
    return lines


def _stamp(ts):
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def render(snap, check=None):
    """The snapshot as aligned text tables."""
    h, m, st = snap["header"], snap["memory"], snap["stats"]
    out = [f"vela cache {snap['name']!r}: segment {snap['segment']}, format {h['format']}, "
           f"{h['backend']} backend",
           f"created {_stamp(h['created'])} ({human_seconds(snap['read_at'] - h['created'])} ago); "
           f"read lock-free at {_stamp(snap['read_at'])}"]
    if snap["warnings"]:
        out += ["", "WARNINGS"] + [f"  ! {w}" for w in snap["warnings"]]

    used_pct = 100.0 * m["used"] / m["heap_bytes"] if m["heap_bytes"] else 0.0
    out += ["", "Layout and memory"] + table(("", ""), [
        ("capacity", f"{human_bytes(m['capacity'])}  (index {human_bytes(m['index_bytes'])}, "
                     f"heap {human_bytes(m['heap_bytes'])})"),
        ("memory used", f"{human_bytes(m['used'])}  ({used_pct:.1f} % of the heap, "
                        f"{human_bytes(m['free'])} free)"),
        ("entries", f"{m['entries']:,}  (max_size: {h['max_size'] or 'no limit'})"),
        ("max entry size", human_bytes(h["max_entry_size"])),
        ("eviction policy", h["eviction_policy"]),
        ("stripes", f"{h['stripes']} x {h['buckets_per_stripe']} buckets, "
                    f"{h['tag_buckets_per_stripe']} tag buckets each"),
        ("poisoned", "YES: destroy and recreate the cache" if h["poisoned"] else "no"),
    ])[1:]

    f = snap["fill"]
    out += ["", f"Stripe fill: entries per stripe (min {f['min']}, median {f['median']}, max {f['max']})"]
    most = max(b["stripes"] for b in f["bins"]) or 1
    rows = [(f"{b['low']}" if b["low"] == b["high"] else f"{b['low']}-{b['high']}", b["stripes"],
             "#" * max(1 if b["stripes"] else 0, round(30 * b["stripes"] / most))) for b in f["bins"]]
    out += table(("entries", "stripes", ""), rows, right=(0, 1))

    out += ["", "Locks held now"]
    if snap["locks"]:
        out += table(("lock", "holder pid", "process", "write"), [
            (lock["lock"], lock["pid"] or "-", lock["state"],
             "-" if lock["write_in_progress"] is None
             else "in progress (odd sequence)" if lock["write_in_progress"] else "none")
            for lock in snap["locks"]], right=(1,))
    else:
        out.append("  none: every stripe lock and the heap lock are free")
    recovered = [(s["stripe"], s["recoveries"]) for s in snap["stripes"] if s["recoveries"]]
    if recovered:
        out.append("  repaired after a holder died: " +
                   ", ".join(f"stripe {s} x{n}" for s, n in recovered))

    out += ["", f"Stampede leases (fetches in progress): {len(snap['leases'])}"]
    if snap["leases"]:
        out += table(("stripe", "slot", "key hash", "holder pid", "process", "held for"), [
            (le["stripe"], le["slot"], f"{le['key_hash']:016x}", le["pid"], le["state"],
             human_seconds(le["age_seconds"])) for le in snap["leases"]], right=(0, 1, 3))

    counters = [(k, f"{st[k]:,}") for k in ("hits", "misses", "writes", "deletes", "evictions",
                                           "expirations", "invalidations", "fetches", "stampede_waits",
                                           "stampede_timeouts", "lock_recoveries") if k in st]
    counters.append(("hit_ratio", f"{100.0 * st.get('hit_ratio', 0.0):.1f} %"))
    out += ["", "Stats (all processes of the host)"] + table(("", ""), counters, right=(1,))[1:]

    sw = snap["sweeper"]
    out += ["", "Sweeper: " + (f"pid {sw['pid']} ({sw['state']})" if sw["pid"]
                               else "none elected yet (the first handle with a sweep_interval takes the role "
                                    "at its first round)")]
    out.append(f"Tags: {snap['tags']['note']}")
    out += _render_cluster(snap["cluster"])

    if "sample" in snap:
        sm = snap["sample"]
        busy = sm["busy_stripes"]
        head = f"Sampled keys: {len(sm['entries'])} (asked for {sm['requested']})"
        if busy:
            head += f"; skipped busy stripe{'s' if len(busy) > 1 else ''} {', '.join(map(str, busy))}"
        out += ["", head]
        if sm["entries"]:
            out += table(("key", "value size", "ttl left", "codec", "tags"), [
                (_short(repr(e["key"])), human_bytes(e["size"]), human_seconds(e["ttl"]), e["codec"],
                 e["tags"]) for e in sm["entries"]], right=(1, 2, 4))

    if check is not None:
        out += ["", "Integrity check: " + _check_line(check)]
        out += [f"  - {p}" for p in check["problems"]]
    return "\n".join(out)


def _render_cluster(view):
    if not view:
        return [f"Cluster view: {CLUSTER_NOTE}"]
    if not isinstance(view, dict):
        return [f"Cluster view: {view!r}"]
    out = ["", "Cluster view (published by the host's vela-bridge)"]
    scalars = [(k, v) for k, v in view.items() if not isinstance(v, (dict, list))]
    out += table(("", ""), scalars)[1:]
    log = view.get("change_log")
    if isinstance(log, dict) and log.get("replicated"):
        lag = log.get("head", 0) - log.get("bridge_pos", 0)
        out.append(f"  change log: {human_bytes(log.get('size'))} ring, {human_bytes(lag)} not yet "
                   f"shipped, {log.get('dropped', 0)} record(s) too large (resync)")
    owners = view.get("owners")
    if isinstance(owners, list) and owners:
        per_node = {}
        for node in owners:
            per_node[node] = per_node.get(node, 0) + 1
        out.append(f"  partitions: {len(owners)}, owned per node: "
                   + ", ".join(f"{n}: {c}" for n, c in sorted(per_node.items(), key=lambda x: str(x[0]))))
        backups = [b for b in view.get("backups") or [] if b is not None]
        incoming = view.get("incoming") or {}
        out.append(f"  backup copies: {'on' if backups else 'off'}; partitions still being handed to "
                   f"this host: {len(incoming)}")
    members = view.get("members")
    if isinstance(members, list) and members and all(isinstance(m, dict) for m in members):
        columns = list(dict.fromkeys(k for m in members for k in m))
        out += ["  members:"] + ["  " + line for line in
                                 table(columns, [[_cell(m.get(c)) for c in columns] for m in members])]
    return out


def _cell(value):
    return "-" if value is None else value


def _short(text, width=48):
    return text if len(text) <= width else text[:width - 3] + "..."


def _check_line(check):
    status = check["status"]
    repaired = (f"; first repaired {check['repaired']} stripe(s) left locked by dead processes"
                if check.get("repaired") else "")
    if status == "clean":
        return f"clean (every invariant holds; checked in {check['seconds'] * 1000:.1f} ms{repaired})"
    if status == "problems":
        return f"{len(check['problems'])} PROBLEM(S){repaired}"
    return check["reason"]


def _jsonable(snap, check=None):
    out = dict(snap)
    if "sample" in snap:
        out["sample"] = dict(snap["sample"], entries=[dict(e, key=repr(e["key"]))
                                                      for e in snap["sample"]["entries"]])
    if check is not None:
        out["check"] = check
    return out


# --------------------------------------------------------------------------------------
# command line


def build_parser(prog="inspect_shm.py"):
    p = argparse.ArgumentParser(
        prog=prog,
        description="Show a live Vela cache of this host without waiting for its locks: layout, "
                    "memory, stripe fill, lock holders, stampede leases, stats, sweeper.",
        epilog="exit status: 0 fine; 1 no such cache, or --check found a problem; 2 bad arguments; "
               "3 --check could not run (a lock is held by a stopped process, or stayed held "
               "past --check-timeout)")
    p.add_argument("name", help="the cache name, as given to vela.Cache(name)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="inspect a file-backed cache (backend='file') kept in DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object (one per refresh with --watch)")
    p.add_argument("--check", action="store_true",
                   help="also run the integrity check (takes every lock; skipped when a lock is held "
                        "by a stopped process)")
    p.add_argument("--check-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="longest wait for one lock during --check (default 5)")
    p.add_argument("--keys", type=int, default=0, metavar="N",
                   help="sample N entries: key, value size, remaining TTL (busy stripes are skipped)")
    p.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                   help="refresh every SECONDS until interrupted")
    p.add_argument("--count", type=int, default=None, metavar="N",
                   help="with --watch: stop after N refreshes")
    return p


def main(argv=None, prog="inspect_shm.py", out=None):
    """Command-line entry point; returns the exit status."""
    out = out or sys.stdout
    args = build_parser(prog).parse_args(argv)
    if args.keys < 0 or (args.watch is not None and args.watch <= 0) or args.check_timeout <= 0:
        print(f"{prog}: --keys must be >= 0, --watch and --check-timeout > 0", file=sys.stderr)
        return EXIT_USAGE
    try:
        cache = (attach_file(args.name, args.data_dir, lock_timeout=args.check_timeout) if args.data_dir
                 else attach(args.name, lock_timeout=args.check_timeout))
    except (NoSuchCache, NotATable) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    except LayoutMismatch as e:
        print(f"{prog}: cannot read cache {args.name!r}: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    except (ValueError, VelaError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_PROBLEM

    status = EXIT_OK
    rounds = 0
    try:
        while True:
            snap = snapshot(cache, keys=args.keys)
            check = run_check(cache, snap, args.check_timeout) if args.check else None
            if check is not None:
                status = {"clean": EXIT_OK, "problems": EXIT_PROBLEM}.get(check["status"], EXIT_UNCHECKED)
            if args.json:
                print(json.dumps(_jsonable(snap, check), default=str), file=out)
            else:
                if args.watch is not None and rounds and out.isatty():
                    print("\033[H\033[2J", end="", file=out)
                elif rounds:
                    print("\n" + "-" * 72, file=out)
                print(render(snap, check), file=out)
            out.flush()
            rounds += 1
            if args.watch is None or (args.count is not None and rounds >= args.count):
                break
            time.sleep(args.watch)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `inspect_shm.py NAME | head`
        sys.stderr.close()
    finally:
        cache.close()
    return status
