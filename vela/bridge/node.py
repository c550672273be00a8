"""The bridge process: sockets, membership, the event loop.

Every bridge binds one ROUTER socket (``--listen``) where peers' messages
arrive, and opens one DEALER socket to each peer it knows (``--join`` seeds
first; the rest it learns from heartbeats, which carry the member list). All
of a bridge's outgoing traffic goes through its DEALERs; a message for a peer
that is not connected is dropped rather than queued (ZMQ_IMMEDIATE), and the
peer notices the gap in the stream and resyncs from a snapshot.

Membership: any authentic message from a peer marks it alive; silence for
``failure_timeout / 2`` makes it suspect, for ``failure_timeout`` dead (no
longer sent to, out of the cluster view). A dead peer that speaks again is
alive again and resyncs. Workers reach the bridge on a local ipc socket per
cache, only for calls that need cluster-wide totals.

Incarnations: each bridge process has one (protocol.new_incarnation, ordered
across restarts). A member that speaks with a newer one restarted: every
topology is told at once (``member_restarted``), without waiting for the
failure timeout; messages of an older one are refused, and so is any message
number a member's incarnation already used (protocol.ReplayWindow), so a
captured message replayed later is counted and dropped. A restart keeps its
address: a newer incarnation of a live member from another address is another
bridge with the same node id, refused (the younger of the two exits, naming
--node-id).
"""

import itertools
import json
import logging
import os
import signal
import time

import msgpack
import xxhash
import zmq

from .. import _native
from ..errors import LayoutMismatch, VelaError
from . import presence, protocol
from ..stores.replicated import control_endpoint
from .dataport import DataPort
from .partitions import DIGEST_EVERY, Partitions, error_reply
from .quorum import Quorum
from .replica import Replica

log = logging.getLogger("vela.bridge")

ALIVE, SUSPECT, DEAD = "alive", "suspect", "dead"
BATCH_DELAY = 0.002  # seconds a change may wait to travel with others


class NodeIdTaken(ValueError):
    """Another live bridge of the cluster has this bridge's node id."""


class Member:
    def __init__(self, node_id, addr):
        self.node_id = node_id
        self.addr = addr
        self.data_addr = None  # its data port (vela://host:port), for workers
        self.inc = None
        self.window = protocol.ReplayWindow()  # message numbers of incarnation `inc` seen
        self.state = SUSPECT
        self.last_seen = 0.0
        self.received = 0
        self.held = None  # the partitioned caches it holds entries of (None: no hello yet)


class Bridge:
    def __init__(self, caches, listen, advertise=None, join=(), node_id=None, secret=None,
                 heartbeat=1.0, failure_timeout=5.0, tombstone_ttl=300.0, control=None, insecure=False,
                 curve=None, backups=0, data_listen=None, backend="shm", backend_opts=None, on_split="refuse",
                 async_backups=False):
        self.listen = listen
        self.backend, self.backend_opts = backend, backend_opts
        self.advertise = advertise or listen
        self.stop_asked = False  # SIGTERM/SIGINT: stop() at the next loop turn
        if ("0.0.0.0" in self.advertise or "*" in self.advertise):
            raise ValueError("--advertise must be an address peers can connect to (not 0.0.0.0)")
        for option, addr in (("--listen", listen), ("--data-listen", data_listen)):
            if addr and not secret and not insecure and not _loopback(addr):
                raise ValueError(f"refusing to listen on {addr} ({option}) without authentication: give "
                                 "--secret-file (a shared secret for every bridge of the cluster) or --insecure")
        self.secret = secret or b""
        # (public, secret) z85 keys shared by the cluster: every link is encrypted
        # with ZeroMQ CURVE; the HMAC still authenticates each message.
        self.curve = curve
        self.node_id = node_id if node_id is not None else _node_id_of(self.advertise)
        self.inc = protocol.new_incarnation()
        self.sent = 0  # the number of this incarnation's latest message
        self.clash_probes = {}     # address -> when we last told it that it has our node id
        self.refused = None        # NodeIdTaken: this bridge must not speak for its node id
        self.heartbeat = heartbeat
        self.failure_timeout = failure_timeout
        self.members = {}          # node id -> Member
        self.dealers = {}          # address -> DEALER socket
        self.seeds = list(join)
        self.replicas = {}
        self.partitioned = {}      # cache name -> Partitions
        if backups not in (0, 1):
            raise ValueError(f"--backups must be 0 or 1, not {backups!r}")
        self.backups = backups
        self.async_backups = async_backups
        self.ring_epoch = 0        # partition table version: max seen + 1 at every change here
        self.leaving = set()       # members handing their partitions off before they go
        self.leaving_self = False
        self.departed = set()      # members that said goodbye: not counted for the majority
        if on_split not in ("refuse", "continue"):
            raise ValueError(f"--on-split must be refuse or continue, not {on_split!r}")
        self.quorum = Quorum(failure_timeout, needed=on_split == "refuse")
        self.controls = {}         # control socket -> cache name
        self.control_paths = []    # their files (ipc): removed on exit
        self.presence_fds = []     # the locks that say we run (vela.bridge.presence)
        self.held_replies = []     # (deadline, Partitions, wait, build, respond): waiting for a backup
        self.rpc_waiting = {}      # rpc id -> dict(worker, socket, remaining, removed, deadline)
        self.rpc_ids = itertools.count(1)
        self.snap_ids = itertools.count(1)
        self.epoch = 0
        self.last_status = None
        self.running = True
        self.started = time.monotonic()
        self.turn_started = self.started  # when the loop's current turn began (a stall shows here)
        self.counters = {"messages_in": 0, "messages_out": 0, "bytes_in": 0, "bytes_out": 0,
                         "dropped_out": 0, "malformed": 0, "unauthenticated": 0, "batches_out": 0,
                         "batches_in": 0, "rpcs": 0, "apply_errors": 0, "requests": 0, "replayed": 0,
                         "stale_incarnation": 0, "node_id_clash": 0, "restarts_seen": 0}
        self.ctx = zmq.Context.instance()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        if self.curve:
            self.router.curve_server = True
            self.router.curve_publickey, self.router.curve_secretkey = self.curve
        self.router.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE + 4096)
        # A peer that dials again (its link went silent, below) takes its identity over
        # at once: by default the ROUTER would ignore the new link while the old one,
        # which may never hear a FIN, still holds it.
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # (No heartbeat timeout on this side: while the bridge works through a burst, its
        # I/O thread stops reading a peer at the high-water mark, and a timeout would then
        # cut a busy link and lose what it carried. The dialling side redials.)
        self.router.bind(listen)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        for name in caches:
            self._attach(name, tombstone_ttl, control)
        # Workers of partitioned caches send their requests to a plain TCP data port
        # (dataport.py says why); with CURVE they use the ROUTER, which encrypts.
        self.dataport = None
        self.data_advertise = None
        if self.partitioned and not self.curve:
            self.dataport = DataPort(data_listen or _next_port(listen), self.poller, self._handle_data,
                                     self.counters, self._connection_closed, self.secret)
            self.dataport.set_identity(self.node_id, self.inc)
            host = self.advertise.split("://", 1)[-1].rsplit(":", 1)[0]
            self.data_advertise = f"vela://{host}:{self.dataport.port}"
        for parts in self.partitioned.values():
            self._watch_routes(parts)
        for seed in self.seeds:
            self._dealer(seed)

    # ---- setup -----------------------------------------------------------------------

    def _attach(self, name, tombstone_ttl, control):
        from ..segments import open_table

        cache = open_table(name, self.backend, self.backend_opts)  # the segment as it is
        topology = cache._table.log_state()["replicated"]
        if topology not in (_native.TOPOLOGY_REPLICATED, _native.TOPOLOGY_PARTITIONED):
            raise LayoutMismatch(f"cache {name!r} exists but is local: its workers must open it with "
                                 "topology='replicated' or 'partitioned' (destroy it if it was made otherwise)")
        cache._table.node_id = self.node_id
        if topology == _native.TOPOLOGY_PARTITIONED:
            self.presence_fds.append(presence.hold(name))  # its workers write in place while we run
            self.partitioned[name] = Partitions(name, cache, self, self.backups, async_backups=self.async_backups)
        else:
            replica = Replica(name, cache._table, tombstone_ttl)
            replica.cache = cache  # keep the handle alive
            replica.ready_since = None if self.seeds else time.monotonic()
            self.replicas[name] = replica
        endpoint = (control or {}).get(name) or control_endpoint(name)
        path = endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None
        if path:
            try:
                os.unlink(path)  # a socket file left by a killed bridge
            except FileNotFoundError:
                pass
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # Mode 0600 from the start (umask while binding), not after a window: any
        # local process that can connect could flush the whole cluster.
        old_umask = os.umask(0o177)
        try:
            sock.bind(endpoint)
        finally:
            os.umask(old_umask)
        if path:
            os.chmod(path, 0o600)
            self.control_paths.append(path)
        self.controls[sock] = name
        self.poller.register(sock, zmq.POLLIN)

    def _dealer(self, addr):
        """The DEALER socket to a peer's address; None for an address that cannot
        be dialled (it came from a peer: counted, never fatal)."""
        sock = self.dealers.get(addr)
        if sock is None:
            if not addr.startswith(("tcp://", "ipc://")):
                self.counters["malformed"] += 1
                return None
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.IDENTITY, f"{self.node_id}:{self.inc}".encode())
            self._keep_live(sock)
            if self.curve:
                sock.curve_serverkey = self.curve[0]
                sock.curve_publickey, sock.curve_secretkey = self.curve
            try:
                sock.connect(addr)
            except zmq.ZMQError:
                sock.close(0)
                self.counters["malformed"] += 1
                log.warning("cannot dial member address %r", addr)
                return None
            self.dealers[addr] = sock
        return sock

    def _keep_live(self, sock):
        """Links between bridges that carry nothing back for the failure timeout are
        closed and dialled again (ZeroMQ heartbeats; a dial that does not connect within
        it is given up and tried afresh). After packet loss, TCP retries a link's
        unacknowledged data at intervals that doubled meanwhile (0.2 s, 0.4 s, ... up to
        2 minutes), so a link can stay silent for many seconds after the network healed:
        a new connection starts with none of that. What the old link still held is lost,
        and the receiver sees the gap in the stream as for any lost message."""
        sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(self.heartbeat * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(self.failure_timeout * 1000)))
        sock.setsockopt(zmq.CONNECT_TIMEOUT, max(1, int(self.failure_timeout * 1000)))

    # ---- sending ------------------------------------------------------------------------

    def _message(self, kind, context=b"", **fields):
        """A message of ours; ``context``: what its MAC covers besides the payload (a
        reply on the data port: the request's connection nonce and number)."""
        self.sent += 1
        fields.update(t=kind, v=protocol.PROTOCOL, n=self.sent, **{"from": self.node_id, "inc": self.inc})
        return protocol.pack(self.secret, fields, context)

    def _send(self, addr, frames):
        sock = self._dealer(addr)
        if sock is None:
            return False
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
            self.counters["messages_out"] += 1
            self.counters["bytes_out"] += len(frames[1])
            return True
        except zmq.Again:
            self.counters["dropped_out"] += 1
            return False

    def _alive(self):
        return [m for m in self.members.values() if m.state != DEAD]

    def _broadcast(self, frames):
        for m in self._alive():
            self._send(m.addr, frames)

    def _hello_frames(self, **extra):
        members = [[m.node_id, m.addr] for m in self._alive()]
        # The last batch of each stream: a peer that lost one (dropped while the
        # connection was not up, say) sees the gap here even if no batch follows.
        seqs = {name: r.seq - 1 for name, r in self.replicas.items()}
        if self.data_advertise:
            extra["data"] = self.data_advertise
        if self.partitioned:  # the last invalidation message of each cache (a lost last one shows)
            extra["iseqs"] = {name: parts.inval_seq for name, parts in self.partitioned.items()}
            extra["held"] = [name for name, parts in self.partitioned.items() if parts.holds_entries()]
        return self._message("hello", addr=self.advertise, members=members, seqs=seqs,
                             repoch=self.ring_epoch, **extra)

    def _hello(self):
        frames = self._hello_frames()
        targets = {m.addr for m in self.members.values()} | set(self.seeds)
        for addr in targets:
            self._send(addr, frames)

    # ---- receiving ------------------------------------------------------------------------

    def _unpack(self, frames, context=b""):
        """The message in [mac, payload], counted; None (counted and dropped) when it is
        not authentic or not well-formed."""
        self.counters["messages_in"] += 1
        self.counters["bytes_in"] += sum(len(f) for f in frames)
        try:
            return protocol.unpack(self.secret, frames, context)
        except protocol.Malformed as exc:
            key = "unauthenticated" if "authentication" in str(exc) else "malformed"
            self.counters[key] += 1
            log.debug("dropped a message: %s", exc)
            return None

    def _receive_peer(self, frames):
        msg = self._unpack(frames[1:])
        if msg is None:
            return
        if msg["t"] == "req":
            if not self.curve:
                # Without CURVE workers use the data port, whose requests are good on one
                # connection only; here a request could be replayed from a capture.
                self.counters["malformed"] += 1
                return
            # (CURVE: each connection has its own session keys and nonces, so a
            # captured message can neither be read nor replayed.)
            self._serve_request(frames[0], msg)
            return
        if msg["t"] == "rep":
            self.counters["malformed"] += 1  # replies go to workers, never to a bridge
            return
        sender = msg["from"]
        if sender == self.node_id:
            self._same_node_id(msg)
            return
        member = self.members.get(sender)
        addr = msg.get("addr")
        if member is None:
            if addr is None or self._dealer(addr) is None:
                return  # we learn members from hello messages, which carry a dialable address
            member = self.members[sender] = Member(sender, addr)
            self.epoch += 1
        if not self._admit(member, msg):
            return
        if addr and addr != member.addr and self._dealer(addr) is not None:
            member.addr = addr
        if member.state != ALIVE:
            if member.state == DEAD:
                log.info("member %d is back", sender)
            member.state = ALIVE
            self.departed.discard(sender)
            self.epoch += 1
        member.last_seen = time.monotonic()
        member.received += 1
        try:
            getattr(self, "_on_" + msg["t"])(member, msg)
        except (VelaError, ValueError, TypeError, OverflowError) as exc:
            # Valid on the wire but not applicable here (a table that refuses it):
            # counted and logged; the bridge goes on.
            self.counters["apply_errors"] += 1
            log.warning("could not apply a %s from member %d: %s", msg["t"], sender, exc)

    def _admit(self, member, msg):
        """Whether ``msg`` from ``member`` is taken: its incarnation is not older than the
        member's, and its number was not used (replay window). A newer incarnation is
        a restart, handled here at once."""
        inc = msg["inc"]
        if member.inc is not None and inc < member.inc:
            self.counters["stale_incarnation"] += 1
            return False
        if member.inc is not None and inc > member.inc:
            addr = msg.get("addr")
            if member.state != DEAD and addr is not None and addr != member.addr:
                # Not a restart (that keeps its address): a second bridge with this node id.
                self.counters["node_id_clash"] += 1
                self._probe_clash(addr)
                return False
            if member.state != DEAD and addr is None:
                # A newer incarnation proves itself with a hello (it carries its address).
                self.counters["stale_incarnation"] += 1
                return False
        if inc != member.inc:
            restarted = member.inc is not None
            addr = msg.get("addr")
            if addr and addr != member.addr and self._dealer(addr) is not None:
                member.addr = addr  # (before the restart is handled: it sends there)
            member.inc = inc
            member.window = protocol.ReplayWindow()
            member.window.accept(msg["n"])
            self.leaving.discard(member.node_id)
            self.epoch += 1
            if restarted:
                self._member_restarted(member)
            return True
        if not member.window.accept(msg["n"]):
            self.counters["replayed"] += 1
            return False
        return True

    def _member_restarted(self, member):
        """A member came back as a new incarnation: what it held in memory (streams,
        snapshot requests, handoffs in flight) is gone; every topology starts over
        with it now, not after the failure timeout."""
        log.info("member %d restarted (new incarnation %d)", member.node_id, member.inc)
        self.counters["restarts_seen"] += 1
        for delegate in list(self.replicas.values()) + list(self.partitioned.values()):
            restarted = getattr(delegate, "member_restarted", None)
            if restarted is not None:
                restarted(member.node_id)
        for replica in self.replicas.values():
            replica.synced.add((member.node_id, member.inc))  # (its hello need not ask again)
            self._request_snapshot(replica, member)

    def _same_node_id(self, msg):
        """A message that names our node id: ours coming back, or another bridge with
        the same id. Of two live bridges with one id, the younger incarnation refuses
        to run; the elder tells it so (a hello that echoes its incarnation, which a
        replayed message cannot)."""
        addr = msg.get("addr")
        if msg["inc"] == self.inc:
            return  # our own (a seed that is our own address)
        if addr is None or addr == self.advertise:
            self.counters["malformed"] += 1  # an earlier incarnation of ours, late
            return
        self.counters["node_id_clash"] += 1
        if msg["inc"] > self.inc:
            self._probe_clash(addr, younger=msg["inc"])
        elif msg["t"] == "hello" and msg.get("clash") == self.inc:
            self.refused = NodeIdTaken(
                f"node id {self.node_id} is taken by the live bridge at {addr} (this one advertises "
                f"{self.advertise}): give each bridge its own --node-id (1..4095)")
        else:
            self._probe_clash(addr)  # make it answer with the echo

    def _probe_clash(self, addr, younger=None):
        """A hello straight to a bridge that has (or claims) our node id, at most once a
        heartbeat per address; ``younger``: its incarnation, echoed to prove we live."""
        now = time.monotonic()
        if now - self.clash_probes.get(addr, -1e9) < self.heartbeat:
            return
        self.clash_probes[addr] = now
        extra = {"clash": younger} if younger is not None else {}
        self._send(addr, self._hello_frames(**extra))

    def _on_hello(self, member, msg):
        self.ring_epoch = max(self.ring_epoch, msg.get("repoch", 0))
        member.held = set(msg.get("held", ()))

        if msg.get("data") != member.data_addr:
            member.data_addr = msg.get("data")
            self.epoch += 1  # workers route to it: publish
        for name, last in msg["seqs"].items():
            replica = self.replicas.get(name)
            if replica is None:
                continue
            first_contact = (member.node_id, msg["inc"]) not in replica.synced
            if first_contact:
                # A member we have not synced with (new, or restarted): whatever it
                # holds, we want it; whatever its stream says from now on follows.
                replica.synced.add((member.node_id, msg["inc"]))
                replica.check_sequence(member.node_id, msg["inc"], last, batch=False)
                self._request_snapshot(replica, member)
            elif last >= 0 and replica.check_sequence(member.node_id, msg["inc"], last, batch=False):
                self._request_snapshot(replica, member)
        for name, last in msg.get("iseqs", {}).items():
            parts = self.partitioned.get(name)
            if parts is not None:
                parts.on_inval_seq(member.node_id, msg["inc"], last)
        for node_id, addr in msg["members"]:
            if node_id == self.node_id and addr != self.advertise:
                self._probe_clash(addr)  # the cluster knows another bridge by our id: ask it
            elif node_id != self.node_id and node_id not in self.members and self._dealer(addr) is not None:
                self.members[node_id] = Member(node_id, addr)
                self.epoch += 1

    def _on_bye(self, member, msg):
        member.state = DEAD
        self.departed.add(member.node_id)
        self.leaving.discard(member.node_id)
        self.epoch += 1

    def _on_leaving(self, member, msg):
        if member.node_id not in self.leaving:
            log.info("member %d is leaving: taking its partitions over", member.node_id)
            self.leaving.add(member.node_id)
            self.epoch += 1
            # Its handoff follows on the same pipe, maybe in this very drain: the table
            # that takes it must be in place first.
            self._update_rings(time.monotonic())

    # ---- the partitioned topology ------------------------------------------------------

    def _partitions(self, msg):
        parts = self.partitioned.get(msg.get("c"))
        if parts is None:
            self.counters["malformed"] += 1
        return parts

    def _addr_of(self, node_id):
        """A member's bridge address (bridge to bridge)."""
        if node_id == self.node_id:
            return self.advertise
        member = self.members.get(node_id)
        return member.addr if member is not None else None

    def _worker_addr(self, node_id):
        """Where workers send a member their requests: its data port, else its ROUTER."""
        if node_id == self.node_id:
            return self.data_advertise or self.advertise
        member = self.members.get(node_id)
        if member is None:
            return None
        return member.data_addr if member.data_addr and not self.curve else member.addr

    def _watch_routes(self, parts):
        """The native data port answers gets of ``parts``'s cache where it may, from now on."""
        parts.on_routes = self._native_routes
        self._native_routes(parts, parts.servable())

    def _native_routes(self, parts, servable):
        if self.dataport is not None:
            self.dataport.set_cache(parts.name, parts.table, parts.parts, servable)

    def _sync_native_counters(self):
        """The counters, brought up to date with what the native data port answered."""
        if self.dataport is None:
            return
        self.dataport.sync_counters()
        for name, parts in self.partitioned.items():
            served = self.dataport.served(name)
            parts.stats["requests"] += served - parts.served_natively
            parts.served_natively = served

    def _connection_closed(self, conn_id):
        """A worker's connection went away: the stampede leases it held go too (a
        holder that died is replaced at once, as on one host)."""
        for parts in self.partitioned.values():
            parts.release_leases(conn_id)

    def _handle_data(self, frames, conn_id, context):
        """A request from the data port: the reply frames, or None for a malformed one
        (or one whose reply is held: it goes later, on the same connection)."""
        msg = self._unpack(frames, context)
        if msg is None:
            return None
        if msg["t"] != "req":
            self.counters["malformed"] += 1
            return None
        return self._answer(msg, conn_id, context, respond=lambda f: self.dataport.reply(conn_id, f))

    def _serve_request(self, identity, msg):
        """A worker's request on the ROUTER (CURVE clusters)."""
        def respond(frames):
            try:
                self.router.send_multipart([identity] + frames, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                self.counters["dropped_out"] += 1

        frames = self._answer(msg, respond=respond)
        if frames is not None:
            respond(frames)

    def _answer(self, msg, conn_id=None, context=b"", respond=None):
        """The reply frames to a worker's request (it may run on any host); ``conn_id``:
        the data port connection it came on, ``context`` the request's. None when the
        reply waits for the backup to confirm the write (``respond(frames)`` sends it)."""
        self.counters["requests"] += 1
        self._check_stall()
        parts = self.partitioned.get(msg["c"])
        wait = None
        if parts is None:
            reply = {"err": "BridgeUnavailable", "msg": f"this bridge does not carry cache {msg['c']!r}"}
        else:
            try:
                reply = parts.serve(msg, self._worker_addr, conn_id)
                wait = parts.take_wait()
            except Exception as exc:  # noqa: BLE001 - one bad request never stops the bridge
                reply = error_reply(exc)
                log.debug("request %s failed: %s", msg.get("op"), exc)

        def build(instead):
            answer = dict(instead or reply, epoch=self.ring_epoch)
            return self._message("rep", context=context, id=msg["id"], **answer)

        if wait is not None and respond is not None:
            self.held_replies.append((time.monotonic() + self.failure_timeout, parts, wait, build, respond))
            return None
        return build(None)

    def _on_hand(self, member, msg):
        parts = self._partitions(msg)
        if parts is None:
            return
        taken = parts.on_hand(member.node_id, msg["inc"], msg)
        if taken is not None:
            self._send(member.addr, self._message("handack", c=msg["c"], sid=msg["sid"], ps=taken))
            self.epoch += 1  # incoming partitions completed: publish the view

    def _on_handack(self, member, msg):
        parts = self._partitions(msg)
        if parts is not None:
            parts.on_handack(msg["sid"], msg["ps"])

    def _on_brec(self, member, msg):
        parts = self._partitions(msg)
        if parts is not None and parts.on_brec(member.node_id, msg["inc"], msg["seq"], msg["recs"],
                                               msg.get("clk", 0)):
            self._send(member.addr, self._message("brack", c=msg["c"], seq=msg["seq"]))

    def _on_brack(self, member, msg):
        parts = self._partitions(msg)
        if parts is not None:
            parts.on_brack(member.node_id, msg["seq"])
            self._release_replies(time.monotonic())

    def _release_replies(self, now):
        """Send the replies whose backup records were confirmed; past the deadline, say
        the write was not confirmed (it may have been made: the worker does not count on it)."""
        still = []
        for deadline, parts, wait, build, respond in self.held_replies:
            if parts.backed_up(wait):
                respond(build(None))
            elif now > deadline:
                respond(build({"err": "BridgeUnavailable",
                               "msg": f"cache {parts.name!r}: the backup copy of this write was not confirmed "
                                      "in time (it may have been made)"}))
            else:
                still.append((deadline, parts, wait, build, respond))
        self.held_replies = still

    def _on_brepair(self, member, msg):
        parts = self._partitions(msg)
        if parts is None:
            return
        if "ps" in msg:  # (anti-entropy: only these partitions differ)
            parts.on_repair_partitions(member.node_id, msg["ps"])
        else:
            parts.on_repair(member.node_id)

    def _on_digest(self, member, msg):
        parts = self._partitions(msg)
        if parts is None:
            return
        again = parts.on_digest(member.node_id, msg["inc"], msg["r"], msg["ps"], msg["d"])
        if again:
            self._send(member.addr, self._message("brepair", c=msg["c"], ps=again))

    def _on_inval(self, member, msg):
        parts = self._partitions(msg)
        if parts is not None:
            parts.on_inval(member.node_id, msg["inc"], msg["seq"], msg["ks"])

    def _check_stall(self):
        """Start over if the loop stalled long enough for the others to have declared
        this bridge dead (their silence counts from our last heartbeat, up to one before
        the stall began). Looked at every turn and before every request is served: a
        request that waited in a socket through the stall (its worker gave up on it, and
        may have written the key to the partition's new owner since) must not be made
        now, with a newer version, by a member that no longer owns its key."""
        now = time.monotonic()
        stalled = now - self.turn_started
        if stalled > self._stall_limit() and self.partitioned:
            self.turn_started = now
            self._start_over(stalled)

    def _stall_limit(self):
        """Seconds a turn of the loop may take before the bridge starts over."""
        return max(self.failure_timeout - 2 * self.heartbeat, self.failure_timeout / 4)

    def _start_over(self, stalled):
        """After a stall long enough for the others to declare us dead (SIGSTOP, a frozen
        VM), they may have taken our partitions and written to them. Come back as a new
        incarnation, as a restarted bridge does: the table is kept and reconciled with
        the others' (vela.bridge.partitions), writes made in place meanwhile included."""
        log.warning("this bridge stalled for %.1f s: the others may have taken its partitions; "
                    "rejoining as a new incarnation (keeping the table, reconciling it)", stalled)
        self.inc = protocol.new_incarnation(self.inc)
        if self.dataport is not None:
            self.dataport.set_identity(self.node_id, self.inc)
        for name, parts in list(self.partitioned.items()):
            fresh = self.partitioned[name] = Partitions(name, parts.cache, self, self.backups, parts.parts,
                                                        async_backups=self.async_backups)
            # (this process made them, and counted them: still true)
            fresh.outcomes, fresh.served_natively = parts.outcomes, parts.served_natively
            self._watch_routes(fresh)
        self._publish_view()  # no table: workers stop writing in place before it is emptied
        self.epoch += 1

    def _knows_cluster(self, now):
        """Whether this bridge knows the cluster well enough to speak for it: it has no
        seeds, or it heard a member and had a few heartbeats to learn the others from its
        hellos, or it waited a failure timeout. Before that, it takes no partition and
        answers no cluster-wide count (it would count without members it has not learnt)."""
        if not self.seeds:
            return True
        heard = any(m.state == ALIVE for m in self.members.values())
        return (heard and now - self.started > 3 * self.heartbeat) or now - self.started > self.failure_timeout

    def _check_quorum(self, now):
        """Whether this bridge still hears a majority (vela.bridge.quorum); after a
        spell without one long enough for the others to have taken its partitions over,
        the partitions it owns are taken back before they serve read-modify-writes."""
        heard = {n for n, m in self.members.items() if m.state == ALIVE and n not in self.departed}
        # The cluster is the last partition table (a member the majority took out of it no
        # longer counts: two of three, then one of those two dies, and the first goes on;
        # a restarted bridge's is the one it last published) and whoever speaks to us now.
        rings = [ring for ring in (parts.last_ring() for parts in self.partitioned.values()) if ring]
        known = (rings[0] if rings else {n for n in self.members if n not in self.departed}) | heard
        was = self.quorum.writable
        spell = self.quorum.update(self.node_id, heard, known, now)
        if was != self.quorum.writable:
            self.epoch += 1  # workers stop (or resume) writing in place: publish
        if spell is not None:
            # Members this bridge declared dead while it heard nobody may be alive for the
            # majority: suspects again (kept in the table) until they speak or stay silent
            # for a failure timeout, so the first member heard does not take their partitions.
            for n in known - heard - {self.node_id}:
                m = self.members.get(n)
                if m is not None and m.state == DEAD and n not in self.departed:
                    m.state, m.last_seen = SUSPECT, now
        if spell is not None and spell >= self.failure_timeout / 2:
            reachable = {n for n, m in self.members.items() if m.state != DEAD} | {self.node_id}
            for parts in self.partitioned.values():
                parts.regained(reachable, settle=2 * self.failure_timeout, since=now - spell)

    def _update_rings(self, now):
        if not self.partitioned or not (self.leaving_self or self._knows_cluster(now)):
            return
        self._check_quorum(now)
        if not self.quorum.writable:
            return  # a minority takes nothing over: the majority does
        alive = {m.node_id for m in self.members.values() if m.state != DEAD}
        ring = (alive - self.leaving) | ({self.node_id} if not self.leaving_self else set())
        if not ring:
            return
        reachable = alive | {self.node_id}
        changed = False
        for name, parts in self.partitioned.items():
            settle = 2 * self.failure_timeout if parts.owners is None and self._may_hand_back(name, alive) else 0.0
            if parts.set_ring(ring, reachable, settle=settle):
                changed = True
            parts.check_incoming(reachable)
        if changed:
            self.ring_epoch += 1
            self.epoch += 1
            log.info("partition table %d: members %s", self.ring_epoch, sorted(ring))

    def _may_hand_back(self, name, alive):
        """Whether the first partition table of cache ``name`` must settle (take what the
        former holders hand back before its copies are trusted): this bridge kept a
        table from before, or a member it hears holds entries (or has not said yet).
        A cluster whose members all start empty has nothing to wait for."""
        if self.partitioned[name].prev is not None:
            return bool(alive)
        return any(m.held is None or name in m.held
                   for n, m in self.members.items() if n in alive)

    def _pump_partitions(self, backups=True):
        for name, parts in self.partitioned.items():
            parts.pump_local()
            # A reply held for the backup sends the records at once (those of this turn
            # travel together): a client writing one key at a time waits a round trip, not
            # BATCH_DELAY more.
            brecs, invals = parts.take_outbound(time.monotonic(), 0 if self.held_replies else BATCH_DELAY)
            for node_id, fields in parts.brec_messages(brecs, backups):
                addr = self._addr_of(node_id)
                if addr is not None:
                    self._send(addr, self._message("brec", **fields))
            for node_id in parts.take_repairs():
                addr = self._addr_of(node_id)
                if addr is not None:
                    self._send(addr, self._message("brepair", c=name))
            for fields in invals:
                self._broadcast(self._message("inval", c=name, **fields))
            # (after the records: a backup takes them before it compares)
            for node_id, fields in parts.digest_messages(time.monotonic(), DIGEST_EVERY * self.heartbeat):
                addr = self._addr_of(node_id)
                if addr is not None:
                    self._send(addr, self._message("digest", **fields))
            if backups:
                parts.sync_backups()

            def send(node_id, fields):
                addr = self._addr_of(node_id)
                return addr is not None and self._send(addr, self._message("hand", **fields))

            parts.pump_streams(send)

    def _replica(self, msg):
        replica = self.replicas.get(msg.get("c"))
        if replica is None:
            self.counters["malformed"] += 1
        return replica

    def _on_batch(self, member, msg):
        replica = self._replica(msg)
        if replica is None:
            return
        self.counters["batches_in"] += 1
        if replica.check_sequence(member.node_id, msg["inc"], msg["seq"]):
            self._request_snapshot(replica, member)
        replica.apply(msg["recs"])

    def _on_resync(self, member, msg):
        # (Bridges now skip a batch number instead, Replica.read_local; an older peer
        # may still send this.)
        replica = self._replica(msg)
        if replica is not None:
            self._request_snapshot(replica, member)

    def _request_snapshot(self, replica, member):
        if member.node_id in replica.snap_wait:
            # The snapshot in flight may have been read before what was lost: ask
            # for another one once it is done.
            replica.snap_again.add(member.node_id)
            return
        req = next(self.snap_ids)
        # [request id, when last asked, answer started?]: asked again every
        # heartbeat until the first chunk arrives (the request can be dropped
        # while the connection is still coming up).
        replica.snap_wait[member.node_id] = [req, time.monotonic(), False]
        replica.stats["resyncs"] += 1
        self._send(member.addr, self._message("snapreq", c=replica.name, req=req))

    def _on_snapreq(self, member, msg):
        replica = self._replica(msg)
        if replica is not None:
            # A newer request from the same member replaces one being served.
            replica.serving = [s for s in replica.serving if s[0] is not member]
            replica.serving.append((member, msg["req"], replica.snapshot_stream(), None))

    def _on_snap(self, member, msg):
        replica = self._replica(msg)
        if replica is None:
            return
        waiting = replica.snap_wait.get(member.node_id)
        if waiting is None or waiting[0] != msg["req"]:
            return  # an answer to a request we gave up
        waiting[1], waiting[2] = time.monotonic(), True
        replica.apply_snapshot_chunk(msg)
        if msg["last"]:
            del replica.snap_wait[member.node_id]
            replica.stats["snapshots_applied"] += 1
            if member.node_id in replica.snap_again:
                replica.snap_again.discard(member.node_id)
                self._request_snapshot(replica, member)
            if replica.ready_since is None:
                replica.ready_since = time.monotonic()

    def _on_rpc(self, member, msg):
        replica = self._replica(msg)
        if replica is None:
            return
        removed = replica.apply_rpc(msg["op"], msg["version"], msg.get("tag"))
        self._send(member.addr, self._message("rpcr", id=msg["id"], removed=removed))

    def _on_rpcr(self, member, msg):
        waiting = self.rpc_waiting.get(msg["id"])
        if waiting is None or member.node_id not in waiting["remaining"]:
            return
        waiting["remaining"].discard(member.node_id)
        waiting["removed"] += msg["removed"]
        if not waiting["remaining"]:
            self._answer_rpc(msg["id"])

    # ---- workers -------------------------------------------------------------------------

    def _receive_control(self, sock, frames):
        name = self.controls[sock]
        identity, payload = frames[0], frames[-1]
        try:
            if len(payload) > 1 << 20:
                raise ValueError("request too large")
            req = msgpack.unpackb(payload, raw=False)
            op = req["op"]
        except Exception:
            sock.send_multipart([identity, b"", msgpack.packb({"error": "malformed request"})])
            return
        if op == "status":
            sock.send_multipart([identity, b"", msgpack.packb(self.status(), use_bin_type=True)])
            return
        replica = self.replicas.get(name)
        if replica is None or op not in ("tag", "flush") or not isinstance(req.get("version"), int):
            sock.send_multipart([identity, b"", msgpack.packb({"error": f"unknown op {op!r}"})])
            return
        self.counters["rpcs"] += 1
        # The worker removed this host's entries and counted them; record the marks.
        replica.apply_rpc(op, req["version"], req.get("tag"))
        if not self._knows_cluster(time.monotonic()):
            # Just started: an answer now would count this host alone and say nothing of
            # the members not learnt yet. The mark goes out all the same.
            sock.send_multipart([identity, b"", msgpack.packb({"error": "this bridge does not know its "
                                                                        "cluster yet (it just started)",
                                                               "retry": True})])
            return
        rid = next(self.rpc_ids)
        # Every member not declared dead (a dead one takes the mark from a snapshot when
        # it is back); one that does not answer in time is reported "missing".
        alive = {m.node_id for m in self._alive()}
        self.rpc_waiting[rid] = {"identity": identity, "socket": sock, "remaining": alive, "removed": 0,
                                 "deadline": time.monotonic() + self.failure_timeout / 2}
        frames = self._message("rpc", c=name, id=rid, op=op, version=req["version"],
                               **({"tag": req["tag"]} if op == "tag" else {}))
        for node_id in alive:
            self._send(self.members[node_id].addr, frames)
        if not alive:
            self._answer_rpc(rid)

    def _answer_rpc(self, rid):
        w = self.rpc_waiting.pop(rid)
        reply = {"removed": w["removed"], "missing": sorted(w["remaining"])}
        w["socket"].send_multipart([w["identity"], b"", msgpack.packb(reply)])

    # ---- periodic work ------------------------------------------------------------------------

    def _pump_logs(self):
        for replica in self.replicas.values():
            replica.take_kept_marks()
            records = replica.read_local()
            if not records:
                continue
            # One batch per loop turn; big ones are split so no message nears the size bound.
            for i in range(0, len(records), 2000):
                chunk = records[i:i + 2000]
                frames = self._message("batch", c=replica.name, seq=replica.seq, recs=chunk)
                replica.seq += 1
                self.counters["batches_out"] += 1
                replica.stats["sent"] += len(chunk)
                self._broadcast(frames)
            replica.commit()

    def _serve_snapshots(self):
        for replica in self.replicas.values():
            still = []
            for member, req, stream, pending in replica.serving:
                if member.state == DEAD:
                    continue  # it asks again when it is back
                chunk = pending or next(stream, None)
                if chunk is None:
                    continue
                frames = self._message("snap", c=replica.name, req=req, **dict(
                    {"tombs": [], "tagwm": [], "flushwm": 0}, **chunk))
                # Never block the loop on a peer: a chunk that finds no room is
                # offered again on the next turn.
                if not self._send(member.addr, frames):
                    still.append((member, req, stream, chunk))
                elif chunk["last"]:
                    replica.stats["snapshots_served"] += 1
                else:
                    still.append((member, req, stream, None))
            replica.serving = still

    def _check_members(self, now):
        for m in self.members.values():
            silent = now - m.last_seen
            new = DEAD if silent > self.failure_timeout else SUSPECT if silent > self.failure_timeout / 2 else ALIVE
            if m.last_seen == 0:
                new = DEAD if now - self.started > self.failure_timeout else SUSPECT
            if m.state == DEAD:
                continue  # only a message from it brings it back (not a "bye" just received)
            if new != m.state:
                if new == DEAD:
                    log.warning("member %d (%s) is dead: %s", m.node_id, m.addr,
                                f"silent for {silent:.1f} s" if m.last_seen else "never heard from")
                m.state = new
                self.epoch += 1
        for replica in self.replicas.values():
            for node_id, waiting in list(replica.snap_wait.items()):
                req, last, started = waiting
                member = self.members.get(node_id)
                if member is None or member.state == DEAD:
                    del replica.snap_wait[node_id]  # it is gone; it resyncs when it is back
                    replica.synced = {s for s in replica.synced if s[0] != node_id}
                elif now - last > (2 * self.failure_timeout if started else 2 * self.heartbeat):
                    # Not answered, or stalled: chunks come one a loop turn, so a stream
                    # silent that long lost some with a link dialled again (_keep_live).
                    waiting[1] = now  # ask again
                    waiting[0] = req = next(self.snap_ids)
                    waiting[2] = False
                    self._send(member.addr, self._message("snapreq", c=replica.name, req=req))
            if replica.ready_since is None and now - self.started > self.failure_timeout \
                    and not self._alive():
                replica.ready_since = now  # nobody to sync from: ready alone
            replica.prune(now)
        for rid, w in list(self.rpc_waiting.items()):
            w["remaining"] = {n for n in w["remaining"]
                              if n in self.members and self.members[n].state != DEAD}
            if now > w["deadline"] or not w["remaining"]:
                self._answer_rpc(rid)

    def status(self):
        self._sync_native_counters()
        now = time.monotonic()
        return {
            "node_id": self.node_id, "incarnation": self.inc, "listen": self.listen,
            "advertise": self.advertise, "epoch": self.epoch, "pid": os.getpid(), "numbered": self.sent,
            "uptime": round(now - self.started, 3),
            "members": [{"node_id": m.node_id, "addr": m.addr, "state": m.state,
                         "last_seen_ago": round(now - m.last_seen, 3) if m.last_seen else None,
                         "messages": m.received} for m in sorted(self.members.values(), key=lambda m: m.node_id)],
            "caches": dict({name: dict(r.stats, ready=r.ready and r.ready_since is not None
                                       and self._knows_cluster(now),
                                       log_lag_bytes=r.table.log_state()["head"] - r.pos,
                                       tombstones=len(r.tombs))
                            for name, r in self.replicas.items()},
                           **{name: p.status() for name, p in self.partitioned.items()}),
            "ring_epoch": self.ring_epoch,
            "leaving": sorted(self.leaving) + ([self.node_id] if self.leaving_self else []),
            "counters": dict(self.counters),
        }

    def serve_metrics(self, listen):
        """Serve the host's cache figures and the bridge's own in Prometheus text
        format on http://listen/metrics, from a thread that reads the last
        published status (the loop never waits for a scrape)."""
        import http.server
        import threading

        from .. import metrics

        host, _, port = listen.rpartition(":")
        bridge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = (metrics.exposition([r.cache for r in bridge.replicas.values()])
                        + bridge_exposition(bridge.last_status)).encode()
                self.send_response(200)
                self.send_header("Content-Type", metrics.CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
        threading.Thread(target=server.serve_forever, name="vela-bridge-metrics", daemon=True).start()
        self.metrics_server = server
        return server.server_address

    def _publish_view(self):
        view = self.status()
        self.last_status = view
        for name, replica in self.replicas.items():
            mine = dict(view, ready=view["caches"][name]["ready"])
            mine.pop("caches")
            replica.table.set_cluster(json.dumps(mine).encode())
        for name, parts in self.partitioned.items():
            mine = dict(view, ready=view["caches"][name]["ready"], topology="partitioned",
                        published=time.time(), heartbeat=self.heartbeat, failure_timeout=self.failure_timeout,
                        addrs={str(n): self._worker_addr(n) for n in set(parts.ring_members) | self.leaving
                               | {self.node_id} if self._worker_addr(n)}, **parts.view())
            mine.pop("caches")
            parts.table.set_cluster(json.dumps(mine).encode())

    # ---- the loop ----------------------------------------------------------------------------

    def run(self):
        # The handlers only take note: stop() sends messages, which must not cut into a
        # message the loop is sending (a handler runs between any two bytecodes).
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop_asked", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stop_asked", True))
        next_beat = 0.0
        next_view = 0.0
        published_epoch = ring_checked = None
        self.turn_started = time.monotonic()
        try:
            while self.running:
                if self.stop_asked:
                    self.stop_asked = False
                    self.stop()
                self._check_stall()
                self.turn_started = time.monotonic()
                if self.dataport is not None:
                    self.dataport.serve_for(self._stall_limit(), self.ring_epoch)
                for sock, events in self.poller.poll(timeout=BATCH_DELAY * 1000):
                    if self.dataport is not None and self.dataport.owns(sock):
                        self.dataport.on_event(sock, events)
                        continue
                    for _ in range(1000):  # drain what is there, then look at the log
                        try:
                            frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        if sock is self.router:
                            self._receive_peer(frames)
                        else:
                            self._receive_control(sock, frames)
                if self.refused is not None:
                    raise SystemExit(f"vela-bridge: {self.refused}")
                self._pump_logs()
                self._serve_snapshots()
                if self.held_replies:
                    self._release_replies(time.monotonic())
                now = time.monotonic()
                beat = now >= next_beat
                if self.partitioned:
                    # The table can only change with membership (which moves the epoch);
                    # stalled handoffs and backups are looked at every heartbeat.
                    if beat or self.epoch != ring_checked:
                        ring_checked = self.epoch
                        self._update_rings(now)
                        beat = True
                    if published_epoch != self.epoch:
                        # Workers route by the new table before any partition is copied
                        # away (they write the partitions they own in place).
                        self._publish_view()
                        published_epoch = self.epoch
                    self._pump_partitions(backups=beat)
                if self.leaving_self and self._left(now):
                    break
                if now >= next_beat:
                    if self.leaving_self:
                        self._broadcast(self._message("leaving"))
                    self._hello()
                    self._check_members(now)
                    next_beat = now + self.heartbeat
                if published_epoch != self.epoch or now >= next_view:
                    self._publish_view()
                    published_epoch = self.epoch
                    next_view = now + self.heartbeat
        finally:
            self.close()

    def stop(self):
        if self.partitioned and not self.leaving_self:
            # A graceful leave: hand every partition to its next owner first.
            self.leaving_self = True
            self.leave_deadline = time.monotonic() + max(10.0, 2 * self.failure_timeout)
            self._broadcast(self._message("leaving"))
            self.epoch += 1
            return
        self.running = False

    def _left(self, now):
        """True when a leaving bridge has handed everything off (or may wait no longer)."""
        if not self.leaving_self:
            return False
        if now > self.leave_deadline:
            log.warning("leaving before every handoff was acknowledged")
            return True
        for parts in self.partitioned.values():
            if parts.owners is None or parts.streams or parts.outgoing or parts.brecs or parts.invals:
                return False
        return True

    def close(self):
        try:
            if self.refused is None:  # (a bridge refused its node id speaks for nobody)
                self._pump_logs()  # what workers wrote last still goes out
                self._broadcast(self._message("bye"))
        except Exception:  # closing anyway
            log.exception("while leaving the cluster")
        for replica in self.replicas.values():
            replica.commit()
            replica.cache.close()
        if self.dataport is not None:
            self.dataport.close()  # (its thread reads the tables: stopped before they close)
        for parts in self.partitioned.values():
            parts.table.set_cluster(parts.closing_view())  # no table: workers see it at once
            parts.cache.close()
        for fd in self.presence_fds:
            os.close(fd)  # (after the view: a worker that sees us gone finds no table either)
        self.presence_fds = []
        for sock in list(self.dealers.values()) + list(self.controls) + [self.router]:
            sock.close(0)
        for path in self.control_paths:
            try:
                os.unlink(path)
            except OSError:
                pass


def bridge_exposition(status):
    """The bridge's own figures (from status()) in Prometheus text format."""
    if not status:
        return ""
    lines = []

    def metric(name, kind, help_text, samples):
        lines.append(f"# HELP vela_bridge_{name} {help_text}")
        lines.append(f"# TYPE vela_bridge_{name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"vela_bridge_{name}{{{label_text}}} {value}" if label_text else f"vela_bridge_{name} {value}")

    for key, value in sorted(status["counters"].items()):
        metric(f"{key}_total", "counter", f"bridge {key.replace('_', ' ')}", [({}, value)])
    metric("epoch", "gauge", "membership changes seen", [({}, status["epoch"])])
    states = [({"node_id": m["node_id"], "addr": m["addr"], "state": s}, int(m["state"] == s))
              for m in status["members"] for s in ("alive", "suspect", "dead")]
    metric("member_state", "gauge", "1 for the state each known member is in", states)
    for field in ("applied", "stale", "suppressed", "sent", "resyncs", "snapshots_served", "snapshots_applied",
                  "requests", "moved", "fallbacks", "handed_out", "handed_in", "promoted", "lost",
                  "backup_records", "inval_gaps", "digest_rounds", "digest_repairs"):
        samples = [({"cache": c}, s[field]) for c, s in status["caches"].items() if field in s]
        if samples:
            metric(f"{field}_total", "counter", f"replication/partition records or events: {field}", samples)
    for field in ("owned", "backup_of", "incoming", "outgoing"):
        samples = [({"cache": c}, s[field]) for c, s in status["caches"].items() if field in s]
        if samples:
            metric(f"partitions_{field}", "gauge", f"partitions of this member: {field}", samples)
    metric("ready", "gauge", "1 when the cache is in sync with the cluster",
           [({"cache": c}, int(s["ready"])) for c, s in status["caches"].items()])
    metric("log_lag_bytes", "gauge", "change log bytes not yet sent",
           [({"cache": c}, s["log_lag_bytes"]) for c, s in status["caches"].items() if "log_lag_bytes" in s])
    return "\n".join(lines) + "\n"


def _loopback(addr):
    host = addr.split("://", 1)[-1].rsplit(":", 1)[0]
    return addr.startswith(("ipc://", "inproc://")) or host in ("127.0.0.1", "localhost", "[::1]", "::1") \
        or host.startswith("127.")


def _next_port(listen):
    """The default data port: the port after --listen's, on the same interface."""
    host, _, port = listen.split("://", 1)[-1].rpartition(":")
    host = "0.0.0.0" if host in ("*", "") else host
    return f"{host}:{int(port) + 1}"


def _node_id_of(addr):
    """A node id from the advertised address (1..4095; 0 means "no bridge")."""
    return xxhash.xxh64_intdigest(addr.encode()) % 4095 + 1
