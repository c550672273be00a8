"""The data port: workers' requests over plain TCP, served in the bridge's loop.

A worker's request to a partition owner is a round trip it waits for, so every
hop counts: a ZeroMQ socket passes each message through a background I/O thread
on both ends, which on a small or virtualised machine costs more than the whole
request. The data port is a plain TCP listener whose connections the bridge's
own poller watches, so a request wakes one thread on each side, like a Redis
GET. It carries the same messages as the ROUTER (``protocol.pack``: the HMAC,
then the msgpack payload; the same validation).

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
import itertools
import logging
import os
import socket
import struct
import time

import zmq

from . import protocol

log = logging.getLogger("vela.bridge")

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


class Connection:
    __slots__ = ("sock", "fd", "id", "inbuf", "outbuf", "nonce", "number")

    def __init__(self, sock, conn_id):
        self.sock = sock
        self.fd = sock.fileno()
        self.id = conn_id  # unlike a descriptor, never reused
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.nonce = os.urandom(NONCE)
        self.number = 1  # of the next request


class DataPort:
    """The listener and its connections; ``handle(frames, conn_id, context) -> reply
    frames or None``; ``closed(conn_id)`` when a connection goes away (its worker may
    be dead). ``secret``: the cluster's (header tags are checked with it)."""

    def __init__(self, address, poller, handle, counters, closed=lambda conn_id: None, secret=b""):
        self.secret = secret
        host, _, port = address.rpartition(":")
        self.listener = socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET,
                                      socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host.strip("[]") or "0.0.0.0", int(port)))
        self.listener.listen(512)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.poller = poller
        self.handle = handle
        self.closed = closed
        self.counters = counters
        self.ids = itertools.count(1)
        self.conns = {}  # file descriptor -> Connection (the poller reports descriptors)
        self.by_id = {}  # connection id -> Connection (held replies name their connection by id)
        self.fd = self.listener.fileno()
        poller.register(self.fd, zmq.POLLIN)

    def owns(self, item):
        return item == self.fd or item in self.conns if isinstance(item, int) else False

    def on_event(self, fd, events):
        if fd == self.fd:
            self._accept()
            return
        conn = self.conns.get(fd)
        if conn is None:
            return
        if events & zmq.POLLIN and not self._read(conn):
            return
        if conn.outbuf:
            self._write(conn)

    def _accept(self):
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: keep the bridge alive
                log.warning("data port: accept failed: %s", exc)
                return
            if len(self.conns) >= MAX_CONNECTIONS:
                sock.close()
                self.counters["malformed"] += 1
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, next(self.ids))
            self.conns[conn.fd] = conn
            self.by_id[conn.id] = conn
            self.poller.register(conn.fd, zmq.POLLIN)
            conn.outbuf += frame([b"", conn.nonce])  # the challenge
            self._write(conn)

    def _read(self, conn):
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return False
        buf = conn.inbuf
        buf += data
        pos = 0
        while len(buf) - pos >= REQUEST.size:
            length, maclen, tag = REQUEST.unpack_from(buf, pos)
            if length > MAX_REQUEST or maclen > 64:
                self.counters["malformed"] += 1
                self._close(conn)  # the stream cannot be trusted past a bad frame
                return False
            ctx = context(conn.nonce, conn.number)
            if self.secret and not hmac.compare_digest(tag, header_tag(self.secret, ctx, length, maclen)):
                # Not from a holder of the secret, or not this connection's next request
                # (a replay): hang up before buffering what it declares.
                self.counters["unauthenticated"] += 1
                self._close(conn)
                return False
            end = pos + REQUEST.size + maclen + length
            if len(buf) < end:
                break
            mac = bytes(buf[pos + REQUEST.size:pos + REQUEST.size + maclen])
            payload = bytes(buf[pos + REQUEST.size + maclen:end])
            pos = end
            conn.number += 1
            reply = self.handle([mac, payload], conn.id, ctx)
            if reply is not None:
                conn.outbuf += frame(reply)
        del buf[:pos]
        return True

    def reply(self, conn_id, frames):
        """A reply sent later (it waited for a backup) on connection ``conn_id``, if open."""
        conn = self.by_id.get(conn_id)
        if conn is not None:
            conn.outbuf += frame(frames)
            self._write(conn)

    def _write(self, conn):
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        del conn.outbuf[:sent]
        # Wait for room only while there is something left to send.
        self.poller.modify(conn.fd, zmq.POLLIN | (zmq.POLLOUT if conn.outbuf else 0))

    def _close(self, conn):
        self.conns.pop(conn.fd, None)
        self.by_id.pop(conn.id, None)
        try:
            self.poller.unregister(conn.fd)
        except KeyError:
            pass
        conn.sock.close()
        self.closed(conn.id)

    def close(self):
        for conn in list(self.conns.values()):
            self._close(conn)
        self.poller.unregister(self.fd)
        self.listener.close()


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
