"""Messages between bridges: msgpack maps, authenticated, bounded, validated.

A message is two frames: an HMAC-SHA256 of the payload under the cluster's
shared secret (empty with --insecure), and the payload. Nothing is decoded
before the MAC checks out, every payload is size-bounded before decoding, and
every field is type- and range-checked before use: a message that fails any
of it raises Malformed and is counted and dropped by the caller. Values travel
as opaque bytes with their codec and are stored as they are; the bridge never
unpickles anything.

Every message names its sender (``from``: node id, 0 for a worker), the
sender's incarnation (``inc``: 64-bit, ordered across restarts of one bridge,
see ``new_incarnation``) and its number ``n`` in what that incarnation sent,
all under the MAC: a receiver refuses an older incarnation and any number it
has seen (``ReplayWindow``). A worker's request on the data port has no
incarnation: its MAC also covers the connection's nonce and the request's
number on that connection (``context``, dataport.py), so it is good once, on
that connection only.
"""

import hashlib
import hmac
import random
import time

import msgpack

from .. import _native

MAX_MESSAGE = 64 << 20
MAX_KEY = 1024
MAX_TAGS = 32
MAX_RECORDS = 100_000
PROTOCOL = 1

# record ops (native/table.h, enum vela_log_op)
PUT, DELETE, FLUSH, TAG = _native.OP_PUT, _native.OP_DELETE, _native.OP_FLUSH, _native.OP_TAG


class Malformed(ValueError):
    """A message that is not authentic or not well-formed."""


def load_secret(path):
    """The cluster's shared secret from its file; ValueError when it is too short."""
    with open(path, "rb") as f:
        secret = f.read().strip()
    if len(secret) < 16:
        raise ValueError("the shared secret must be at least 16 bytes (vela-bridge secret makes one)")
    return secret


def load_curve(path):
    """The cluster's CURVE key pair (public, secret) from its file; ValueError when malformed."""
    with open(path, "rb") as f:
        lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    if len(lines) != 2 or any(len(k) != 40 for k in lines):
        raise ValueError(f"{path}: expected two z85 keys of 40 characters (public, secret), "
                         "as vela-bridge keygen prints them")
    return lines[0], lines[1]


def new_incarnation(after=0):
    """A bridge process's incarnation: wall-clock nanoseconds with the low 20 bits
    random, so a restart of the same node has a larger one (a receiver tells old
    from new) and two bridges started in the same millisecond still differ; above
    ``after`` (the incarnation it replaces) even if the clock went back."""
    inc = (time.time_ns() >> 20 << 20) | random.getrandbits(20)
    return max(inc, after + 1) & (2**64 - 1)


def mac_of(secret, payload, context=b""):
    """HMAC-SHA256 of ``context`` + ``payload`` (empty without a secret)."""
    if not secret:
        return b""
    h = hmac.new(secret, context, hashlib.sha256)
    h.update(payload)
    return h.digest()


def pack(secret, msg, context=b""):
    payload = msgpack.packb(msg, use_bin_type=True)
    return [mac_of(secret, payload, context), payload]


def unpack(secret, frames, context=b""):
    if len(frames) != 2:
        raise Malformed(f"expected 2 frames, got {len(frames)}")
    mac, payload = frames
    if len(payload) > MAX_MESSAGE:
        raise Malformed("message too large")
    if secret:
        if not hmac.compare_digest(mac, mac_of(secret, payload, context)):
            raise Malformed("bad or missing authentication code")
    try:
        # unpackb bounds every container and string by the payload's own size
        msg = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for garbage
        raise Malformed(f"undecodable payload: {type(exc).__name__}") from None
    if not isinstance(msg, dict):
        raise Malformed("payload is not a map")
    kind = msg.get("t")
    if kind not in _CHECKS:
        raise Malformed(f"unknown message type {kind!r}")
    _int(msg, "from", 0, 4095)
    _int(msg, "inc", 0, 2**64 - 1)
    _int(msg, "n", 1, 2**63)
    if msg.get("v") != PROTOCOL:
        raise Malformed(f"protocol version {msg.get('v')!r}, this bridge speaks {PROTOCOL}")
    _CHECKS[kind](msg)
    return msg


class ReplayWindow:
    """The numbers one sender incarnation's messages carried that were accepted:
    anything seen, or older than the window, is refused. Numbers may arrive out
    of order (a sender reaches a peer by a new socket when its address changes)
    or with gaps (a message for another member), but never twice. At first
    contact everything before the first number seen counts as seen."""

    SIZE = 1024

    __slots__ = ("top", "seen")

    def __init__(self):
        self.top = None
        self.seen = 0  # bit i: number top - i was accepted

    def accept(self, n):
        if self.top is None:
            self.top, self.seen = n, (1 << self.SIZE) - 1
            return True
        if n > self.top:
            self.seen = ((self.seen << (n - self.top)) | 1) & ((1 << self.SIZE) - 1)
            self.top = n
            return True
        back = self.top - n
        if back >= self.SIZE or self.seen >> back & 1:
            return False
        self.seen |= 1 << back
        return True


def _int(msg, key, lo, hi):
    v = msg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise Malformed(f"field {key!r} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def _addr(v):
    if not (isinstance(v, str) and v.startswith(("tcp://", "ipc://")) and 6 < len(v) <= 256):
        raise Malformed(f"not a bridge address: {v!r}")


def _str(msg, key, maxlen=256):
    v = msg.get(key)
    if not isinstance(v, str) or not 0 < len(v) <= maxlen:
        raise Malformed(f"field {key!r} must be a non-empty str of at most {maxlen}")
    return v


def _list(msg, key, maxlen):
    v = msg.get(key)
    if not isinstance(v, list) or len(v) > maxlen:
        raise Malformed(f"field {key!r} must be a list of at most {maxlen}")
    return v


def _tags(v):
    if not isinstance(v, list) or len(v) > MAX_TAGS or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**64 for t in v):
        raise Malformed("tags must be a list of at most 32 u64")


def _version(v):
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2**64:
        raise Malformed("version must be a positive u64")


def check_record(r):
    """[op, key, value, codec, ttl_ns, tags, version]"""
    if not isinstance(r, list) or len(r) != 7:
        raise Malformed("a record is a list of 7")
    op, key, value, codec, ttl, tags, version = r
    if isinstance(op, bool) or op not in (PUT, DELETE, FLUSH, TAG):
        raise Malformed(f"unknown record op {op!r}")
    if not isinstance(key, bytes) or len(key) > MAX_KEY or (op in (PUT, DELETE) and not key):
        raise Malformed("bad record key")
    if not isinstance(value, bytes):
        raise Malformed("bad record value")
    if isinstance(codec, bool) or not isinstance(codec, int) or not 0 <= codec <= _native.CODEC_TOMBSTONE:
        raise Malformed("bad record codec")
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not -1 <= ttl < 2**63:
        raise Malformed("bad record ttl")
    _tags(tags)
    if op == TAG and len(tags) != 1:
        raise Malformed("a tag record carries exactly one tag")
    _version(version)


def _check_hello(msg):
    _addr(msg.get("addr"))
    data = msg.get("data")
    if data is not None and not (isinstance(data, str) and data.startswith("vela://") and 8 < len(data) <= 256):
        raise Malformed(f"not a data port address: {data!r}")
    _int(dict(repoch=msg.get("repoch", 0)), "repoch", 0, 2**63)
    if "clash" in msg:  # the incarnation of a bridge that has the sender's node id
        _int(msg, "clash", 0, 2**64 - 1)
    seqs = msg.get("seqs")
    if not isinstance(seqs, dict) or len(seqs) > 1024 or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and -1 <= v < 2**63
            for k, v in seqs.items()):
        raise Malformed("field 'seqs' must map cache names to batch numbers")
    iseqs = msg.get("iseqs", {})
    if not isinstance(iseqs, dict) or len(iseqs) > 1024 or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63
            for k, v in iseqs.items()):
        raise Malformed("field 'iseqs' must map cache names to invalidation message numbers")
    held = msg.get("held", [])
    if not isinstance(held, list) or len(held) > 1024 or not all(isinstance(name, str) for name in held):
        raise Malformed("field 'held' must list cache names")
    for m in _list(msg, "members", 4096):
        if not (isinstance(m, list) and len(m) == 2 and isinstance(m[0], int) and not isinstance(m[0], bool)
                and 0 <= m[0] <= 4095):
            raise Malformed("bad member entry")
        _addr(m[1])


def _check_batch(msg):
    _str(msg, "c")
    _int(msg, "seq", 0, 2**63)
    for r in _list(msg, "recs", MAX_RECORDS):
        check_record(r)


def _check_snapreq(msg):
    _str(msg, "c")
    _int(msg, "req", 0, 2**63)


def _check_snap(msg):
    _str(msg, "c")
    _int(msg, "req", 0, 2**63)
    if not isinstance(msg.get("last"), bool):
        raise Malformed("field 'last' must be a bool")
    for e in _list(msg, "entries", MAX_RECORDS):
        check_record([PUT] + e if isinstance(e, list) else e)
    for t in _list(msg, "tombs", 10**7):
        if not (isinstance(t, list) and len(t) == 2 and isinstance(t[0], bytes) and 0 < len(t[0]) <= MAX_KEY):
            raise Malformed("bad tombstone")
        _version(t[1])
    for t in _list(msg, "tagwm", 10**7):
        if not (isinstance(t, list) and len(t) == 2):
            raise Malformed("bad tag watermark")
        _tags([t[0]])
        _version(t[1])
    _int(msg, "flushwm", 0, 2**64 - 1)


def _check_rpc(msg):
    _str(msg, "c")
    _int(msg, "id", 0, 2**63)
    if msg.get("op") not in ("tag", "flush"):
        raise Malformed("unknown rpc op")
    _version(msg.get("version"))
    if msg["op"] == "tag":
        _tags([msg.get("tag")])


def _check_rpcr(msg):
    _int(msg, "id", 0, 2**63)
    _int(msg, "removed", 0, 2**63)


def _check_resync(msg):
    _str(msg, "c")


def _check_bye(msg):
    pass


# ---- the partitioned topology -----------------------------------------------------

MAX_BATCH_KEYS = 10_000
MAX_PARTITIONS = 65536

def _key(v):
    if not isinstance(v, bytes) or not 0 < len(v) <= MAX_KEY:
        raise Malformed("bad key")


def _bool(msg, key):
    v = msg.get(key, False)
    if not isinstance(v, bool):
        raise Malformed(f"field {key!r} must be a bool")


def _value(v, codec):
    if not isinstance(v, bytes):
        raise Malformed("bad value")
    if isinstance(codec, bool) or not isinstance(codec, int) or not 0 <= codec < _native.CODEC_TOMBSTONE:
        raise Malformed("bad value codec")


def _ttl(msg):
    _int(msg, "ttl", 0, 2**63 - 1)


def _holder(msg):
    _str(msg, "holder", 64)


def _keys(msg):
    for k in _list(msg, "ks", MAX_BATCH_KEYS):
        _key(k)


def _rid(v):
    if not isinstance(v, bytes) or not 8 <= len(v) <= 32:
        raise Malformed("a request id is 8 to 32 bytes")


def _outcome(v):
    """What an incr (an int) or a conditional put (True) that was made answered."""
    if v is not True and (isinstance(v, bool) or not isinstance(v, int) or not -2**63 <= v < 2**63):
        raise Malformed("an outcome is True or an i64")


def _once(msg):
    """The request id of a change made at most once (vela.bridge.outcomes)."""
    if "rid" in msg:
        _rid(msg["rid"])
    if "again" in msg:  # asked again, this many ms after the first try (which got no answer)
        _int(msg, "again", 1, 2**31)


def _put_fields(msg):
    _key(msg.get("k"))
    _value(msg.get("val"), msg.get("codec"))
    _ttl(msg)
    _tags(msg.get("tags"))
    if "holder" in msg:
        _holder(msg)
    _once(msg)


def _cas_fields(msg):
    _put_fields(msg)
    _value(msg.get("xval"), msg.get("xcodec"))  # the expected value, encoded as stored


def _putm_fields(msg):
    for item in _list(msg, "items", MAX_BATCH_KEYS):
        if not isinstance(item, list) or len(item) != 3:
            raise Malformed("a put_many item is [key, value, codec]")
        _key(item[0])
        _value(item[1], item[2])
    _ttl(msg)
    _tags(msg.get("tags"))


def _one_key(msg):
    _key(msg.get("k"))
    _bool(msg, "fb")


def _incr_fields(msg):
    _key(msg.get("k"))
    _int(msg, "delta", -2**63, 2**63 - 1)
    if "init" in msg:  # where a missing counter starts (0 when left out)
        _int(msg, "init", -2**63, 2**63 - 1)
    _ttl(msg)
    _once(msg)


def _touch_fields(msg):
    _key(msg.get("k"))
    _ttl(msg)


def _fetch_fields(msg):
    _key(msg.get("k"))
    _holder(msg)


def _no_fields(msg):
    pass


def _stats_fields(msg):
    _bool(msg, "reset")


def _tag_fields(msg):
    _tags([msg.get("tag")])


def _near_fields(msg):
    if msg.get("tag") is not None:
        _tags([msg["tag"]])


# A worker's request to the owner of a key (or to every member): op -> its fields.
REQUEST_OPS = {
    "get": _one_key, "has": _one_key, "ttl": _one_key, "getm": _keys,
    "put": _put_fields, "add": _put_fields, "repl": _put_fields, "cas": _cas_fields, "putm": _putm_fields,
    "del": _one_key, "delm": _keys,
    "touch": _touch_fields, "incr": _incr_fields, "fetch": _fetch_fields, "abort": _fetch_fields,
    "size": _no_fields, "expire": _no_fields, "stats": _stats_fields, "flush": _no_fields, "tag": _tag_fields,
    "near": _near_fields,
}


def _check_req(msg):
    _str(msg, "c")
    _int(msg, "id", 0, 2**63)
    _int(msg, "e", 0, 2**63)
    if "clk" in msg:  # the worker's clock (partitioned: the owner's clock observes it)
        _version(msg["clk"])
    op = msg.get("op")
    if op not in REQUEST_OPS:
        raise Malformed(f"unknown request op {op!r}")
    REQUEST_OPS[op](msg)


def _check_rep(msg):
    _int(msg, "id", 0, 2**63)


def _check_hand(msg):
    _str(msg, "c")
    _int(msg, "sid", 0, 2**63)
    if msg.get("role") not in ("own", "backup", "repair"):
        raise Malformed("field 'role' must be own, backup or repair")
    if not isinstance(msg.get("last"), bool):
        raise Malformed("field 'last' must be a bool")
    _partitions(msg)
    _int(msg, "chunk", 0, 2**63)  # the chunk's number in its stream ("n" numbers every message)
    for k, ver in _pairs(msg, "tombs", MAX_RECORDS):
        _key(k)
        _version(ver)
    for tag, ver in _pairs(msg, "marks", MAX_RECORDS):
        _tags([tag])
        _version(ver)
    if "fm" in msg:
        _int(msg, "fm", 0, 2**64 - 1)
    if "bseq" in msg:
        _int(msg, "bseq", 0, 2**63)
    if "done" in msg:  # outcomes of changes made at most once: [rid, partition, outcome]
        for t in _list(msg, "done", MAX_RECORDS):
            if not isinstance(t, list) or len(t) != 3:
                raise Malformed("an outcome is [request id, partition, outcome]")
            _rid(t[0])
            _partition(t[1])
            _outcome(t[2])
    entries = _list(msg, "entries", MAX_RECORDS)
    vers = _list(msg, "vers", MAX_RECORDS)
    for v in vers:
        _version(v)
    if len(vers) != len(entries):
        raise Malformed("handoff entries and versions differ in number")
    for e in entries:
        if not isinstance(e, list) or len(e) != 5:
            raise Malformed("a handed-off entry is [key, value, codec, ttl, tags]")
        _key(e[0])
        _entry(*e[1:5])


def _pairs(msg, key, maxlen):
    """An optional list of [a, b] pairs (tombstones [key, version], marks [tag, version])."""
    if key not in msg:
        return []
    pairs = _list(msg, key, maxlen)
    if not all(isinstance(x, list) and len(x) == 2 for x in pairs):
        raise Malformed(f"field {key!r} must be a list of pairs")
    return pairs


def _entry(value, codec, ttl, tags):
    """What an entry holds besides its key (ttl: remaining ns, 0 = none)."""
    _value(value, codec)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl < 2**63:
        raise Malformed("bad entry ttl")
    _tags(tags)


def _check_handack(msg):
    _str(msg, "c")
    _int(msg, "sid", 0, 2**63)
    _partitions(msg)


def _partition(p):
    if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < MAX_PARTITIONS:
        raise Malformed("bad partition number")


def _partitions(msg):
    for p in _list(msg, "ps", MAX_PARTITIONS):
        _partition(p)


def _check_brec(msg):
    _str(msg, "c")
    _int(msg, "seq", 0, 2**63)
    if "clk" in msg:
        _version(msg["clk"])
    for r in _list(msg, "recs", MAX_RECORDS):
        if not isinstance(r, list) or len(r) not in (6, 8):
            raise Malformed("a backup record is [key, value, codec, ttl, tags, version] "
                            "or [key, None, 0, 0, [], version], then [request id, outcome] "
                            "of a change made at most once")
        _key(r[0])
        _version(r[5])
        if r[1] is not None:
            _entry(*r[1:5])
        if len(r) == 8:
            _rid(r[6])
            _outcome(r[7])


def _check_inval(msg):
    _str(msg, "c")
    _int(msg, "seq", 1, 2**63)
    for k in _list(msg, "ks", MAX_RECORDS):
        if k != b"":  # b"": every key (a flush)
            _key(k)


def _check_leaving(msg):
    pass


def _check_brepair(msg):
    _str(msg, "c")
    if "ps" in msg:  # only these partitions (anti-entropy); without: the whole backup copy
        _partitions(msg)


def _check_digest(msg):
    """An owner's anti-entropy round: ``ps`` partitions, ``d`` of each [entries, digest,
    entries, digest] (past a near and a far margin, vela.bridge.partitions)."""
    _str(msg, "c")
    _int(msg, "r", 1, 2**63)
    _partitions(msg)
    digests = _list(msg, "d", MAX_PARTITIONS)
    if len(digests) != len(msg["ps"]) or not all(
            isinstance(d, list) and len(d) == 4 and all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**64 for x in d) for d in digests):
        raise Malformed("field 'd' must hold four u64 [entries, digest, entries, digest] per partition")


def _check_brack(msg):
    _str(msg, "c")
    _int(msg, "seq", 0, 2**63)


_CHECKS = {
    "hello": _check_hello,
    "batch": _check_batch,
    "snapreq": _check_snapreq,
    "snap": _check_snap,
    "rpc": _check_rpc,
    "rpcr": _check_rpcr,
    "resync": _check_resync,
    "bye": _check_bye,
    "req": _check_req,
    "rep": _check_rep,
    "hand": _check_hand,
    "handack": _check_handack,
    "brec": _check_brec,
    "inval": _check_inval,
    "leaving": _check_leaving,
    "brepair": _check_brepair,
    "brack": _check_brack,
    "digest": _check_digest,
}
