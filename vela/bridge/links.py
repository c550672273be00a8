"""A worker's requests to the bridges of a partitioned cache.

Each request goes straight to the bridge that owns the key (or to every
member, for totals): over TCP to the bridge's data port (``vela://`` addresses,
vela.bridge.dataport), or, in a cluster with CURVE keys, on a ZeroMQ DEALER to
its ROUTER (``tcp://``), which encrypts. Connections are made lazily, per thread
(neither kind is thread-safe) and per process (a forked child makes its own). Requests are authenticated and
checked exactly like the bridges' own messages (vela.bridge.protocol); on the
data port each request's MAC also covers the connection's nonce and the
request's number on it, and so does its reply's (dataport.py). Every wait is
bounded by the caller's deadline (connecting included: a connection made late
in a call gets what is left of it), and a request that timed out takes its
socket with it, so a late answer can never be mistaken for the answer to the
next request.
"""

import functools
import itertools
import os
import threading
import time

from .. import options
from ..errors import BridgeUnavailable, OptionError
from . import dataport, protocol

_OPTIONS = {"timeout", "secret_file", "curve_key_file"}


def bounded(method):
    """A worker call whose steps (waiting for a partition table, connecting, each
    request and each retry) share one deadline: ``topology_opts['timeout']`` from
    the start of the outermost such call on this thread (``Links.deadline``)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        local = self._links._local
        if getattr(local, "deadline", None) is not None:
            return method(self, *args, **kwargs)  # a step of a call in progress
        local.deadline = time.monotonic() + self._links.timeout
        try:
            return method(self, *args, **kwargs)
        finally:
            local.deadline = None
    return call


def _key_file(option, load, path):
    """What ``load`` reads from the file of a topology option; OptionError naming it."""
    try:
        return load(path)
    except ValueError as exc:
        raise OptionError(f"topology_opts[{option!r}]: {exc}") from None


class Links:
    """Request/reply to bridges. ``topology_opts``: timeout (seconds, default 3),
    secret_file (the cluster's shared secret), curve_key_file (its CURVE keys)."""

    def __init__(self, cache_name, topology_opts):
        opts = options.topology_opts("partitioned", topology_opts, _OPTIONS)
        self.timeout = options.topology_timeout(opts, "timeout")
        self.cache_name = cache_name
        self.secret = _key_file("secret_file", protocol.load_secret, opts["secret_file"]) \
            if opts.get("secret_file") else b""
        self.curve = _key_file("curve_key_file", protocol.load_curve, opts["curve_key_file"]) \
            if opts.get("curve_key_file") else None
        self._local = threading.local()
        self._ids = itertools.count(1)

    def deadline(self):
        """The deadline of the call in progress on this thread (``bounded``), else the
        timeout from now."""
        return getattr(self._local, "deadline", None) or time.monotonic() + self.timeout

    def _conns(self):
        local = self._local
        if getattr(local, "forks", None) != _forks:  # a forked child starts afresh
            local.forks = _forks
            local.conns = {}
        return local.conns

    def _conn(self, addr, deadline):
        conns = self._conns()
        conn = conns.get(addr)
        if conn is None:
            try:
                if addr.startswith("vela://"):
                    host, _, port = addr[len("vela://"):].rpartition(":")
                    conn = dataport.Client(host.strip("[]"), int(port), self.secret, deadline)
                else:
                    conn = _ZmqConn(addr, self.curve)
            except (OSError, ValueError) as exc:
                raise unreached(f"cannot reach the vela-bridge at {addr}: {exc or type(exc).__name__}") from None
            conns[addr] = conn
        return conn

    def _drop(self, addr):
        conn = self._conns().pop(addr, None)
        if conn is not None:
            conn.close()

    def close(self):
        for addr in list(self._conns()):
            self._drop(addr)

    def request(self, addr, fields, epoch, deadline=None):
        """One request to the bridge at ``addr``; its reply (a dict)."""
        deadline = deadline or self.deadline()
        return self._await(addr, self._send(addr, fields, epoch, deadline), deadline)

    def _send(self, addr, fields, epoch, deadline):
        """Sends a request; (its id, the context its reply's MAC covers)."""
        conn = self._conn(addr, deadline)
        rid, ctx, frames = self.message(conn, fields, epoch)
        try:
            conn.send(frames, deadline - time.monotonic())
        except (OSError, _Full) as exc:
            self._drop(addr)
            raise BridgeUnavailable(f"the vela-bridge at {addr} takes no request: {exc}") from None
        return rid, ctx

    def message(self, conn, fields, epoch):
        """(id, context, frames) of a request on ``conn`` (about to be its next one); the
        asyncio client (vela.bridge.alinks) sends the same."""
        rid = next(self._ids)
        ctx = conn.next_context()
        msg = dict(fields, t="req", v=protocol.PROTOCOL, inc=0, n=conn.number, id=rid, c=self.cache_name, e=epoch)
        msg["from"] = 0
        return rid, ctx, protocol.pack(self.secret, msg, ctx)

    def reply_to(self, frames, ctx, rid):
        """The reply to request ``rid`` if ``frames`` are it, else None (not from a bridge
        of ours, or not this reply: ignored)."""
        try:
            msg = protocol.unpack(self.secret, frames, ctx)
        except protocol.Malformed:
            return None
        return msg if msg["t"] == "rep" and msg["id"] == rid else None

    def request_all(self, targets, epoch, deadline=None):
        """Several requests at once [(addr, fields)], answered in that order: for each, its
        reply (a dict), or the BridgeUnavailable saying why its bridge did not answer by
        the deadline (the others are still awaited)."""
        deadline = deadline or self.deadline()
        sent = []
        for addr, fields in targets:
            try:
                sent.append((addr, self._send(addr, fields, epoch, deadline)))
            except BridgeUnavailable as exc:
                sent.append((addr, exc))
        out = []
        for addr, request in sent:
            try:
                out.append(request if isinstance(request, BridgeUnavailable) else self._await(addr, request, deadline))
            except BridgeUnavailable as exc:
                out.append(exc)
        return out

    def _await(self, addr, request, deadline):
        rid, ctx = request
        conn = self._conns().get(addr)
        if conn is None:  # dropped since the request went out (another one to it timed out)
            raise BridgeUnavailable(f"no answer from the vela-bridge at {addr} (connection lost; "
                                    f"cache {self.cache_name!r})")
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError()
                frames = conn.recv(left)
            except (OSError, _Full) as exc:  # TimeoutError is an OSError
                self._drop(addr)  # a late reply must not meet the next request
                why = f"within {self.timeout:g} s" if isinstance(exc, TimeoutError) else f"({exc})"
                raise BridgeUnavailable(f"no answer from the vela-bridge at {addr} {why} "
                                        f"(cache {self.cache_name!r})") from None
            msg = self.reply_to(frames, ctx, rid)
            if msg is not None:
                return msg


def unreached(message):
    """The BridgeUnavailable of a request that was never sent (no connection): whatever it
    asked was not made (``sent`` is False; vela.bridge.outcomes)."""
    exc = BridgeUnavailable(message)
    exc.sent = False
    return exc


# Forks of this process so far: connections made before a fork belong to the parent.
_forks = 0


def _forked():
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


class _Full(Exception):
    """A ZeroMQ socket that takes no more messages."""


class _ZmqConn:
    """A DEALER to a bridge's ROUTER (clusters with CURVE: the link is encrypted)."""

    def __init__(self, addr, curve):
        import zmq

        self.zmq = zmq
        sock = self.sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE + 4096)
        if curve:
            sock.curve_serverkey = curve[0]
            sock.curve_publickey, sock.curve_secretkey = curve
        sock.connect(addr)
        self.number = 1  # (CURVE sessions refuse replays themselves: no context)

    def next_context(self):
        return b""

    def send(self, frames, send_timeout):
        self.number += 1
        try:
            self.sock.send_multipart(frames, flags=self.zmq.NOBLOCK)
        except self.zmq.Again:
            raise _Full("queue full") from None

    def recv(self, timeout):
        self.sock.setsockopt(self.zmq.RCVTIMEO, max(1, int(timeout * 1000)))  # a blocking recv, no poller
        try:
            return self.sock.recv_multipart()
        except self.zmq.Again:
            raise TimeoutError() from None

    def close(self):
        self.sock.close(0)
