"""The per-host invalidation listener of a Redis-backed near cache.

Every process with a near-cache handle runs one thread (:class:`HostAgent`). It
tries to win the host's election (:class:`vela.stores.near.HostElection`); the winner
subscribes to the pub/sub channel ``vela:<cache>:inv`` that every writer
publishes to, and applies each message to the host's L1 (the shared table), so
one subscription per host serves every worker. The others watch the winner's
heartbeat in L1 and drop all of L1 if it goes silent (a stopped or stuck
listener); when the winner dies, the kernel frees the lock and one of them takes
over at its next poll.

Ordering (why no message is lost without L1 being dropped): Redis delivers a
channel's messages in publish order on one connection and disconnects a
subscriber that falls too far behind, so a gap can only follow a disconnect.
After every (re)subscription the listener drops all of L1 (voiding fills in
flight) *after* the subscription is confirmed: whatever was published while
nobody listened is covered by that drop, everything later is delivered. Belt
and braces: every message is numbered (``P iseq``, in the same Lua call), and a
number skipped drops all of L1 too; at every heartbeat the listener reads the
last number, then pings on the subscription: when the pong arrives, every
message numbered up to it has arrived, or was lost (then L1 is dropped).

Redis Cluster: each virtual shard of the cache (vela.stores.redis) numbers its
messages and publishes them on its own channel; the listener subscribes to all of
them on one node (a cluster forwards every PUBLISH to every node) and keeps one
numbering per channel. A pong then vouches only for messages published on the node
it is subscribed to, so there the heartbeat's check waits BUS_GRACE longer (in
heartbeats) for the other nodes' messages to arrive over the cluster bus (a bus
slower than that costs a needless drop of L1, never a missed invalidation).

Confirmation: the listener keeps its host registered (``P hosts``, ``P hb:<host>``
with a lifetime of a few heartbeats). invalidate_tag and flush publish, after
their invalidation, a request to acknowledge (``a`` + a list's name); the
listener pushes its host's name on that list once it has applied everything
before it, and the caller waits for every registered host.
"""

import logging
import math
import threading
import time
import weakref

import redis

from .near import Numbering, split_number

log = logging.getLogger("vela.redis.listener")


class Listener:
    """Subscribes to the invalidation channel and applies it to L1 (the elected process only).

    :param near: the :class:`vela.stores.near.NearCache` of this host.
    :param make_client: ``() -> redis client`` (the listener's own connections).
    :param prefix: bytes, the cache's ``vela:<cache>:``; the channel is ``<prefix>inv``.
        Or, for a sharded cache, ``(client) -> [prefix, ..]`` (home shard first), read
        at each connection: one channel per shard; registrations and acks in the home's.
    :param host: this host's name among the cache's hosts (str).
    :param heartbeat: seconds between pings (and heartbeats in L1 and in Redis).
    :param timeout: seconds a ping may take before Redis counts as lost.
    :param cross_node: messages may reach the subscription from other nodes (Redis
        Cluster): the check of the numbers waits BUS_GRACE longer.
    """

    #: heartbeats a host's registration outlives its last renewal: longer than the other
    #: workers of a host take to drop its L1 when its listener stalls (7 heartbeats, see
    #: HostAgent), so a host that stops answering stays one that callers wait for until
    #: its copies are gone (or until it answers again)
    REGISTRATION_BEATS = 8

    #: seconds a message published on another node of a cluster may take to arrive
    #: before the heartbeat's check counts it as lost (cluster bus: well under this)
    BUS_GRACE = 0.5

    def __init__(self, near, make_client, prefix, host, heartbeat, timeout, cross_node=False):
        self.near = near
        self.make_client = make_client
        self.prefixes_of = prefix if callable(prefix) else (lambda client: [prefix])
        self.prefix = None if callable(prefix) else prefix   # the home shard's (known once connected)
        self.channels = []  # one per shard: the home's first
        self.lag = math.ceil(self.BUS_GRACE / heartbeat) if cross_node else 0  # in heartbeats
        self.host = host
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.client = None
        self.pubsub = None
        self.connected = False
        self.numbering = Numbering()  # of the channel's messages (one origin: Redis)
        self.losses = 0          # times Redis was lost after a subscription
        self.subscriptions = 0   # successful (re)subscriptions
        self.acknowledged = 0    # invalidate_tag/flush confirmed to their caller
        self._dropped = False    # L1 dropped since the last loss

    def connect(self):
        """Subscribe, then drop all of L1, register the host and announce a healthy listener.

        :raises redis.RedisError: Redis cannot be reached or does not confirm in time.
        """
        self.close_pubsub()
        self.client = self.make_client()
        prefixes = self.prefixes_of(self.client)
        self.prefix, self.channels = prefixes[0], [p + b"inv" for p in prefixes]
        ps = self.client.pubsub()
        self.pubsub = ps
        ps.subscribe(*self.channels)
        deadline = time.monotonic() + self.timeout
        confirmed = 0
        while confirmed < len(self.channels):
            msg = ps.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if msg is not None and msg.get("type") == "subscribe":
                confirmed += 1
            elif time.monotonic() >= deadline:
                raise redis.exceptions.TimeoutError("no confirmation of the subscription")
        # Numbers up to these were published before we dropped L1: accounted for.
        for origin, last in self._last_numbers().items():
            self.numbering.start(origin, None, last)
        self.near.drop_all()
        self.near.mark_healthy()
        self._register()
        self.connected = True
        self._dropped = False
        self.subscriptions += 1

    def _last_numbers(self):
        """{origin: the last number it published}; an origin is a shard's channel, or
        None when the cache has one shard (one channel)."""
        if len(self.channels) == 1:
            return {None: int(self.client.get(self.prefix + b"iseq") or 0)}
        pipe = self.client.pipeline(transaction=False)
        for channel in self.channels:
            pipe.get(channel[:-len(b"inv")] + b"iseq")
        return {channel: int(n or 0) for channel, n in zip(self.channels, pipe.execute())}

    def _register(self):
        ttl_ms = max(1, int(self.REGISTRATION_BEATS * self.heartbeat * 1000))
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(self.prefix + b"hosts", self.host)
        pipe.set(self.prefix + b"hb:" + self.host.encode(), b"1", px=ttl_ms)
        pipe.execute()

    def unregister(self):
        """Leaving the role: callers need not wait for this host any more (best effort;
        a registration left behind expires by itself)."""
        if self.client is None or self.prefix is None:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.srem(self.prefix + b"hosts", self.host)
            pipe.delete(self.prefix + b"hb:" + self.host.encode())
            pipe.execute()
        except (redis.exceptions.RedisError, OSError):
            pass

    def lost(self, exc):
        """Redis is gone for this listener: L1 cannot be trusted any more."""
        was_connected, self.connected = self.connected, False
        if was_connected:
            self.losses += 1
            log.warning("invalidation listener lost Redis (%s): near cache dropped, copies capped "
                        "until it is back", exc)
            self.unregister()  # (if Redis still answers: nobody waits for this host meanwhile)
        self.close_pubsub()
        if was_connected or not self._dropped:
            # Also removes the heartbeat: from now on fills get the short cap, so
            # failed reconnection attempts need not drop L1 again.
            self.near.drop_all()
            self._dropped = True

    def on_message(self, data, channel=None):
        """Apply one message of ``channel`` (None: the only one), numbered or not."""
        number, body = split_number(data)
        if number is not None and self.numbering.received(channel, None, number):
            self._gap(number - 1)
        if body[:1] == b"a":
            self._acknowledge(body[1:])
        else:
            self.near.apply(body)

    def _gap(self, last):
        log.warning("invalidation messages up to %d were lost: near cache dropped", last)
        self.near.drop_all(keep_marker=True)

    def _acknowledge(self, ack):
        if not ack.startswith(self.prefix + b"ack:") or len(ack) > len(self.prefix) + 64:
            self.near.apply(b"a" + ack)  # not a request of this cache: malformed
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(ack, self.host)
        pipe.pexpire(ack, 60_000)  # a caller that gave up leaves nothing behind
        pipe.execute()
        self.acknowledged += 1

    def serve(self, stop):
        """Apply messages until ``stop`` is set or Redis is lost (then raise)."""
        ps, near, hb = self.pubsub, self.near, self.heartbeat
        last_rx = time.monotonic()
        next_ping = last_rx + hb
        pings = pongs = 0
        check = None  # (pong awaited, {origin: last number published before the ping})
        sharded = len(self.channels) > 1
        while not stop.is_set():
            msg = ps.get_message(timeout=min(hb, max(0.0, next_ping - time.monotonic())))
            now = time.monotonic()
            if msg is not None:
                last_rx = now
                kind = msg.get("type")
                if kind == "message":
                    if sharded:  # (else the one-argument call, as wrappers of on_message expect)
                        self.on_message(msg["data"], msg["channel"])
                    else:
                        self.on_message(msg["data"])
                elif kind == "pong" and msg.get("data") == b"vela":
                    pongs += 1
                    if check is not None and pongs >= check[0]:
                        for origin, last in check[1].items():
                            if self.numbering.announced(origin, None, last):
                                self._gap(last)
                        check = None
            if now >= next_ping:
                if check is None:
                    lasts = self._last_numbers()
                    for origin, last in lasts.items():
                        if self.numbering.counted(origin, None, last):
                            self._gap(last)
                    check = (pings + 1 + self.lag, lasts)
                ps.ping(b"vela")
                pings += 1
                near.mark_healthy()
                self._register()
                next_ping = now + hb
            if now - last_rx > hb + self.timeout:
                raise redis.exceptions.TimeoutError(f"no answer from Redis for {now - last_rx:.2f} s")

    def close_pubsub(self):
        ps, self.pubsub = self.pubsub, None
        client, self.client = self.client, None
        for conn in (ps, client):
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # already broken: nothing to release
                    pass


class HostAgent:
    """The background thread of one near-cache handle: election, listening, watchdog.

    :param election: :class:`vela.stores.near.HostElection` of this host's segment.
    :param listener: :class:`Listener` (used only while this handle is elected).
    :param poll: seconds between election attempts and watchdog checks.
    """

    #: consecutive missed heartbeats (seen by a non-listener) before it drops L1
    WATCHDOG_STRIKES = 3

    def __init__(self, election, listener, poll, owner=None):
        self.election = election
        self.listener = listener
        self.near = listener.near
        self.poll = poll
        self.stop = threading.Event()
        self.thread = None
        self._owner = weakref.ref(owner) if owner is not None else (lambda: True)
        self._strikes = 0
        self._dropped_for_silence = False

    @property
    def is_listener(self):
        return self.election.held

    def start(self, name):
        self.thread = threading.Thread(target=self._run, name=f"vela-near-{name}", daemon=True)
        self.thread.start()

    def try_lead_now(self):
        """Called once at open: if elected, subscribe before the handle serves reads
        (an L1 left by processes that stopped earlier is dropped right away)."""
        if self.election.try_acquire():
            try:
                self.listener.connect()
            except Exception as exc:
                self.listener.lost(exc)

    def _run(self):
        backoff = self.poll
        while not self.stop.is_set() and self._owner() is not None:
            try:
                if not self.election.try_acquire():
                    self._watch()
                    self.stop.wait(self.poll)
                    continue
                if not self.listener.connected:
                    self.listener.connect()
                    backoff = self.poll
                self.listener.serve(self.stop)
            except (redis.exceptions.RedisError, OSError) as exc:
                self.listener.lost(exc)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
            except Exception:  # the handle was closed under us, or a bug: never spin
                if self.stop.is_set():
                    break
                log.exception("near-cache agent failed; retrying")
                self.stop.wait(1.0)
        self._retire()

    def _watch(self):
        """Not the listener: drop L1 once if the listener's heartbeat stops."""
        if self.near.healthy():
            self._strikes = 0
            self._dropped_for_silence = False
            return
        self._strikes += 1
        if self._strikes >= self.WATCHDOG_STRIKES and not self._dropped_for_silence:
            log.warning("no healthy invalidation listener on this host: near cache dropped")
            self.near.drop_all()
            self._dropped_for_silence = True

    def _retire(self):
        """Leaving the role: no successor must find copies it cannot vouch for."""
        if self.election.held:
            try:
                self.listener.connected = False
                self.listener.unregister()
                self.listener.close_pubsub()
                self.near.drop_all()
            except Exception:  # the table is already closed
                pass
            self.election.release()

    def close(self, timeout):
        self.stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)
        if self.thread is None or not self.thread.is_alive():
            self._retire()

    def after_fork(self):
        """In a fork child: the thread is gone and the lock belongs to the parent."""
        self.election.forget_after_fork()
        self.listener.pubsub = None
        self.listener.client = None
        self.listener.connected = False
        self.stop = threading.Event()
        self.thread = None
