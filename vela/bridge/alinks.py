"""A worker's requests to the bridges of a partitioned cache, for asyncio.

The same messages as vela.bridge.links (``Links.message``/``Links.reply_to``: the
protocol, the MACs, the request numbers) over the same frames
(``dataport.request_bytes``/``dataport.next_reply``), carried by asyncio streams
to a bridge's data port, or by a ``zmq.asyncio`` DEALER to its ROUTER in a
cluster with CURVE keys. Nothing here blocks the event loop.

Connections are pooled per event loop: a request takes an idle connection (or
opens one) and gives it back once its reply was read whole. A request that fails,
times out or is cancelled closes its connection instead, so a late reply can never
be read as the reply to another request, and nothing leaks.
"""

import asyncio
import errno
import os
import socket
import threading
import weakref

from ..errors import BridgeUnavailable
from . import dataport, protocol
from .links import unreached

__all__ = ["AsyncLinks"]

_MAX_IDLE = 8  # idle connections kept per bridge and event loop


async def within(deadline, awaitable):
    """``awaitable``'s result, or TimeoutError once the monotonic ``deadline`` passed
    (the event loop's clock is time.monotonic)."""
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        raise TimeoutError()
    try:
        return await asyncio.wait_for(awaitable, left)
    except asyncio.TimeoutError:  # (not the builtin one before Python 3.11)
        raise TimeoutError() from None


class _StreamConn:
    """A connection to a bridge's data port over asyncio streams."""

    def __init__(self, reader, writer, secret):
        self.reader, self.writer, self.secret = reader, writer, secret
        self.buf = bytearray()
        self.nonce = b""
        self.number = 1

    @classmethod
    async def open(cls, host, port, secret):
        reader, writer = await asyncio.open_connection(host, port)
        conn = cls(reader, writer, secret)
        try:
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _, nonce = await conn.recv()  # the bridge's challenge
            if len(nonce) != dataport.NONCE:
                raise OSError(errno.EPROTO, "no challenge from the bridge")
        except BaseException:
            conn.close()
            raise
        conn.nonce = nonce
        return conn

    def next_context(self):
        return dataport.context(self.nonce, self.number)

    async def send(self, frames):
        data = dataport.request_bytes(self.secret, self.next_context(), frames)
        self.number += 1
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self):
        while True:
            frames = dataport.next_reply(self.buf)
            if frames is not None:
                return frames
            data = await self.reader.read(dataport.RECV_BYTES)
            if not data:
                raise ConnectionResetError(errno.ECONNRESET, "the bridge closed the connection")
            self.buf += data

    def close(self):
        self.writer.close()


class _ZmqConn:
    """A ``zmq.asyncio`` DEALER to a bridge's ROUTER (clusters with CURVE keys)."""

    def __init__(self, addr, curve):
        import zmq
        import zmq.asyncio

        self.zmq = zmq
        # (on the process's one context, the sync sockets' own: no second set of I/O threads)
        sock = self.sock = zmq.asyncio.Context.shadow(zmq.Context.instance().underlying).socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE + 4096)
        if curve:
            sock.curve_serverkey = curve[0]
            sock.curve_publickey, sock.curve_secretkey = curve
        sock.connect(addr)
        self.number = 1

    def next_context(self):
        return b""  # (CURVE sessions refuse replays themselves)

    async def send(self, frames):
        self.number += 1
        try:
            await self.sock.send_multipart(frames)
        except self.zmq.ZMQError as exc:
            raise OSError(exc.errno, str(exc)) from None

    async def recv(self):
        try:
            return await self.sock.recv_multipart()
        except self.zmq.ZMQError as exc:
            raise OSError(exc.errno, str(exc)) from None

    def close(self):
        self.sock.close(0)


class AsyncLinks:
    """The asyncio counterpart of a :class:`vela.bridge.links.Links` (whose secret, keys,
    request ids and timeout it shares)."""

    def __init__(self, links):
        self.links = links
        # event loop -> {address: [idle connections]} (a stream belongs to its loop)
        self._idle = weakref.WeakKeyDictionary()
        self._pid = os.getpid()
        self._lock = threading.Lock()  # (event loops of several threads may share the handle)

    def _pool(self, addr):
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's connections stay its own
                self._idle = weakref.WeakKeyDictionary()
                self._pid = os.getpid()
            return self._idle.setdefault(loop, {}).setdefault(addr, [])

    async def _open(self, addr):
        if addr.startswith("vela://"):
            host, _, port = addr[len("vela://"):].rpartition(":")
            return await _StreamConn.open(host.strip("[]"), int(port), self.links.secret)
        return _ZmqConn(addr, self.links.curve)

    async def request(self, addr, fields, epoch, deadline):
        """One request to the bridge at ``addr``; its reply (a dict).

        :raises BridgeUnavailable: no reply by ``deadline`` (monotonic seconds), or the
            connection failed.
        """
        pool = self._pool(addr)
        conn = pool.pop() if pool else None
        if conn is None:
            try:
                conn = await within(deadline, self._open(addr))
            except (OSError, ValueError) as exc:
                raise unreached(f"cannot reach the vela-bridge at {addr}: {exc or type(exc).__name__}") from None
        try:
            rid, ctx, frames = self.links.message(conn, fields, epoch)
            reply = await within(deadline, self._exchange(conn, frames, ctx, rid))
        except BaseException as exc:
            if conn is not None:
                conn.close()  # a request cut short takes its connection with it
            if isinstance(exc, (OSError, ValueError)):  # (TimeoutError is an OSError)
                why = f"within {self.links.timeout:g} s" if isinstance(exc, TimeoutError) else f"({exc})"
                raise BridgeUnavailable(f"no answer from the vela-bridge at {addr} {why} "
                                        f"(cache {self.links.cache_name!r})") from None
            raise
        if len(pool) < _MAX_IDLE:
            pool.append(conn)
        else:
            conn.close()
        return reply

    async def _exchange(self, conn, frames, ctx, rid):
        await conn.send(frames)
        while True:
            reply = self.links.reply_to(await conn.recv(), ctx, rid)
            if reply is not None:
                return reply

    async def request_all(self, targets, epoch, deadline):
        """Several requests at once [(addr, fields)], answered in that order: for each, its
        reply or the BridgeUnavailable saying why its bridge did not answer."""
        return await asyncio.gather(*(self._answer(addr, fields, epoch, deadline) for addr, fields in targets))

    async def _answer(self, addr, fields, epoch, deadline):
        try:
            return await self.request(addr, fields, epoch, deadline)
        except BridgeUnavailable as exc:
            return exc

    def close(self):
        """Close the idle connections of every event loop (those of a request in flight
        close when it ends)."""
        with self._lock:
            pools_of_loops = list(self._idle.values())
        for pools in pools_of_loops:
            for conns in pools.values():
                while conns:
                    try:
                        conns.pop().close()
                    except RuntimeError:
                        pass  # its event loop is closed: the connection went with it
