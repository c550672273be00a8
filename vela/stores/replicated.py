"""The replicated store: every host holds every entry.

Workers write the host's table as the local store does; the C core logs each
change for the host's bridge, which carries it to the other hosts. Puts and
deletes need no socket (they travel through the change log in the
segment); only calls that must return a cluster-wide count ask the host's
bridge, over a local ipc socket, with a bounded wait.

A flush or tag invalidation is also kept in a small file next to the segment
(``marks_path``) before the bridge is asked: the change log is a ring that
workers may run over while the bridge is stopped, and a delete survives that as
a tombstone in the table, but a flush or tag invalidation leaves nothing in the
table. The bridge takes the kept marks on its next turn (replica.py) and
carries them in its snapshots, so the other hosts learn them even when the log
record was lost.
"""

import asyncio
import fcntl
import os
import struct
import threading
import time

from .. import _native, options
from ..errors import BridgeUnavailable
from ..segments import shm
from .local import LocalStore

_OPTIONS = {"bridge", "bridge_timeout"}
SHM_DIR = "/dev/shm"


# Between two asks of a bridge that answered "retry" (just started, learning its cluster).
NOT_READY_POLL = 0.05
MARK = struct.Struct("<QQQ")  # record op (OP_FLUSH or OP_TAG), tag id (0 for a flush), version
_MARK_OPS = {"flush": _native.OP_FLUSH, "tag": _native.OP_TAG}


def beside_segment(cache_name, suffix):
    """A file next to the cache's segment: ``/dev/shm/vela.<name>.<suffix>``
    (VELA_NAMESPACE included as in the segment's name)."""
    return f"{SHM_DIR}/{shm.segment_name(cache_name).lstrip('/')}.{suffix}"


def control_endpoint(cache_name):
    """The address of the bridge's control socket for a cache: next to the cache's
    segment, so whoever shares the segment's directory (a sidecar container sharing
    /dev/shm) reaches it, and nobody depends on TMPDIR. The bridge makes it mode
    0600: the segment's owner only."""
    return "ipc://" + beside_segment(cache_name, "bridge")


def marks_path(cache_name):
    """Flushes and tag invalidations kept for the bridge (see the module's doc)."""
    return beside_segment(cache_name, "marks")


MAX_MARKS_BYTES = 64 << 10  # past this (no bridge takes them), the file is compacted


def keep_mark(cache_name, op, version, tag=0):
    """Append a flush or tag invalidation to the cache's marks file (one write of a
    fixed-size record under a shared lock: the bridge empties it under an exclusive one)."""
    fd = os.open(marks_path(cache_name), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.write(fd, MARK.pack(_MARK_OPS[op], tag, version))
        if os.fstat(fd).st_size > MAX_MARKS_BYTES:
            # No bridge has taken them for a long while: keep the newest of each.
            fcntl.flock(fd, fcntl.LOCK_EX)
            newest = {}
            for op_, tag_, version_ in _drain(fd):
                newest[op_, tag_] = max(version_, newest.get((op_, tag_), 0))
            os.write(fd, b"".join(MARK.pack(o, t, v) for (o, t), v in newest.items()))
    finally:
        os.close(fd)


def take_marks(path):
    """[(op, tag, version)] kept in the marks file at ``path``, which is emptied."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return []
    try:
        if os.fstat(fd).st_size == 0:
            return []
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _drain(fd)
    finally:
        os.close(fd)


def _drain(fd):
    """The records of the marks file open at ``fd`` (locked exclusively); it is emptied."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 1 << 20):
        data += chunk
    os.ftruncate(fd, 0)
    usable = len(data) - len(data) % MARK.size
    return [MARK.unpack_from(data, i) for i in range(0, usable, MARK.size)]


class BridgeClient:
    """The worker's socket to its host's bridge (one request at a time, bounded wait)."""

    def __init__(self, cache_name, topology_opts):
        opts = options.topology_opts("replicated", topology_opts, _OPTIONS)
        self.cache_name = cache_name
        self.endpoint = opts.get("bridge") or control_endpoint(cache_name)
        self.timeout_ms = int(options.topology_timeout(opts, "bridge_timeout") * 1000)
        self._socket = None
        self._pid = None
        self._lock = threading.Lock()  # a REQ socket takes one request at a time

    def _sock(self):
        import zmq  # only replicated caches need pyzmq

        # Sockets do not survive fork, nor the end of their context (Context.destroy).
        if self._socket is None or self._socket.closed or self._pid != os.getpid():
            self._socket = zmq.Context.instance().socket(zmq.REQ)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
            self._socket.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
            self._socket.connect(self.endpoint)
            self._pid = os.getpid()
        return self._socket

    def close(self):
        if self._socket is not None and self._pid == os.getpid():
            self._socket.close(0)
        self._socket = None

    def call(self, request):
        """One request to the bridge; its reply (a dict). A bridge that just started
        answers "retry" until it knows its cluster: asked again until the timeout."""
        request = dict(request, cache=self.cache_name)
        deadline = time.monotonic() + self.timeout_ms / 1000
        while True:
            with self._lock:
                reply = self._call(request)
            if not self._retry(reply, deadline):
                return self._accepted(reply)
            time.sleep(NOT_READY_POLL)

    def _call(self, request):
        import msgpack
        import zmq

        try:
            sock = self._sock()
            sock.send(msgpack.packb(request, use_bin_type=True))
            reply = msgpack.unpackb(sock.recv(), raw=False)
        except zmq.ZMQError as exc:
            if self._socket is not None:  # a REQ socket that timed out is stuck: start afresh
                self._socket.close(0)
                self._socket = None
            raise self._unanswered(exc) from exc
        return reply

    @staticmethod
    def _retry(reply, deadline):
        """True when the bridge asks to be asked again (it does not know its cluster yet)
        and there is time left for another try."""
        return isinstance(reply, dict) and reply.get("retry") is True and time.monotonic() + NOT_READY_POLL < deadline

    def _unanswered(self, why):
        return BridgeUnavailable(
            f"the vela-bridge of this host did not answer at {self.endpoint} within "
            f"{self.timeout_ms / 1000:g} s ({why or type(why).__name__}); the change is in the change log and "
            "reaches the other hosts when the bridge runs, but the cluster-wide count is unknown")

    @staticmethod
    def _accepted(reply):
        if not isinstance(reply, dict) or "error" in reply:
            raise BridgeUnavailable(f"the bridge refused the request: {reply!r}")
        return reply

    async def acall(self, request):
        """``call`` for asyncio: a ``zmq.asyncio`` REQ socket of its own, closed when the
        call ends, times out or is cancelled (a REQ socket left waiting is stuck)."""
        import msgpack
        import zmq
        import zmq.asyncio

        from ..bridge.alinks import within

        request = dict(request, cache=self.cache_name)
        # (on the process's one context, the sync sockets' own: no second set of I/O threads)
        sock = zmq.asyncio.Context.shadow(zmq.Context.instance().underlying).socket(zmq.REQ)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            deadline = time.monotonic() + self.timeout_ms / 1000

            async def exchange():
                await sock.send(msgpack.packb(request, use_bin_type=True))
                return msgpack.unpackb(await sock.recv(), raw=False)

            while True:
                try:
                    reply = await within(deadline, exchange())
                except (zmq.ZMQError, TimeoutError) as exc:
                    raise self._unanswered(exc) from exc
                if not self._retry(reply, deadline):
                    break
                await asyncio.sleep(NOT_READY_POLL)
        finally:
            sock.close(0)
        return self._accepted(reply)

    def total(self, request):
        """The other members' count for a flush or tag invalidation this host just did
        (kept for the bridge first: it reaches the others even if this call fails).
        BridgeUnavailable when a member did not confirm it: a read there may still find
        what it removes, until the member takes it (its bridge's next turn, or a snapshot)."""
        keep_mark(self.cache_name, request["op"], request["version"], request.get("tag", 0))
        return self._confirmed(request, self.call(request))

    async def atotal(self, request):
        """``total`` for asyncio: the wait for the bridge never blocks the event loop.
        Cancelled while it waits, the change stands on this host and is kept for the
        bridge (as when the bridge does not answer)."""
        keep_mark(self.cache_name, request["op"], request["version"], request.get("tag", 0))
        return self._confirmed(request, await self.acall(request))

    def _confirmed(self, request, reply):
        if reply.get("missing"):
            raise BridgeUnavailable(
                f"cache {self.cache_name!r}: member(s) {', '.join(map(str, reply['missing']))} did not confirm "
                f"the {'flush' if request['op'] == 'flush' else 'tag invalidation'} in time; it is made on this "
                "host and reaches them when they answer")
        return int(reply.get("removed", 0))


class ReplicatedStore(LocalStore):
    """The local store whose flush and invalidate_tag the host's bridge carries to
    every live member before they return (see vela.stores.base.Store)."""

    def __init__(self, opened, client: BridgeClient, local_objects: int = 0):
        super().__init__(opened, local_objects)
        self.client = client

    def invalidate_tag(self, tag):
        # Every live member applies it before we return; each removes the same keys,
        # so the count is this host's (a sum over replicas would count a key per host).
        count, version, tag_id = self.table.invalidate_tag_versioned(tag)
        self.client.total({"op": "tag", "tag": tag_id, "version": version})
        return count

    def flush(self):
        count, version = self.table.flush_versioned()
        self.client.total({"op": "flush", "version": version})
        return count

    # asyncio: this host's table inline (microseconds), the bridge's confirmation awaited.

    async def ainvalidate_tag(self, tag):
        count, version, tag_id = self.table.invalidate_tag_versioned(tag)
        await self.client.atotal({"op": "tag", "tag": tag_id, "version": version})
        return count

    async def aflush(self):
        count, version = self.table.flush_versioned()
        await self.client.atotal({"op": "flush", "version": version})
        return count

    def close(self):
        try:
            super().close()
        finally:
            self.client.close()
