"""The worker's side of the bridge: cluster-wide totals for flush and invalidate_tag.

Puts and deletes need no socket (they travel through the change log in the
segment); only calls that must return a cluster-wide count ask the host's
bridge, over a local ipc socket, with a bounded wait.
"""

import os
import threading

from .. import options
from ..backends import shm
from ..errors import BridgeUnavailable

_OPTIONS = {"bridge", "bridge_timeout"}
SHM_DIR = "/dev/shm"


def control_endpoint(cache_name):
    """The address of the bridge's control socket for a cache: next to the cache's
    segment (``/dev/shm/vela.<name>.bridge``, VELA_NAMESPACE included as in the
    segment's name), so whoever shares the segment's directory (a sidecar
    container sharing /dev/shm) reaches it, and nobody depends on TMPDIR. The
    bridge makes it mode 0600: the segment's owner only."""
    return f"ipc://{SHM_DIR}/{shm.segment_name(cache_name).lstrip('/')}.bridge"


class BridgeClient:
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

        if self._socket is None or self._pid != os.getpid():  # sockets do not survive fork
            self._socket = zmq.Context.instance().socket(zmq.REQ)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
            self._socket.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
            self._socket.connect(self.endpoint)
            self._pid = os.getpid()
        return self._socket

    def call(self, request):
        """One request to the bridge; its reply (a dict)."""
        request = dict(request, cache=self.cache_name)
        with self._lock:
            return self._call(request)

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
            raise BridgeUnavailable(
                f"the vela-bridge of this host did not answer at {self.endpoint} within "
                f"{self.timeout_ms / 1000:g} s ({exc}); the change is in the change log and reaches the "
                "other hosts when the bridge runs, but the cluster-wide count is unknown") from exc
        if not isinstance(reply, dict) or "error" in reply:
            raise BridgeUnavailable(f"the bridge refused the request: {reply!r}")
        return reply

    def total(self, request):
        """The other members' count for a flush or tag invalidation this host just did."""
        return int(self.call(request).get("removed", 0))
