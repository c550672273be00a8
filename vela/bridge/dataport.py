"""The data port: workers' requests over plain TCP, served by a native thread.

A worker's request to a partition owner is a round trip it waits for, so every
hop counts: a ZeroMQ socket passes each message through a background I/O thread
on both ends, which on a small or virtualised machine costs more than the whole
request. The data port is a plain TCP listener whose connections one native
thread of the bridge watches (native/dataserver.h), so a request wakes one
thread on each side, like a Redis GET. It carries the same messages as the
ROUTER (``protocol.pack``: the HMAC, then the msgpack payload; the same
validation). The thread answers a worker's get of a partition the bridge may
serve from its table itself, reading the shared table, with no Python step (a
bridge's Python loop is what limited it to a fraction of a redis-server's
gets/s); every other request goes to the bridge's loop as it arrived.

A connection starts with the bridge's challenge: a frame whose payload is a
random 16-byte nonce. The worker's requests on it are numbered 1, 2, 3...;
each one's MAC covers the nonce and its number (``context``) as well as the
payload, and so does the MAC of the reply, so a captured request is good on
its own connection, once: replayed on another connection or again on the same
one, it is refused. Frames::

    bridge -> worker:  u32 payload length | u8 MAC length | MAC | payload
    worker -> bridge:  u32 payload length | u8 MAC length | tag | MAC | payload

(big endian) where ``tag`` is the first 16 bytes of the HMAC of the nonce, the
request's number and the first five bytes of the header: the bridge checks it
before it buffers the body, so a connection without the secret can make it hold
no more than one read (64 KiB), whatever size it declares. A frame whose declared
size is out of bounds or whose tag is wrong closes its connection (the stream
cannot be trusted past it); a frame that is well framed but not a valid request
is counted and answered by nothing, like a malformed ZeroMQ message. With CURVE,
workers use the ROUTER instead (encrypted); the data port is then not opened.
"""

import errno
import hmac
import socket
import struct
import time

import zmq

from .. import _native
from . import protocol


HEADER = struct.Struct(">IB")
REQUEST = struct.Struct(">IB16s")  # HEADER, then the tag
NONCE = 16
MAX_REQUEST = protocol.MAX_MESSAGE + 4096  # as the ROUTER's bound: a put of any entry fits
MAX_CONNECTIONS = 4096
# Bytes asked of one recv: below malloc's mmap threshold, so a small request does
# not cost an mmap/munmap pair for a buffer it hardly uses.
RECV_BYTES = 64 << 10


def frame(frames):
    """Bytes on the wire for a [mac, payload] message (bridge to worker)."""
    mac, payload = frames
    return HEADER.pack(len(payload), len(mac)) + mac + payload


def context(nonce, number):
    """What a request's MAC (and its reply's) covers besides the payload."""
    return nonce + number.to_bytes(8, "big")


def header_tag(secret, ctx, length, maclen):
    if not secret:
        return bytes(16)
    return hmac.digest(secret, ctx + HEADER.pack(length, maclen), "sha256")[:16]


def request_bytes(secret, ctx, frames):
    """Bytes on the wire for a worker's [mac, payload] request whose MAC covers ``ctx``
    (header, tag, MAC, payload: see the module's doc)."""
    mac, payload = frames
    tag = header_tag(secret, ctx, len(payload), len(mac))
    return REQUEST.pack(len(payload), len(mac), tag) + mac + payload


def next_reply(buf):
    """The first [mac, payload] frame a bridge sent, taken from ``buf`` (a bytearray of
    what was received), or None while it is incomplete.

    :raises OSError: a frame out of bounds (the stream cannot be trusted past it).
    """
    if len(buf) < HEADER.size:
        return None
    length, maclen = HEADER.unpack_from(buf)
    if length > protocol.MAX_MESSAGE or maclen > 64:
        raise OSError(errno.EPROTO, "bad frame from the bridge")
    end = HEADER.size + maclen + length
    if len(buf) < end:
        return None
    frames = [bytes(buf[HEADER.size:HEADER.size + maclen]), bytes(buf[HEADER.size + maclen:end])]
    del buf[:end]
    return frames


class DataPort:
    """The listener and its connections, served by a native thread (``_native.DataServer``,
    native/dataserver.h): it accepts, sends each connection's challenge, checks every
    header tag before buffering a body, and answers a get of a key in a partition this
    member may serve from its table (``set_cache``) without a Python step. Everything
    else comes to the bridge's loop (the poller wakes it): ``handle(frames, conn_id,
    context) -> reply frames or None``; ``closed(conn_id)`` when a connection goes away
    (its worker may be dead). ``secret``: the cluster's (tags and MACs are checked with
    it). ``counters``: the bridge's, which ``sync_counters`` brings up to date."""

    def __init__(self, address, poller, handle, counters, closed=lambda conn_id: None, secret=b""):
        host, _, port = address.rpartition(":")
        self.listener = socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET,
                                      socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host.strip("[]") or "0.0.0.0", int(port)))
        self.listener.listen(512)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.server = _native.DataServer(self.listener.fileno(), secret, MAX_CONNECTIONS, MAX_REQUEST,
                                         protocol.PROTOCOL)
        self.poller = poller
        self.handle = handle
        self.closed = closed
        self.counters = counters
        self.counted = dict.fromkeys(_NATIVE_COUNTERS, 0)  # what sync_counters added so far
        self.fd = self.server.fileno()
        poller.register(self.fd, zmq.POLLIN)

    def owns(self, item):
        return item == self.fd

    def on_event(self, fd, events):
        for conn_id, ctx, mac, payload in self.server.take():
            if ctx is None:
                self.closed(conn_id)
                continue
            reply = self.handle([mac, payload], conn_id, ctx)
            if reply is not None:
                self.server.send(conn_id, frame(reply))

    def reply(self, conn_id, frames):
        """A reply sent later (it waited for a backup) on connection ``conn_id``, if open."""
        self.server.send(conn_id, frame(frames))

    def serve_for(self, seconds, epoch):
        """Native answers go on for ``seconds`` from now, no longer, and carry partition
        table ``epoch``: the bridge renews this every turn of its loop, so a loop that
        stalled (and may have been declared dead, its partitions taken over) decides
        about every request that waited through it."""
        self.server.serve_for(seconds, epoch)

    def set_identity(self, node_id, incarnation):
        """Who the native replies say they are from."""
        self.server.set_identity(node_id, incarnation)

    def set_cache(self, name, table, parts, servable):
        """Gets of cache ``name`` in the partitions flagged in ``servable`` (bytes, one
        per partition; None: none) are answered from ``table`` by the native thread."""
        self.server.set_cache(name, table, parts, servable)

    def served(self, name):
        """Gets of cache ``name`` the native thread answered so far."""
        return self.server.served(name)

    def sync_counters(self):
        """Adds what the native thread counted since the last call to ``counters``."""
        now = self.server.counters()
        for key, counter in _NATIVE_COUNTERS.items():
            for name in counter:
                self.counters[name] += now[key] - self.counted[key]
            self.counted[key] = now[key]

    def close(self):
        self.poller.unregister(self.fd)
        self.server.close()
        self.listener.close()


# The native thread's counters -> the bridge's counters each adds to (an answered get is
# a message in and a request, as on the Python path).
_NATIVE_COUNTERS = {"malformed": ("malformed",), "unauthenticated": ("unauthenticated",),
                    "served": ("messages_in", "requests"), "bytes_in": ("bytes_in",)}


def _timeval(seconds):
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))


class Client:
    """A worker's connection to one bridge's data port (one per thread and process).
    Connecting waits for the bridge's challenge, until ``deadline`` (monotonic)."""

    SLICE = 0.05  # seconds a blocking recv waits before the caller's deadline is looked at

    def __init__(self, host, port, secret, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no time left to connect")
        self.secret = secret
        self.sock = socket.create_connection((host, port), timeout=left)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Blocking calls with kernel timeouts: no poll() before every recv, and a send
        # to a bridge that stopped reading cannot block past the call's timeout.
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(self.SLICE))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(max(left, 0.001)))
        self.buf = bytearray()
        try:
            _, nonce = self.recv(deadline - time.monotonic())
        except BaseException:
            self.sock.close()
            raise
        if len(nonce) != NONCE:
            self.sock.close()
            raise OSError(errno.EPROTO, "no challenge from the bridge")
        self.nonce = nonce
        self.number = 1

    def next_context(self):
        """The context of the request about to be sent (it is number ``self.number``)."""
        return context(self.nonce, self.number)

    def send(self, frames, send_timeout):
        data = request_bytes(self.secret, self.next_context(), frames)
        self.number += 1
        try:  # the common case: it fits in the socket's buffer at once
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent < len(data):  # a bridge that does not read: wait no longer than the call may
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(max(send_timeout, 0.001)))
            self.sock.sendall(memoryview(data)[sent:])

    def recv(self, timeout):
        """The next [mac, payload]; raises TimeoutError after ``timeout`` seconds, or OSError."""
        deadline = time.monotonic() + timeout
        while True:
            frames = next_reply(self.buf)
            if frames is not None:
                return frames
            try:
                data = self.sock.recv(RECV_BYTES)
            except BlockingIOError:  # SO_RCVTIMEO ran out
                if time.monotonic() >= deadline:
                    raise TimeoutError("no reply in time") from None
                continue
            if not data:
                raise OSError(errno.ECONNRESET, "the bridge closed the connection")
            self.buf += data

    def close(self):
        self.sock.close()
