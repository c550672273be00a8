"""A worker's requests to the bridges of a partitioned cache.

Each request goes straight to the bridge that owns the key (or to every
member, for totals), on a ZeroMQ DEALER socket per bridge address. Sockets
are made lazily, per thread (a ZeroMQ socket is not thread-safe) and per
process (a forked child makes its own). Requests are authenticated and
checked exactly like the bridges' own messages (vela.bridge.protocol); every
wait is bounded, and a request that timed out takes its socket with it, so a
late answer can never be mistaken for the answer to the next request.
"""

import itertools
import os
import threading
import time

from ..errors import BridgeUnavailable, OptionError
from . import protocol

_OPTIONS = {"timeout", "secret_file", "curve_key_file"}


def read_secret(path):
    with open(path, "rb") as f:
        secret = f.read().strip()
    if len(secret) < 16:
        raise OptionError(f"topology_opts['secret_file']: {path} holds fewer than 16 bytes")
    return secret


def read_curve(path):
    with open(path, "rb") as f:
        lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    if len(lines) != 2 or any(len(k) != 40 for k in lines):
        raise OptionError(f"topology_opts['curve_key_file']: {path} must hold two z85 keys (vela-bridge keygen)")
    return lines[0], lines[1]


class Links:
    """Request/reply to bridges. ``topology_opts``: timeout (seconds, default 3),
    secret_file (the cluster's shared secret), curve_key_file (its CURVE keys)."""

    def __init__(self, cache_name, topology_opts):
        opts = dict(topology_opts or {})
        unknown = set(opts) - _OPTIONS
        if unknown:
            raise OptionError(f"topology_opts: unknown option(s) {', '.join(sorted(unknown))} for the "
                              f"partitioned topology (it takes {', '.join(sorted(_OPTIONS))})")
        timeout = opts.get("timeout", 3.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < 3600:
            raise OptionError(f"topology_opts['timeout'] must be positive seconds, not {timeout!r}")
        self.timeout = float(timeout)
        self.cache_name = cache_name
        self.secret = read_secret(opts["secret_file"]) if opts.get("secret_file") else b""
        self.curve = read_curve(opts["curve_key_file"]) if opts.get("curve_key_file") else None
        self._local = threading.local()
        self._ids = itertools.count(1)

    def _sockets(self):
        local = self._local
        if getattr(local, "pid", None) != os.getpid():  # a forked child starts afresh
            local.pid = os.getpid()
            local.sockets = {}
        return local.sockets

    def _socket(self, addr):
        import zmq

        sockets = self._sockets()
        sock = sockets.get(addr)
        if sock is None:
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE + 4096)
            if self.curve:
                sock.curve_serverkey = self.curve[0]
                sock.curve_publickey, sock.curve_secretkey = self.curve
            sock.connect(addr)
            sockets[addr] = sock
        return sock

    def _drop(self, addr):
        sock = self._sockets().pop(addr, None)
        if sock is not None:
            sock.close(0)

    def close(self):
        for addr in list(self._sockets()):
            self._drop(addr)

    def request(self, addr, fields, epoch, deadline=None):
        """One request to the bridge at ``addr``; its reply (a dict)."""
        return self.request_all([(addr, fields)], epoch, deadline)[0]

    def request_all(self, targets, epoch, deadline=None):
        """Several requests at once [(addr, fields)], answered in that order.

        :raises BridgeUnavailable: one of them was not answered by the deadline.
        """
        import zmq

        deadline = deadline or time.monotonic() + self.timeout
        waiting = {}
        for i, (addr, fields) in enumerate(targets):
            rid = next(self._ids)
            msg = dict(fields, t="req", v=protocol.PROTOCOL, inc=0, id=rid, c=self.cache_name, e=epoch)
            msg["from"] = 0
            sock = self._socket(addr)
            try:
                sock.send_multipart(protocol.pack(self.secret, msg), flags=zmq.NOBLOCK)
            except zmq.Again:
                self._drop(addr)
                raise BridgeUnavailable(f"the bridge at {addr} takes no more requests (queue full)") from None
            waiting[rid] = (i, addr, sock)
        replies = [None] * len(targets)
        poller = zmq.Poller()
        for _, _, sock in waiting.values():
            poller.register(sock, zmq.POLLIN)
        while waiting:
            left = deadline - time.monotonic()
            ready = dict(poller.poll(max(0, int(left * 1000)))) if left > 0 else {}
            if not ready:
                for _, addr, _ in waiting.values():
                    self._drop(addr)  # a late reply must not meet the next request
                missing = sorted({addr for _, addr, _ in waiting.values()})
                raise BridgeUnavailable(f"no answer from the vela-bridge at {', '.join(missing)} within "
                                        f"{self.timeout:g} s (cache {self.cache_name!r})")
            for sock in ready:
                while True:
                    try:
                        frames = sock.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        msg = protocol.unpack(self.secret, frames)
                    except protocol.Malformed:
                        continue  # not from a bridge of ours: ignored
                    slot = waiting.get(msg["id"]) if msg["t"] == "rep" else None
                    if slot is None or slot[2] is not sock:
                        continue  # the answer to a request given up on
                    del waiting[msg["id"]]
                    replies[slot[0]] = msg
        return replies
