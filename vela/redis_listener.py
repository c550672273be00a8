"""The per-host invalidation listener of a Redis-backed near cache.

Every process with a near-cache handle runs one thread (:class:`HostAgent`). It
tries to win the host's election (:class:`vela.near.HostElection`); the winner
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
nobody listened is covered by that drop, everything later is delivered.
"""

import logging
import threading
import time
import weakref

import redis

log = logging.getLogger("vela.redis.listener")


class Listener:
    """Subscribes to the invalidation channel and applies it to L1 (the elected process only).

    :param near: the :class:`vela.near.NearCache` of this host.
    :param make_pubsub: ``() -> redis PubSub`` on a connection of its own.
    :param channel: bytes, ``vela:<cache>:inv``.
    :param heartbeat: seconds between pings (and heartbeats in L1).
    :param timeout: seconds a ping may take before Redis counts as lost.
    """

    def __init__(self, near, make_pubsub, channel, heartbeat, timeout):
        self.near = near
        self.make_pubsub = make_pubsub
        self.channel = channel
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.pubsub = None
        self.connected = False
        self.losses = 0          # times Redis was lost after a subscription
        self.subscriptions = 0   # successful (re)subscriptions
        self._dropped = False    # L1 dropped since the last loss

    def connect(self):
        """Subscribe, then drop all of L1 and announce a healthy listener.

        :raises redis.RedisError: Redis cannot be reached or does not confirm in time.
        """
        self.close_pubsub()
        ps = self.make_pubsub()
        self.pubsub = ps
        ps.subscribe(self.channel)
        deadline = time.monotonic() + self.timeout
        while True:
            msg = ps.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if msg is not None and msg.get("type") == "subscribe":
                break
            if time.monotonic() >= deadline:
                raise redis.exceptions.TimeoutError("no confirmation of the subscription")
        self.near.drop_all()
        self.near.mark_healthy()
        self.connected = True
        self._dropped = False
        self.subscriptions += 1

    def lost(self, exc):
        """Redis is gone for this listener: L1 cannot be trusted any more."""
        was_connected, self.connected = self.connected, False
        if was_connected:
            self.losses += 1
            log.warning("invalidation listener lost Redis (%s): near cache dropped, copies capped "
                        "until it is back", exc)
        self.close_pubsub()
        if was_connected or not self._dropped:
            # Also removes the heartbeat: from now on fills get the short cap, so
            # failed reconnection attempts need not drop L1 again.
            self.near.drop_all()
            self._dropped = True

    def serve(self, stop):
        """Apply messages until ``stop`` is set or Redis is lost (then raise)."""
        ps, near, hb = self.pubsub, self.near, self.heartbeat
        last_rx = time.monotonic()
        next_ping = last_rx + hb
        while not stop.is_set():
            msg = ps.get_message(timeout=min(hb, max(0.0, next_ping - time.monotonic())))
            now = time.monotonic()
            if msg is not None:
                last_rx = now
                if msg.get("type") == "message":
                    near.apply(msg["data"])
            if now >= next_ping:
                ps.ping()
                near.mark_healthy()
                next_ping = now + hb
            if now - last_rx > hb + self.timeout:
                raise redis.exceptions.TimeoutError(f"no answer from Redis for {now - last_rx:.2f} s")

    def close_pubsub(self):
        ps, self.pubsub = self.pubsub, None
        if ps is not None:
            try:
                ps.close()
            except Exception:  # already broken: nothing to release
                pass


class HostAgent:
    """The background thread of one near-cache handle: election, listening, watchdog.

    :param election: :class:`vela.near.HostElection` of this host's segment.
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
        self.listener.connected = False
        self.stop = threading.Event()
        self.thread = None
