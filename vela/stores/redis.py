"""The Redis store: Redis holds the entries; the host table its leases, counters and
(with ``near_cache=True``) L1 copies.

``vela.Cache(name, backend="redis", backend_opts={"url": ...})`` sits on one. Every
method keeps the meaning it has for the shared-memory cache; where Redis makes a
difference, the method says so.

Layout in Redis (``P`` = ``vela:<cache>:``; on Redis Cluster, one ``P`` per virtual
shard, see below):

- ``P v:<key>``  the value: a codec byte + payload (0 bytes, 1 UTF-8 str, 3+ the
  serializer's), or the decimal digits of an int64 so that INCRBY works on it;
- ``P m:<key>``  the set of the entry's tags (only for tagged entries, same TTL);
- ``P t:<tag>``  the set of keys carrying a tag (lives as long as its longest-lived
  member; members that expired are skipped when the tag is invalidated);
- ``P l:<key>``  the stampede lease of a key across hosts (owner token, PX);
- channel ``P inv``  invalidations, published by every write in the same Lua call,
  numbered by ``P iseq`` (vela.stores.near.split_number; a listener that finds a number
  missing drops its host's L1);
- ``P hosts``, ``P hb:<host>``  the hosts whose listener is subscribed (each renews
  its ``hb`` key every heartbeat); ``P ack:<token>``  the hosts' answers to an
  invalidate_tag or flush, which waits for every live host to drop its L1 copies.

``<key>`` is the canonical key encoding (the same bytes on every host).

Redis Cluster (``redis+cluster://`` or ``cluster=True``): a cache is cut into N
virtual shards (``backend_opts['shards']``, default 64), each a namespace
``P = vela:{<cache>:<s>.<j>}:`` whose hash tag puts all of the shard's keys in one
slot, so every Lua script keeps its keys in one shard and stays atomic. A key's shard
is ``xxh3_64(<key>) % N`` (vela.ring.partition_of); a tag has one ``t:`` set per shard
and invalidate_tag, flush and size run per shard and sum. ``j`` is the smallest number
that puts shard ``s``'s slot in the s-th N-th of the 16384 slots: the shards spread
evenly over the slot space, hence over masters holding even slot ranges. N is
recorded once in ``vela:{<cache>}:shards`` (SET NX), so every process agrees; a
handle asking for another N gets LayoutMismatch. Each shard numbers and publishes its
own invalidations on its own channel ``P inv`` (a cluster forwards PUBLISH to every
node: one subscription sees them all); the hosts' registrations and the acks live in
shard 0's namespace. Any other URL is one shard, ``P = vela:<cache>:``, as before.

The host table (a shared-memory segment, ``<cache>.redis-<hash of the URL>`` unless
``backend_opts["l1_segment"]`` names it) always exists: it holds the stampede leases
of the host and the counters of stats(); with ``near_cache=True`` it also holds the
L1 copies (see vela.stores.near and vela.stores.redis_listener).
"""

import functools
import hashlib
import itertools
import logging
import os
import re
import secrets
import socket
import threading
import time
import weakref
from urllib.parse import unquote, urlsplit

import redis
import redis.exceptions as rex
import xxhash
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from .. import _native, options, ring, serializers
from ..errors import (BackendUnavailable, CacheClosed, CacheFull, LayoutMismatch, OptionError, PartialWrite,
                      ValueTooLarge, VelaError)
from ..segments import shm
from ..segments.table import OpenTable
from ..stamp import as_read, reading_stamps
from .base import ALONE, BUSY, HIT, MINE, MISSING, TIMEOUT, count_lookups
from .local import POLL_NS
from .near import FLUSH_ALL, HostElection, NearCache
from .redis_listener import HostAgent, Listener

_MISSING = MISSING  # the one sentinel of the L1 and L2 paths

__all__ = ["RedisStore", "destroy"]

log = logging.getLogger("vela.redis")

_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_INT_FIRST = frozenset(b"-0123456789")
_CODEC_BYTES, _CODEC_STR = _native.CODEC_BYTES, _native.CODEC_STR
_BATCH = 500  # entries per Lua call in put_many / delete_many
_SHARDS = 64  # virtual shards of a cache on Redis Cluster (backend_opts['shards'])
_MAX_SHARDS = 256  # (finding the shards' hash tags costs about N * N CRC16s: 70 ms for 256)
_SLOTS = 16384  # hash slots of a Redis Cluster
# What flush leaves in a shard: the numbering of invalidations and the hosts' listeners.
_BOOKKEEPING = (b"iseq", b"hosts", b"hb:", b"ack:")


def flushed(prefix, keys, everything=False):
    """What a flush unlinks of a shard's ``keys``: (its entries, which it counts; the
    rest: tag sets, leases, and the hosts' bookkeeping only when ``everything``)."""
    values = [k for k in keys if k.startswith(prefix + b"v:")]
    others = [k for k in keys if not k.startswith(prefix + b"v:")
              and (everything or not k[len(prefix):].startswith(_BOOKKEEPING))]
    return values, others

_OPTIONS = {
    "url", "cluster", "socket_timeout", "connect_timeout", "retries", "retry_backoff",
    "l1_segment", "degraded_l1_ttl", "heartbeat", "lease_ttl", "listener", "client_options", "shards",
}

# Errors that mean "Redis cannot be reached now" (retried, then BackendUnavailable).
_UNREACHABLE = (rex.ConnectionError, rex.TimeoutError, rex.ClusterDownError, rex.TryAgainError,
                rex.ReadOnlyError, rex.MasterDownError, OSError,
                # a cluster with no reachable node, or a slot without a master (a failover)
                rex.SlotNotCoveredError, getattr(rex, "RedisClusterUnreachableError", rex.SlotNotCoveredError))

# ---- Lua ---------------------------------------------------------------------------
# Every script that changes an entry publishes the invalidation in the same call, so
# a write is never visible without its invalidation being on its way.

_LUA_HELPERS = """
local P = ARGV[1]
local function untag(enc, mk, keep)
  local old = redis.call('SMEMBERS', mk)
  for i = 1, #old do
    if old[i] ~= keep then redis.call('SREM', P .. 't:' .. old[i], enc) end
  end
  if #old > 0 then redis.call('DEL', mk) end
end
local function add_tag(tag, enc, px)
  local tk = P .. 't:' .. tag
  local cur = redis.call('PTTL', tk)
  redis.call('SADD', tk, enc)
  if px == 0 then
    if cur ~= -1 then redis.call('PERSIST', tk) end
  elseif cur == -2 or (cur >= 0 and cur < px) then
    redis.call('PEXPIRE', tk, px)
  end
end
-- the tag sets of an entry (its meta set mk) follow its new expiry px
local function tags_follow(mk, enc, px)
  local tags = redis.call('SMEMBERS', mk)
  if #tags > 0 then
    if px > 0 then redis.call('PEXPIRE', mk, px) else redis.call('PERSIST', mk) end
    for i = 1, #tags do add_tag(tags[i], enc, px) end
  end
end
local function announce(body)
  local n = redis.call('INCR', P .. 'iseq')
  redis.call('PUBLISH', P .. 'inv', '#' .. string.format('%d', n) .. ':' .. body)
end
local function publish(encs)
  for first = 1, #encs, 1000 do
    local parts = {'m'}
    for i = first, math.min(first + 999, #encs) do
      parts[#parts + 1] = struct.pack('>I4', #encs[i]) .. encs[i]
    end
    announce(table.concat(parts))
  end
end
local function live_hosts()
  local hosts, live = redis.call('SMEMBERS', P .. 'hosts'), {}
  for i = 1, #hosts do
    if redis.call('EXISTS', P .. 'hb:' .. hosts[i]) == 1 then
      live[#live + 1] = hosts[i]
    else
      redis.call('SREM', P .. 'hosts', hosts[i])
    end
  end
  return live
end
"""

# KEYS v1 m1 .. vN mN [lease]; ARGV P px owner ntags tag.. enc1 val1 .. encN valN
_LUA_STORE = _LUA_HELPERS + """
local px, owner, ntags = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local base = 4 + ntags
local n = (#ARGV - base) / 2
local encs = {}
for i = 1, n do
  local vk, mk = KEYS[2 * i - 1], KEYS[2 * i]
  local enc, val = ARGV[base + 2 * i - 1], ARGV[base + 2 * i]
  untag(enc, mk, nil)
  if px > 0 then redis.call('SET', vk, val, 'PX', px) else redis.call('SET', vk, val) end
  if ntags > 0 then
    for j = 1, ntags do
      add_tag(ARGV[4 + j], enc, px)
      redis.call('SADD', mk, ARGV[4 + j])
    end
    if px > 0 then redis.call('PEXPIRE', mk, px) end
  end
  encs[i] = enc
end
if owner ~= '' and redis.call('GET', KEYS[#KEYS]) == owner then redis.call('DEL', KEYS[#KEYS]) end
publish(encs)
return n
"""

# KEYS v m; ARGV P px ntags tag.. enc val -> 1 stored | 0 (a live entry has the key):
# SET NX and the tags in one script, so no reader sees the value without its tags.
_LUA_ADD = _LUA_HELPERS + """
local px, ntags = tonumber(ARGV[2]), tonumber(ARGV[3])
local enc, val = ARGV[4 + ntags], ARGV[5 + ntags]
local set
if px > 0 then set = redis.call('SET', KEYS[1], val, 'NX', 'PX', px)
else set = redis.call('SET', KEYS[1], val, 'NX') end
if not set then return 0 end
untag(enc, KEYS[2], nil)
for j = 1, ntags do
  add_tag(ARGV[3 + j], enc, px)
  redis.call('SADD', KEYS[2], ARGV[3 + j])
end
if ntags > 0 and px > 0 then redis.call('PEXPIRE', KEYS[2], px) end
publish({enc})
return 1
"""


def _set_xx(add_script):
    """The add script with SET XX in place of SET NX: replace is add's rule turned round
    (same tags, expiry and invalidation), kept as one script text."""
    if add_script.count("'NX'") != 2:
        raise RuntimeError("the add script no longer has the two SET NX calls replace is made from")
    return add_script.replace("'NX'", "'XX'")


# KEYS v m; ARGV P px ntags tag.. enc val -> 1 stored | 0 (no live entry has the key)
_LUA_REPLACE = _set_xx(_LUA_ADD)

# KEYS v m; ARGV P enc expected new px -> 1 stored | 0: the stored bytes compared with
# the expected value's encoding and the new value set in one script (atomic in Redis);
# the entry keeps its tags, which follow its new expiry.
_LUA_CAS = _LUA_HELPERS + """
if redis.call('GET', KEYS[1]) ~= ARGV[3] then return 0 end
local px = tonumber(ARGV[5])
if px > 0 then redis.call('SET', KEYS[1], ARGV[4], 'PX', px) else redis.call('SET', KEYS[1], ARGV[4]) end
tags_follow(KEYS[2], ARGV[2], px)
publish({ARGV[2]})
return 1
"""

# KEYS v1 m1 .. vN mN; ARGV P enc1 .. encN
_LUA_DELETE = _LUA_HELPERS + """
local removed, encs = 0, {}
for i = 1, #ARGV - 1 do
  local enc = ARGV[i + 1]
  removed = removed + redis.call('DEL', KEYS[2 * i - 1])
  untag(enc, KEYS[2 * i], nil)
  encs[i] = enc
end
publish(encs)
return removed
"""

# KEYS v m; ARGV P enc px
_LUA_TOUCH = _LUA_HELPERS + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local px = tonumber(ARGV[3])
if px > 0 then redis.call('PEXPIRE', KEYS[1], px) else redis.call('PERSIST', KEYS[1]) end
tags_follow(KEYS[2], ARGV[2], px)
publish({ARGV[2]})
return 1
"""

# KEYS v m; ARGV P enc delta px initial. The result is read back with GET: Lua numbers
# are doubles and would round counters past 2^53. A missing counter starts at initial
# (removed again when the increment fails: nothing half-done stays).
_LUA_INCR = _LUA_HELPERS + """
local existed = redis.call('EXISTS', KEYS[1])
if existed == 0 and ARGV[5] ~= '0' then redis.call('SET', KEYS[1], ARGV[5]) end
local r = redis.pcall('INCRBY', KEYS[1], ARGV[3])
if type(r) == 'table' and r.err then
  if existed == 0 then redis.call('DEL', KEYS[1]) end
  return r
end
if existed == 0 then
  untag(ARGV[2], KEYS[2], nil)
  local px = tonumber(ARGV[4])
  if px > 0 then redis.call('PEXPIRE', KEYS[1], px) end
end
publish({ARGV[2]})
return redis.call('GET', KEYS[1])
"""

# KEYS t; ARGV P tag ack -> {removed, {enc..}, {live host..}}: only entries that carry
# the tag now and live; then the request that every live host acknowledge (ack: a list).
_LUA_INVALIDATE_TAG = _LUA_HELPERS + """
local tag = ARGV[2]
local members = redis.call('SMEMBERS', KEYS[1])
local removed, encs = 0, {}
for i = 1, #members do
  local enc = members[i]
  local mk = P .. 'm:' .. enc
  if redis.call('SISMEMBER', mk, tag) == 1 then
    local n = redis.call('DEL', P .. 'v:' .. enc)
    untag(enc, mk, tag)
    if n == 1 then
      removed = removed + 1
      encs[#encs + 1] = enc
    end
  end
end
redis.call('DEL', KEYS[1])
publish(encs)
announce('a' .. ARGV[3])
return {removed, encs, live_hosts()}
"""

# ARGV P message ack -> {live host..}: announce a message ('' none), then ask every live
# host to acknowledge it (ack '': nobody).
_LUA_ANNOUNCE = _LUA_HELPERS + """
if ARGV[2] ~= '' then announce(ARGV[2]) end
if ARGV[3] == '' then return {} end
announce('a' .. ARGV[3])
return live_hosts()
"""

# The reads the near cache fills L1 from carry the entry's tags (its copy carries them).
# KEYS v m -> false | {value, pttl, {tag..}}
_LUA_READ = """
local v = redis.call('GET', KEYS[1])
if not v then return false end
return {v, redis.call('PTTL', KEYS[1]), redis.call('SMEMBERS', KEYS[2])}
"""

# KEYS v1 m1 .. vN mN -> {value1|false, pttl1|false, {tag..}|false, ...}
_LUA_READ_MANY = """
local out = {}
for i = 1, #KEYS / 2 do
  local v = redis.call('GET', KEYS[2 * i - 1])
  if v then
    out[3 * i - 2] = v
    out[3 * i - 1] = redis.call('PTTL', KEYS[2 * i - 1])
    out[3 * i] = redis.call('SMEMBERS', KEYS[2 * i])
  else
    out[3 * i - 2] = false
    out[3 * i - 1] = false
    out[3 * i] = false
  end
end
return out
"""

# KEYS v lease m; ARGV owner px -> {value, pttl, {tag..}} | 1 (lease taken) | 0 (another owner)
_LUA_READ_OR_LEASE = """
local v = redis.call('GET', KEYS[1])
if v then return {v, redis.call('PTTL', KEYS[1]), redis.call('SMEMBERS', KEYS[3])} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

# KEYS lease; ARGV owner: compare-and-delete
_LUA_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_SCRIPTS = {
    "store": _LUA_STORE, "add": _LUA_ADD, "delete": _LUA_DELETE, "touch": _LUA_TOUCH, "incr": _LUA_INCR,
    "invalidate_tag": _LUA_INVALIDATE_TAG, "read": _LUA_READ, "read_many": _LUA_READ_MANY,
    "read_or_lease": _LUA_READ_OR_LEASE, "release": _LUA_RELEASE, "announce": _LUA_ANNOUNCE,
}
_SCRIPTS.update(replace=_LUA_REPLACE, cas=_LUA_CAS)  # the conditional puts beside add

# ---- options -----------------------------------------------------------------------


class _Opts:
    """backend_opts of the Redis backend, checked; every error names the option."""

    def __init__(self, name, backend_opts, stampede_timeout):
        opts = dict(backend_opts or {})
        unknown = set(opts) - _OPTIONS
        if unknown:
            raise OptionError(f"backend_opts: unknown option{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(sorted(unknown))} (the redis backend takes "
                              f"{', '.join(sorted(_OPTIONS))})")
        self.url = opts.get("url", "redis://127.0.0.1:6379/0")
        if not isinstance(self.url, str) or "://" not in self.url:
            raise OptionError(f"backend_opts['url'] must be a Redis URL (redis://, rediss://, unix://, "
                              f"redis+sentinel://, redis+cluster://), not {self.url!r}")
        self.scheme = self.url.split("://", 1)[0].lower()
        if self.scheme not in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel",
                               "redis+cluster", "rediss+cluster"):
            raise OptionError(f"backend_opts['url']: unknown scheme {self.scheme!r}")
        cluster = opts.get("cluster", False)
        if not isinstance(cluster, bool):
            raise OptionError(f"backend_opts['cluster'] must be True or False, not {cluster!r}")
        self.cluster = cluster or self.scheme.endswith("+cluster")
        if self.cluster and self.scheme in ("unix", "redis+sentinel", "rediss+sentinel"):
            raise OptionError(f"backend_opts['cluster']: a {self.scheme}:// URL is not a cluster")
        shards = opts.get("shards")
        if shards is not None:
            if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= _MAX_SHARDS:
                raise OptionError(f"backend_opts['shards'] must be an int from 1 to {_MAX_SHARDS}, not {shards!r}")
            if not self.cluster:
                raise OptionError("backend_opts['shards'] applies to Redis Cluster only (a redis+cluster:// "
                                  "URL or cluster=True); any other URL keeps a cache in one namespace")
        self.shards = shards
        self.name = name
        secs = _seconds_opt
        self.socket_timeout = secs("socket_timeout", opts.get("socket_timeout", 0.5))
        self.connect_timeout = secs("connect_timeout", opts.get("connect_timeout", 0.5))
        retries = opts.get("retries", 1)
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
            raise OptionError(f"backend_opts['retries'] must be an int from 0 to 10, not {retries!r}")
        self.retries = retries
        backoff = opts.get("retry_backoff", 0.02)
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or not 0 <= backoff <= 5:
            raise OptionError(f"backend_opts['retry_backoff'] must be 0 to 5 seconds, not {backoff!r}")
        self.retry_backoff = float(backoff)
        self.degraded_l1_ttl = secs("degraded_l1_ttl", opts.get("degraded_l1_ttl", 1.0))
        self.heartbeat = secs("heartbeat", opts.get("heartbeat", 0.25))
        # How long invalidate_tag/flush wait for the hosts' listeners to confirm.
        self.ack_timeout = 2 * self.heartbeat + self.socket_timeout
        lease_ttl = opts.get("lease_ttl")
        self.lease_ttl = stampede_timeout if lease_ttl is None else secs("lease_ttl", lease_ttl)
        listener = opts.get("listener", True)
        if not isinstance(listener, bool):
            raise OptionError(f"backend_opts['listener'] must be True or False, not {listener!r}")
        self.listener = listener
        client_options = opts.get("client_options", {})
        if not isinstance(client_options, dict):
            raise OptionError(f"backend_opts['client_options'] must be a dict of redis-py "
                              f"keyword arguments, not {client_options!r}")
        self.client_options = dict(client_options)
        segment = opts.get("l1_segment")
        if segment is None:
            segment = f"{name}.redis-{xxhash.xxh32_hexdigest(self.where.encode())}"
            if len(segment) > 200:
                raise OptionError(f"backend_opts['l1_segment'] is needed: the cache name {name!r} is "
                                  "too long to derive the host table's name from it")
        try:
            self.l1_segment = options.check_name(segment)
        except OptionError as exc:
            raise OptionError(f"backend_opts['l1_segment']: {exc}") from None
        # The namespace of a one-shard cache; a glob of every shard's on a cluster.
        self.namespace = (f"vela:{{{name}:*}}:" if self.cluster else f"vela:{name}:").encode()
        self.shards_record = f"vela:{{{name}}}:shards".encode()

    @property
    def where(self):
        """The URL without credentials (for messages and the host table's name)."""
        return re.sub(r"//[^@/]*@", "//", self.url)

    def bound(self):
        """Seconds a call may take, at most, before BackendUnavailable."""
        per_try = self.connect_timeout + self.socket_timeout
        return (self.retries + 1) * per_try + sum(self.retry_backoff * 2 ** i for i in range(self.retries))


def _seconds_opt(option, value):
    return options.seconds(f"backend_opts['{option}']", value, allow_none=False, allow_inf=False)


def _credentials(kw, parts, scheme):
    """The user, password and TLS of a sentinel or cluster URL, for redis-py's keywords."""
    if parts.password is not None:
        kw.setdefault("password", unquote(parts.password))
    if parts.username:
        kw.setdefault("username", unquote(parts.username))
    if scheme.startswith("rediss"):
        kw.setdefault("ssl", True)


def _make_client(o):
    """A redis-py client for the URL (hiredis is used by redis-py when installed)."""
    kw = dict(socket_timeout=o.socket_timeout, socket_connect_timeout=o.connect_timeout,
              retry=Retry(NoBackoff(), 0))  # vela retries itself, idempotent calls only
    kw.update(o.client_options)
    if o.scheme.endswith("+sentinel"):
        from redis.sentinel import Sentinel

        parts = urlsplit(o.url)
        hosts = []
        for hp in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = hp.rpartition(":") if ":" in hp else (hp, "", "26379")
            hosts.append((host.strip("[]") or "127.0.0.1", int(port or 26379)))
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise OptionError("backend_opts['url']: a sentinel URL names the service: "
                              "redis+sentinel://host:port[,host:port]/service[/db]")
        service, db = path[0], int(path[1]) if len(path) > 1 else 0
        _credentials(kw, parts, o.scheme)
        sentinel_kwargs = dict(socket_timeout=o.socket_timeout, socket_connect_timeout=o.connect_timeout)
        sentinel_kwargs.update(kw.pop("sentinel_kwargs", {}))
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **{k: v for k, v in kw.items()
                                                                        if k != "retry"})
        return sentinel.master_for(service, db=db, **kw)
    if o.cluster:
        from redis.cluster import ClusterNode, RedisCluster

        if o.scheme.endswith("+cluster"):
            parts = urlsplit(o.url)
            nodes = []
            for hp in parts.netloc.rsplit("@", 1)[-1].split(","):
                host, _, port = hp.rpartition(":")
                nodes.append(ClusterNode(host.strip("[]") or "127.0.0.1", int(port or 6379)))
            _credentials(kw, parts, o.scheme)
            return RedisCluster(startup_nodes=nodes, **kw)
        return RedisCluster.from_url(o.url, **kw)
    return redis.Redis.from_url(o.url, **kw)


# ---- shards --------------------------------------------------------------------------


class Shards:
    """The namespaces (prefixes ``P``) of a cache's virtual shards; shard 0 is its home
    (hosts' registrations, acks). One shard, ``vela:<cache>:``, unless on a cluster."""

    def __init__(self, name, count, cluster):
        if cluster:
            self.prefixes = [f"vela:{{{_shard_tag(name, s, count)}}}:".encode() for s in range(count)]
        else:
            self.prefixes = [f"vela:{name}:".encode()]
        self.count = len(self.prefixes)
        self.home = self.prefixes[0]
        self._index = {p: s for s, p in enumerate(self.prefixes)}

    def of(self, enc):
        """The prefix of the shard holding the encoded key ``enc``."""
        if self.count == 1:
            return self.home
        return self.prefixes[ring.partition_of(enc, self.count)]

    def group(self, encs):
        """{prefix: [position in encs, ..]} in the order of first appearance."""
        groups = {}
        for i, enc in enumerate(encs):
            groups.setdefault(self.of(enc), []).append(i)
        return groups

    def split(self, key):
        """(prefix, rest) of a Redis key of this cache; (None, key) for any other key."""
        if self.count == 1:
            return (self.home, key[len(self.home):]) if key.startswith(self.home) else (None, key)
        end = key.find(b"}:")
        prefix = key[:end + 2]
        return (prefix, key[end + 2:]) if end >= 0 and prefix in self._index else (None, key)


def _shard_tag(name, shard, count):
    """The hash tag of ``shard``: ``<name>:<shard>.<j>``, j the first that hashes into the
    shard's N-th of the slots (about N tries of CRC16 each)."""
    for j in itertools.count():
        tag = f"{name}:{shard}.{j}"
        if key_slot(tag.encode()) * count // _SLOTS == shard:
            return tag


@functools.lru_cache(maxsize=64)
def _cluster_shards(name, count):
    """Shards of a cluster cache (computed once per process: see _shard_tag)."""
    return Shards(name, count, True)


def _resolve_shards(client, o):
    """The cache's Shards: on a cluster, the count recorded in Redis (recorded now if
    absent). Raises redis errors, or LayoutMismatch when ``o.shards`` disagrees."""
    if not o.cluster:
        return Shards(o.name, 1, False)
    old = client.set(o.shards_record, o.shards or _SHARDS, nx=True, get=True)
    count = int(old) if old is not None else o.shards or _SHARDS
    if o.shards is not None and count != o.shards:
        raise LayoutMismatch(f"backend_opts['shards']={o.shards}, but the cache {o.name!r} in Redis at "
                             f"{o.where} has {count} shards (vela.destroy it to change)")
    return _cluster_shards(o.name, count)


# ---- values ------------------------------------------------------------------------


def _tag_bytes(tags):
    """The (checked) tags as Redis keeps them: UTF-8 bytes."""
    return tuple(t.encode("utf-8") for t in tags)


def _px(ns):
    """PX milliseconds (0: never) from table nanoseconds (0: never), rounded up."""
    return 0 if ns == 0 else max(1, -(-ns // 1_000_000))


def _remaining_ns(pttl):
    return 0 if pttl is None or pttl < 0 else max(1, pttl) * 1_000_000


def _tag_names(raw):
    """The tags of an entry as its tag set in Redis holds them (UTF-8 bytes): str."""
    return [t.decode("utf-8") for t in raw or ()]


# ---- fork ----------------------------------------------------------------------------

_fork_generation = 0
_live = weakref.WeakSet()


def _after_fork_in_child():
    global _fork_generation
    _fork_generation += 1
    for cache in list(_live):
        cache._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class RedisStore:
    """A cache whose entries live in Redis, shared by every host that uses the same URL.

    ``backend_opts`` (checked here; the other options by :class:`vela.Cache`):

    :param url: ``redis://``, ``rediss://`` (TLS), ``unix://``, ``redis+sentinel://host:port[,..]/service[/db]``
        or ``redis+cluster://host:port[,..]`` (default ``redis://127.0.0.1:6379/0``).
    :param cluster: True to treat a ``redis://`` URL as a Redis Cluster node.
    :param socket_timeout: seconds a command may take (0.5). :param connect_timeout: (0.5).
    :param retries: retries of an idempotent call after a connection error or timeout (1).
    :param retry_backoff: seconds before the first retry, doubled each time (0.02).
    :param l1_segment: name of the host table (default derived from the name and URL).
    :param degraded_l1_ttl: maximum age of L1 copies made while no listener is healthy (1.0).
    :param heartbeat: seconds between the listener's pings and election attempts (0.25).
    :param lease_ttl: seconds the cross-host stampede lease lives (default stampede_timeout).
    :param listener: False: this handle never becomes its host's listener (True).
    :param client_options: extra keyword arguments for redis-py (e.g. TLS certificates).
    :param shards: Redis Cluster only: the virtual shards the cache is spread over (64),
        recorded with the cache in Redis; a handle that gives another number gets
        :class:`vela.LayoutMismatch`, one that gives none adopts the recorded one.

    A call that cannot reach Redis raises :class:`vela.BackendUnavailable` after at
    most ``(retries + 1) * (connect_timeout + socket_timeout)`` plus the backoffs.
    """

    remote = True
    hit = None  # (every read needs the store's logic: vela.stores.base.Store.hit)

    def __init__(self, name, backend_opts, *, layout, serializer, stats_enabled, lock_timeout, sweep_interval,
                 stampede_timeout):
        self._closed = True  # until the end of __init__: close() then has nothing to undo
        self._agent = None
        self._client = None
        self.name = name
        self._dumps, self._codec, self._loaders = serializers.resolve(serializer)
        o = self._o = _Opts(self.name, backend_opts, stampede_timeout)
        # On a cluster the shard count is read from Redis with the first client.
        self._shards = None if o.cluster else Shards(name, 1, False)
        self._lease_px = max(1, int(o.lease_ttl * 1000))

        # The host table: L1 copies (stats off: this store counts itself) ...
        self._l1_opened = OpenTable(o.l1_segment, "shm", None, layout, serializer=serializer, stats_enabled=False,
                                    lock_timeout=lock_timeout, sweep_interval=sweep_interval)
        try:
            # ... and a second handle on it whose only job is this cache's counters.
            self._counters_opened = OpenTable(o.l1_segment, "shm", None, serializer=serializer,
                                              stats_enabled=stats_enabled, lock_timeout=lock_timeout)
        except BaseException:
            self._l1_opened.close()
            raise
        self.table = self._table = self._l1_opened.table
        self._counters = self._counters_opened.table
        self._bump = self._counters.bump
        self._max_entry = self._table.info()["max_entry_size"]
        self._client_generation = -1
        self._direct = None
        self._local = None
        self._shas = {}
        self._near = None  # the L1 whose invalidations this host's listener applies (vela.stores.near)
        self._closed = False
        _live.add(self)

    # ---- plumbing ------------------------------------------------------------------

    # ---- behind a near cache (vela.stores.near.NearStore) ----------------------------

    def near_cache(self, l1_ttl):
        """The L1 in the host table for a near cache in front of this store; starts this
        host's invalidation listener (one per host, elected), unless
        ``backend_opts['listener']`` is False. Every write here publishes its
        invalidation in the same Lua call; the listener applies it to L1."""
        o = self._o
        self._near = NearCache(self._table, l1_ttl, o.degraded_l1_ttl, marker_ttl=4 * o.heartbeat)
        if o.listener:
            try:
                prefixes = (lambda client: _resolve_shards(client, o).prefixes) if o.cluster else o.namespace
                listener = Listener(self._near, lambda: _make_client(o), prefixes,
                                    host=socket.gethostname() + shm.segment_name(o.l1_segment),
                                    heartbeat=o.heartbeat, timeout=o.socket_timeout + o.connect_timeout,
                                    cross_node=o.cluster)
                self._agent = HostAgent(HostElection(o.l1_segment), listener, poll=o.heartbeat, owner=self)
                self._agent.try_lead_now()
                self._agent.start(self.name)
            except BaseException:
                self.close()
                raise
        return self._near

    def count(self, counter, n=1):
        """Count ``n`` on the host's counters (stats())."""
        self._bump(counter, n)

    def read(self, key):
        """The L2 read of the near cache (uncounted): (value or MISSING, remaining ns, tags)."""
        enc = _native.encode_key(key)
        r = self._run("read", [self._vkey(enc), self._mkey(enc)], [])
        if r is None:
            return MISSING, 0, ()
        return self._decode(r[0]), _remaining_ns(r[1]), _tag_names(r[2])

    def read_many(self, keys):
        """``read`` of several keys, one round trip per shard, in the order of ``keys``."""
        encs = [_native.encode_key(k) for k in keys]
        out = [None] * len(keys)
        for group in self._layout().group(encs).values():
            names = []
            for i in group:
                names += (self._vkey(encs[i]), self._mkey(encs[i]))
            r = self._run("read_many", names, [])
            for j, i in enumerate(group):
                out[i] = ((MISSING, 0, ()) if r[3 * j] is None else
                          (self._decode(r[3 * j]), _remaining_ns(r[3 * j + 1]), _tag_names(r[3 * j + 2])))
        return out

    def _after_fork(self):
        self._client = None  # the parent's sockets stay the parent's
        self._local = None
        if self._agent is not None and not self._closed:
            self._agent.after_fork()
            self._agent.start(self.name)

    def _redis(self):
        """This process's client (created lazily, and again after a fork)."""
        if self._closed:
            raise CacheClosed("the cache handle is closed")
        if self._client is None or self._client_generation != _fork_generation:
            client = _make_client(self._o)
            pool = getattr(client, "connection_pool", None)
            # Plain Redis: each thread keeps one connection of its own and talks to it
            # directly; going through the client's pool costs more than the round trip
            # itself on a unix socket. Sentinel and Cluster route through the client.
            self._direct = pool if type(pool) is redis.ConnectionPool else None
            self._local = threading.local()
            self._shas = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in _SCRIPTS.items()}
            self._owner_prefix = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}:".encode()
            self._owner_seq = itertools.count()
            if self._o.cluster:
                self._shards = _resolve_shards(client, self._o)
            self._client = client
            self._client_generation = _fork_generation
        return self._client

    def _command(self, *args):
        """One command, on this thread's connection (raw reply) or through the client."""
        if self._closed or self._client is None or self._client_generation != _fork_generation:
            self._redis()
        pool = self._direct
        if pool is None:
            return self._client.execute_command(*args)
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = pool.connection_class(**pool.connection_kwargs)
        try:
            conn.send_command(*args)
            return conn.read_response()
        except rex.ResponseError:
            raise  # the reply was read whole: the connection stays usable
        except BaseException:
            conn.disconnect()  # a timeout or an error mid-reply: start afresh next time
            raise

    def _call(self, args, idempotent=True):
        """Run a command; connection errors and timeouts are retried (idempotent calls
        only) and end as BackendUnavailable, Redis's own errors are translated."""
        attempts = self._o.retries + 1 if idempotent else 1
        last = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self._o.retry_backoff * 2 ** (attempt - 1))
            try:
                try:
                    return self._command(*args)
                except rex.NoScriptError:
                    # A restarted or failed-over server forgot the scripts: load, run again.
                    self._command("SCRIPT", "LOAD", _SCRIPTS[self._script_of(args[1])])
                    return self._command(*args)
            except rex.ResponseError as exc:
                if isinstance(exc, _UNREACHABLE):
                    last = exc
                    continue
                raise self._translate(exc) from exc
            except _UNREACHABLE as exc:
                last = exc
            except rex.RedisError as exc:
                raise VelaError(f"Redis at {self._o.where}: {exc}") from exc
        raise BackendUnavailable(f"Redis at {self._o.where} is unavailable: {last}") from last

    def _call_client(self, fn):
        """``fn(client)`` for what is not one command (SCAN), with the same errors."""
        try:
            return fn(self._redis())
        except rex.ResponseError as exc:
            if isinstance(exc, _UNREACHABLE):
                raise BackendUnavailable(f"Redis at {self._o.where} is unavailable: {exc}") from exc
            raise self._translate(exc) from exc
        except _UNREACHABLE as exc:
            raise BackendUnavailable(f"Redis at {self._o.where} is unavailable: {exc}") from exc
        except rex.RedisError as exc:
            raise VelaError(f"Redis at {self._o.where}: {exc}") from exc

    def _call_many(self, commands):
        """Several idempotent commands (each within one shard) in one pipeline; a
        cluster sends each node its share. Retried and translated as ``_call``."""
        if len(commands) == 1:
            return [self._call(commands[0])]

        def run(client):
            pipe = client.pipeline(transaction=False)
            for args in commands:
                pipe.execute_command(*args)
            return pipe.execute()

        for attempt in range(self._o.retries + 1):
            if attempt:
                time.sleep(self._o.retry_backoff * 2 ** (attempt - 1))
            try:
                return self._call_client(run)
            except BackendUnavailable:
                if attempt == self._o.retries:
                    raise

    def _script_of(self, sha):
        return next(name for name, h in self._shas.items() if h == sha)

    def _run(self, script, keys, args, idempotent=True):
        if self._client is None or self._client_generation != _fork_generation:
            self._redis()
        return self._call(("EVALSHA", self._shas[script], len(keys), *keys, *args), idempotent)

    def _translate(self, exc):
        msg = str(exc)
        if msg.startswith("OOM"):
            return CacheFull(f"Redis at {self._o.where} is out of memory: {msg}")
        if msg.startswith(("LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "READONLY")):
            return BackendUnavailable(f"Redis at {self._o.where} is unavailable: {msg}")
        return VelaError(f"Redis at {self._o.where}: {msg}")

    # Key naming: every Redis key of an entry comes from these helpers. A script given
    # an entry's keys takes ``self._prefix(enc)`` as its ARGV[1] (its shard's ``P``).

    def _layout(self):
        """The Shards of this cache (on a cluster, read from Redis the first time)."""
        shards = self._shards
        if shards is None:
            shards = self._call_client(lambda client: self._shards)
        return shards

    @property
    def _P(self):
        """The home shard's prefix (the only one off a cluster)."""
        return self._layout().home

    def _prefix(self, enc):
        """The prefix ``P`` of the shard holding the encoded key ``enc``."""
        return (self._shards or self._layout()).of(enc)

    def _vkey(self, enc):
        return self._prefix(enc) + b"v:" + enc

    def _mkey(self, enc):
        return self._prefix(enc) + b"m:" + enc

    def _lkey(self, enc):
        return self._prefix(enc) + b"l:" + enc

    def _encode(self, value):
        t = type(value)
        if t is bytes:
            return b"\x00" + value
        if t is str:
            try:
                return b"\x01" + value.encode("utf-8")
            except UnicodeEncodeError:
                pass  # lone surrogates: the serializer's business, as in the table
        elif t is int and _I64_MIN <= value <= _I64_MAX:
            return b"%d" % value
        try:
            data = self._dumps(value)
        except Exception as exc:
            raise TypeError(f"cannot serialize a value of type {t.__name__}: {exc}") from exc
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"the serializer returned {type(data).__name__}, not bytes")
        return bytes((self._codec,)) + bytes(data)

    def _decode(self, raw):
        if not raw:
            raise VelaError(f"Redis at {self._o.where}: an empty value under this cache's prefix "
                            "(not written by Vela?)")
        first = raw[0]
        if first in _INT_FIRST:
            return int(raw)
        if first == _CODEC_BYTES:
            return raw[1:]
        if first == _CODEC_STR:
            return raw[1:].decode("utf-8")
        loads = self._loaders.get(first)
        if loads is None:
            raise VelaError(f"a value written with codec {first}, which this handle cannot read "
                            "(a custom serializer on the writer?)")
        return loads(raw[1:])

    def _entry(self, key, value, tags=()):
        """(encoded key, encoded value), checked against max_entry_size."""
        enc = _native.encode_key(key)
        raw = self._encode(value)
        size = len(enc) + len(raw) + sum(len(t) for t in tags) + _native.ENTRY_OVERHEAD
        if size > self._max_entry:
            raise ValueTooLarge(f"entry of {size} bytes is bigger than max_entry_size "
                                f"({self._max_entry} bytes)")
        return enc, raw

    def _store(self, entries, ns, tags, owner=b"", lease_key=None):
        """Write entries [(enc, raw)] of one shard in one Lua call (publishes their invalidation)."""
        self._run("store", *self._store_call(entries, ns, tags, owner, lease_key))

    def _store_call(self, entries, ns, tags, owner=b"", lease_key=None):
        """(keys, args) of the "store" script for entries [(enc, raw)] of one shard (the
        async API sends it too)."""
        keys, vals = [], []
        for enc, raw in entries:
            keys += (self._vkey(enc), self._mkey(enc))
            vals += (enc, raw)
        if lease_key is not None:
            keys.append(lease_key)
        return keys, [self._prefix(entries[0][0]), _px(ns), owner, len(tags), *tags, *vals]

    def _check_open(self):
        if self._closed:
            raise CacheClosed("the cache handle is closed")

    # ---- reading ---------------------------------------------------------------------

    def get(self, key, default=None):
        """The value stored under ``key``, or ``default`` when absent or expired."""
        self._check_open()
        enc = _native.encode_key(key)
        raw = self._call(("GET", self._vkey(enc)))
        if raw is None:
            self._bump("misses")
            return default
        self._bump("hits")
        return self._decode(raw)

    def contains(self, key):
        """True when a live entry is stored under ``key`` (not counted as a hit or miss)."""
        self._check_open()
        enc = _native.encode_key(key)
        return self._call(("EXISTS", self._vkey(enc))) == 1

    def ttl(self, key):
        """(found, remaining ns; -1 when it never expires), from Redis's PTTL."""
        self._check_open()
        enc = _native.encode_key(key)
        pttl = self._call(("PTTL", self._vkey(enc)))
        if pttl == -2:
            return False, 0
        return True, -1 if pttl == -1 else pttl * 1_000_000

    def get_many(self, keys):
        """``{key: value}`` for the keys that are present (absent keys are left out)."""
        self._check_open()
        if not keys:
            found = {}
        else:
            encs = [_native.encode_key(k) for k in keys]
            groups = list(self._layout().group(encs).values())  # one MGET per shard
            replies = self._call_many([("MGET", *[self._vkey(encs[i]) for i in group]) for group in groups])
            raws = [None] * len(keys)
            for group, reply in zip(groups, replies):
                for i, raw in zip(group, reply):
                    raws[i] = raw
            found = {k: self._decode(raw) for k, raw in zip(keys, raws) if raw is not None}
        count_lookups(self._bump, keys, found)
        return found

    # ---- writing ---------------------------------------------------------------------

    def put(self, key, value, ns, tags):
        """Store ``value`` under ``key`` in Redis; every host's L1 copy is dropped.

        :raises vela.BackendUnavailable: Redis cannot be reached.
        """
        self._check_open()
        tags = _tag_bytes(tags)
        entry = self._entry(key, value, tags)
        self._store([entry], ns, tags)
        self._bump("writes")

    def add(self, key, value, ns, tags):
        """Store ``value`` under ``key`` only if Redis holds no live entry of it (``SET NX``,
        with its tags in the same script); True when stored. Atomic across hosts."""
        self._check_open()
        tags = _tag_bytes(tags)
        enc, raw = self._entry(key, value, tags)
        stored = bool(self._run("add", [self._vkey(enc), self._mkey(enc)],
                                [self._prefix(enc), _px(ns), len(tags), *tags, enc, raw], idempotent=False))
        if stored:
            self._bump("writes")
        return stored

    def replace(self, key, value, ns, tags):
        """Store ``value`` under ``key`` only if Redis holds a live entry of it (``SET XX``,
        with its tags in the same script); True when stored. Atomic across hosts."""
        self._check_open()
        tags = _tag_bytes(tags)
        enc, raw = self._entry(key, value, tags)
        stored = bool(self._run("replace", [self._vkey(enc), self._mkey(enc)],
                                [self._prefix(enc), _px(ns), len(tags), *tags, enc, raw]))
        if stored:
            self._bump("writes")
        return stored

    def cas(self, key, expected, new, ns):
        """Store ``new`` only if the stored bytes are ``expected``'s encoding, compared and
        set in one Lua script (atomic across hosts); True when stored. Not retried after a
        timeout (a second try would answer False for a change that was made)."""
        self._check_open()
        enc, raw = self._entry(key, new)
        stored = bool(self._run("cas", [self._vkey(enc), self._mkey(enc)],
                                [self._prefix(enc), enc, self._encode(expected), raw, _px(ns)],
                                idempotent=False))
        if stored:
            self._bump("writes")
        return stored

    def put_many(self, items, ns, tags):
        """Store every item, in Lua calls of 500 per shard (each call all or nothing);
        every item is checked before the first is stored. A call that fails after some
        were stored raises vela.PartialWrite naming the keys of the calls that succeeded."""
        self._check_open()
        tags = _tag_bytes(tags)
        entries = [self._entry(k, v, tags) for k, v in items]
        calls = [group[i:i + _BATCH] for group in self._layout().group([e[0] for e in entries]).values()
                 for i in range(0, len(group), _BATCH)]
        done = []  # positions in items of the calls that succeeded
        try:
            for call in calls:
                self._store([entries[i] for i in call], ns, tags)
                done += call
        except BackendUnavailable as exc:
            if not done:
                raise
            stored = {items[i][0] for i in done}
            failed = {k for k, _ in items} - stored
            raise PartialWrite(f"put_many stored {len(stored)} of {len(stored) + len(failed)} keys: {exc} "
                               "(.stored and .failed name them)", stored, failed) from exc
        finally:
            if done:
                self._bump("writes", len(done))

    def _delete_encs(self, encs):
        removed = 0
        for group in self._layout().group(encs).values():
            for i in range(0, len(group), _BATCH):
                chunk = [encs[j] for j in group[i:i + _BATCH]]
                keys = []
                for enc in chunk:
                    keys += (self._vkey(enc), self._mkey(enc))
                removed += self._run("delete", keys, [self._prefix(chunk[0]), *chunk])
        return removed

    def delete(self, key):
        """Remove ``key``; True when something was removed."""
        self._check_open()
        removed = self._delete_encs([_native.encode_key(key)]) == 1
        if removed:
            self._bump("deletes")
        return removed

    def delete_many(self, keys):
        """Remove the keys; returns how many were removed."""
        self._check_open()
        removed = self._delete_encs([_native.encode_key(k) for k in keys]) if keys else 0
        if removed:
            self._bump("deletes", removed)
        return removed

    def touch(self, key, ns):
        """Give ``key`` a new time to live; True when it exists."""
        self._check_open()
        enc = _native.encode_key(key)
        done = self._run("touch", [self._vkey(enc), self._mkey(enc)], [self._prefix(enc), enc, _px(ns)]) == 1
        return done

    def incr(self, key, delta, ns, initial=0):
        """Add ``delta`` to the integer under ``key`` atomically (INCRBY) across hosts; a
        missing key starts at ``initial``. Not retried after a timeout (it might have been
        applied)."""
        self._check_open()
        enc = _native.encode_key(key)
        try:
            raw = self._run("incr", [self._vkey(enc), self._mkey(enc)],
                            [self._prefix(enc), enc, delta, _px(ns), initial],
                            idempotent=False)
        except VelaError as exc:
            msg = str(exc)
            if "overflow" in msg:
                raise OverflowError("incr: the result leaves the signed 64-bit range") from None
            if "not an integer" in msg:
                raise TypeError("incr: the stored value is not an integer") from None
            raise
        self._bump("writes")
        return int(raw)

    # ---- get_or_fetch ------------------------------------------------------------------

    # Stampede protection at two levels: on this host, one process holds the table's
    # lease for the key while the others wait on it (as for the shared table); across
    # hosts, that process takes a Redis lease (SET NX PX with an owner token, released
    # by compare-and-delete) or, when another host holds it, polls Redis until the
    # value appears, the lease goes, or the budget passes (then it fetches itself).
    # The lease handed to vela.Cache: (host token, Redis owner token, lease key), or
    # None when nothing is held.

    def fetch_begin(self, key, protect, budget_ns, reserve=None):
        """(see vela.stores.base.Store) ``reserve``: a near cache's, called just before
        Redis is read; it returns ``fill(value, remaining_ns, tags)``, called with what
        was read (the near cache keeps its copy unless an invalidation came between)."""
        self._check_open()
        host_token, waited = None, False
        if protect:
            status, value, host_token, waited = self._table.fetch_begin(key, budget_ns, POLL_NS)
            if waited:
                self._bump("stampede_waits")
            if status == HIT:  # an L1 copy (a near cache shares the host table)
                self._bump("hits")
                return HIT, value, None, waited
            if status == BUSY:  # budget 0: another process of the host fetches
                return BUSY, None, None, False
            if status == TIMEOUT:
                self._bump("stampede_timeouts")
        try:
            status, value, lease, waited = self._begin_in_redis(key, budget_ns, waited,
                                                                protect and host_token is not None, reserve)
        except BaseException:
            if host_token is not None:
                self._table.fetch_abort(host_token)
            raise
        if status in (HIT, BUSY):
            if host_token is not None:
                # Released as "not stored": the next waiter of the host takes the lease
                # and finds the value in L1 (filled under a reservation) or in Redis.
                self._table.fetch_abort(host_token)
            return status, value, None, waited
        return status, None, (host_token,) + lease, waited

    def _begin_in_redis(self, key, budget_ns, waited, lease, reserve):
        """(HIT, value, None, waited) or (MINE/ALONE, None, (owner, lease key), waited)."""
        fill = reserve() if reserve is not None else None
        enc = _native.encode_key(key)
        vkey, lkey = self._vkey(enc), self._lkey(enc)
        owner = b""
        if lease:
            self._redis()
            owner = self._owner_prefix + b"%d" % next(self._owner_seq)
            deadline = time.monotonic() + budget_ns / 1e9
            pause = 0.002
            while True:
                r = self._run("read_or_lease", [vkey, lkey, self._mkey(enc)], [owner, self._lease_px])
                if isinstance(r, list):
                    with reading_stamps():  # (a copy keeps a stamped value's stamp)
                        value = self._decode(r[0])
                    if fill is not None:
                        fill(value, _remaining_ns(r[1]), _tag_names(r[2]))
                    self._bump("hits")
                    return HIT, as_read(value), None, waited
                if r == 1:
                    break  # the lease is ours: fetch
                if budget_ns == 0:  # a try only: a process of another host fetches
                    return BUSY, None, None, waited
                if not waited:
                    waited = True
                    self._bump("stampede_waits")
                left = deadline - time.monotonic()
                if left <= 0:
                    self._bump("stampede_timeouts")
                    owner = b""
                    break
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.05)
        else:
            if fill is not None:
                with reading_stamps():
                    value, remaining_ns, tags = self.read(key)
                if value is not _MISSING:
                    fill(value, remaining_ns, tags)
                value = as_read(value)
            else:
                raw = self._call(("GET", vkey))
                value = _MISSING if raw is None else self._decode(raw)
            if value is not _MISSING:
                self._bump("hits")
                return HIT, value, None, waited
        self._bump("misses")
        return (MINE if owner else ALONE), None, (owner, lkey), waited

    def fetch_complete(self, key, lease, value, ns, tags):
        host_token, owner, lkey = lease or (None, b"", None)
        try:
            self._bump("fetches")
            tags = _tag_bytes(tags)
            try:
                entry = self._entry(key, value, tags)
                self._store([entry], ns, tags, owner, lkey if owner else None)
            except BaseException as exc:
                if owner:
                    self._release_lease(lkey, owner)
                if isinstance(exc, CacheFull):
                    return  # the caller still gets its value
                raise
            self._bump("writes")
        finally:
            if host_token is not None:
                self._table.fetch_abort(host_token)

    def fetch_abort(self, key, lease):
        if lease is None:
            return
        host_token, owner, lkey = lease
        try:
            if owner:
                self._release_lease(lkey, owner)
        finally:
            if host_token is not None:
                self._table.fetch_abort(host_token)

    def _release_lease(self, lkey, owner):
        try:
            self._run("release", [lkey], [owner])
        except VelaError:
            pass  # it expires by itself (lease_ttl)

    # ---- tags, flush, size --------------------------------------------------------------

    def invalidate_tag(self, tag, drop_copies=None):
        """Remove every entry carrying ``tag`` (one atomic Lua call per shard); returns
        how many live entries were removed. Returns once every host whose near-cache
        listener is subscribed has dropped its copies of them.

        :raises vela.BackendUnavailable: a host did not confirm (the entries are removed
            in Redis; that host's copies live until it is found stalled, or their age),
            or a shard could not be reached (the shards before it are done: call again).
        """
        self._check_open()
        b = tag.encode("utf-8")
        ack = self._ack_key()
        count, encs, hosts = 0, [], []
        prefixes = self._layout().prefixes
        for prefix in prefixes:
            # Each shard asks for the ack after its own invalidations (in its stream);
            # the hosts registered in the home shard answer once per shard.
            n, removed, live = self._run("invalidate_tag", [prefix + b"t:" + b], [prefix, b, ack])
            count += n
            encs += removed
            hosts = live if prefix == prefixes[0] else hosts
        if count:
            self._bump("invalidations", count)
        if drop_copies is not None:
            drop_copies([_native.decode_key(enc) for enc in encs])
        self._confirm(ack, hosts, f"invalidate_tag removed {count} entries", times=len(prefixes))
        return count

    def _ack_key(self):
        return self._P + b"ack:" + secrets.token_hex(8).encode()

    def _confirm(self, ack, hosts, done, times=1):
        """Wait until every host in ``hosts`` answered ``times`` on the list ``ack`` (its
        listener applied every invalidation published before the requests), ack_timeout
        at most."""
        due = {h.decode() if isinstance(h, bytes) else h: times for h in hosts}
        waiting = set(due)
        deadline = time.monotonic() + self._o.ack_timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendUnavailable(
                    f"{done} in Redis at {self._o.where}, but the near cache of host(s) {', '.join(sorted(waiting))} "
                    f"did not confirm dropping its copies within {self._o.ack_timeout:g} s (a stalled "
                    "listener: its host drops them when the others see it, else they live their L1 age)")
            answer = self._call(("BLPOP", ack, "%.3f" % max(0.001, min(left, self._o.socket_timeout / 2))),
                                idempotent=False)
            if answer:
                host = answer[1].decode()
                due[host] = due.get(host, 1) - 1
                if due[host] <= 0:
                    waiting.discard(host)
        if hosts:
            self._call(("UNLINK", ack))

    def _scan(self, match):
        return self._call_client(lambda client: list(client.scan_iter(match=match, count=1000)))

    def flush(self, drop_copies=None):
        """Remove every entry of this cache from Redis (SCAN + UNLINK of its prefix only,
        never FLUSHDB) and drop every host's L1; returns how many entries were removed.
        Costs a SCAN of the whole Redis database. Returns once every host whose
        near-cache listener is subscribed has dropped its L1 (see invalidate_tag)."""
        self._check_open()
        count = self._flush_redis()
        if drop_copies is not None:
            drop_copies(None)
        ack = self._ack_key()
        home = self._P  # (the script's key only routes it to the home shard's node)
        hosts = self._run("announce", [home + b"hosts"], [home, FLUSH_ALL, ack])
        self._confirm(ack, hosts, f"flush removed {count} entries")
        return count

    def _keys_by_shard(self, kind=b""):
        """{prefix: [key, ..]} of the Redis keys of this cache whose name goes on with
        ``kind`` (b"v:": the entries) after their shard's prefix (one SCAN of the
        database; on a cluster, of every master)."""
        shards = self._layout()
        found = {}
        for key in self._scan(self._o.namespace + kind + b"*"):
            prefix, rest = shards.split(key)
            if prefix is not None and rest.startswith(kind):
                found.setdefault(prefix, []).append(key)
        return found

    def _flush_redis(self, everything=False):
        """Remove the entries, shard by shard; the hosts' bookkeeping too when ``everything``."""
        count = 0
        for prefix, keys in self._keys_by_shard().items():
            values, others = flushed(prefix, keys, everything)
            for i in range(0, len(values), 1000):
                count += self._call(("UNLINK", *values[i:i + 1000]))
            for i in range(0, len(others), 1000):
                self._call(("UNLINK", *others[i:i + 1000]))
        if everything:
            if self._o.cluster:
                self._call(("UNLINK", self._o.shards_record))
            self._call(("PUBLISH", self._P + b"inv", FLUSH_ALL))
        return count

    def expire(self):
        """Redis reclaims expired entries itself (they are never counted by size());
        this drops expired L1 copies and returns 0."""
        self._check_open()
        self._table.expire()
        return 0

    def size(self):
        """Entries of this cache in Redis (expired ones never count). Costs a SCAN
        (on a cluster, of every master), counted per shard."""
        self._check_open()
        return sum(len(keys) for keys in self._keys_by_shard(b"v:").values())

    def stats(self, reset):
        """Counters of this host (summed over its processes), and figures of the store.

        ``hits``/``misses`` count what callers got (an L1 copy or a Redis value is a
        hit); ``size`` is the entries in Redis (a SCAN); ``memory_used``/``capacity``
        and ``l1_size`` describe the host table. ``evictions`` and ``expirations``
        are Redis's business and stay 0 here (see INFO stats on the server).
        """
        self._check_open()
        counters = self._counters.stats(reset)
        info = self._table.info()
        l1_size = info["entries"] - (1 if self._near is not None and self._near.healthy() else 0)
        counters.update(size=self.size(), memory_used=info["memory_used"], capacity=info["capacity"],
                        l1_size=max(0, l1_size))
        return counters

    def reset_stats(self):
        self._check_open()
        self._counters.stats(True)

    def info(self):
        """The host table's layout and memory figures, plus where the entries live
        (``shards`` is None on a cluster until this handle first reached Redis)."""
        self._check_open()
        info = dict(self._table.info())
        agent = self._agent
        info.update(backend="redis", url=self._o.where, namespace=self._o.namespace.decode(),
                    shards=self._shards.count if self._shards is not None else None,
                    l1_segment=self._o.l1_segment, near_cache=self._near is not None,
                    listener=bool(agent and agent.is_listener),
                    listener_healthy=bool(self._near and self._near.healthy()))
        return info

    def check(self):
        """Problems of the host table ([] when sound); Redis must answer a PING."""
        self._check_open()
        problems = list(self._table.check())
        self._call(("PING",))
        return problems

    # ---- lifetime --------------------------------------------------------------------

    @property
    def closed(self):
        return self._closed

    def sync(self):
        """Nothing to do: Redis persistence is the server's configuration."""
        self._check_open()

    def close(self):
        """Release this handle (the entries stay in Redis, the host table for other processes)."""
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        try:
            if self._agent is not None:
                self._agent.close(timeout=self._o.heartbeat + self._o.bound() + 1.0)
        finally:
            client, self._client = self._client, None
            if client is not None and self._client_generation == _fork_generation:
                conn = getattr(self._local, "conn", None)
                try:
                    if conn is not None:
                        conn.disconnect()
                    client.close()
                except Exception:
                    pass
            self._local = None
            self._l1_opened.close()
            self._counters_opened.close()

    def destroy(self):
        """Remove this cache's entries from Redis, close the handle and remove the host
        table; True when there was something to remove."""
        removed = 0
        error = None
        if not self._closed:
            if self._agent is not None:  # (else its heartbeat could register the host again)
                self._agent.close(timeout=self._o.heartbeat + self._o.bound() + 1.0)
            try:
                removed = self._flush_redis(everything=True)
            except BackendUnavailable as exc:
                error = exc
        self.close()
        existed = _destroy_local(self._o.l1_segment) or removed > 0
        if error is not None:
            raise error
        return existed

    def __del__(self):
        agent = getattr(self, "_agent", None)
        if agent is not None:
            agent.stop.set()

    def describe(self):
        return f"redis {self._o.where}, {'near cache' if self._near is not None else 'open'}"


def _destroy_local(segment):
    HostElection(segment).destroy()
    return shm.destroy(segment)


def destroy(name, backend_opts=None):
    """Remove the cache ``name`` from Redis and its host table from this host.

    (``vela.destroy(name, backend="redis", backend_opts=...)`` lands here.)
    """
    o = _Opts(options.check_name(name), backend_opts, 5.0)
    client = _make_client(o)
    try:
        keys = list(client.scan_iter(match=o.namespace + b"*", count=1000))
        removed = sum(client.unlink(*keys[i:i + 1000]) for i in range(0, len(keys), 1000)) if keys else 0
        if o.cluster:
            home = _cluster_shards(o.name, int(client.get(o.shards_record) or 1)).home
            client.unlink(o.shards_record)
        else:
            home = o.namespace
        client.publish(home + b"inv", b"*")
    except (rex.ConnectionError, rex.TimeoutError) as exc:
        raise BackendUnavailable(f"Redis at {o.where} is unavailable: {exc}") from exc
    finally:
        client.close()
    return _destroy_local(o.l1_segment) or removed > 0
