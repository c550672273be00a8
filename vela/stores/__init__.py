"""What holds a cache's entries: one module per store, behind one interface.

- ``base``: the interface (:class:`~vela.stores.base.Store`) and what its methods take;
- ``local``: the host's table alone;
- ``replicated``: the host's table, every host holding everything (its bridge
  carries the change log; this store asks it for cluster-wide totals);
- ``partitioned``: each key on one owner's host, found in the partition table the
  host's bridge publishes in the segment;
- ``redis``: Redis holds the entries, the host table the leases and counters;
- ``near``: L1 copies in the host table in front of the Redis store (a store that
  wraps it: ``near_cache=True``).

:func:`open_store` picks the store from what the segment records, so every handle
on a segment gets the same store whatever options it omitted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from .. import _native
from .._extras import need
from ..errors import LayoutMismatch, OptionError
from ..segments.table import OpenTable, backend_module

__all__ = ["open_store"]

_NAMES = {_native.TOPOLOGY_LOCAL: "local", _native.TOPOLOGY_REPLICATED: "replicated",
          _native.TOPOLOGY_PARTITIONED: "partitioned"}


def open_store(name: str, *, backend: Any, backend_opts: Optional[Mapping[str, Any]], topology: Optional[int],
               topology_opts: Optional[Mapping[str, Any]], layout: Mapping[str, int],
               near_l1_ttl: Optional[float], serializer: Any, stats_enabled: bool, lock_timeout: float,
               sweep_interval: Optional[float], stampede_timeout: float, local_objects: int = 0):
    """The store of the cache ``name`` (its options checked by vela.Cache).

    :param topology: a _native.TOPOLOGY_* value, or None: the segment's (local when
        this call creates it).
    :param near_l1_ttl: None, or the maximum age of L1 copies (``near_cache=True``).
    :param local_objects: how many decoded values the handle keeps (0: none); only a
        store whose entries are all in the host's table keeps them.
    :raises vela.OptionError: a combination no store serves (naming both options);
        nothing is created.
    """
    if backend == "redis":
        if local_objects:
            raise OptionError("local_objects: the Redis backend holds its entries in Redis, not in this "
                              "host's table; use near_cache=True for copies on the host")
        if topology not in (None, _native.TOPOLOGY_LOCAL):
            raise OptionError(f"topology={_NAMES[topology]!r}: the Redis backend is its own topology "
                              "(every host that uses the URL shares the entries); use topology='local'")
        if topology_opts not in (None, {}):
            raise OptionError(f"topology_opts: the local topology takes no options, got {topology_opts!r}")
        need("redis", "backend='redis'")
        from .redis_aio import AsyncRedisStore  # imports redis-py only when used

        store = AsyncRedisStore(name, backend_opts, layout=layout, serializer=serializer, stats_enabled=stats_enabled,
                           lock_timeout=lock_timeout, sweep_interval=sweep_interval, stampede_timeout=stampede_timeout)
        if near_l1_ttl is None:
            return store
        from .near import NearStore

        try:
            return NearStore(store, near_l1_ttl)
        except BaseException:
            store.close()
            raise

    segments = backend_module(backend)
    if topology is None:  # adopt: what the segment records (a new segment is local)
        recorded = segments.peek_topology(name, backend_opts)
        chosen = _native.TOPOLOGY_LOCAL if recorded is None else recorded
    else:
        chosen = topology
    if near_l1_ttl is not None and chosen != _native.TOPOLOGY_PARTITIONED:
        raise OptionError("near_cache=True needs a remote store behind the table: "
                          f"backend='redis' or topology='partitioned' (not backend={backend!r}, "
                          f"topology={_NAMES[chosen]!r})")
    if local_objects and chosen == _native.TOPOLOGY_PARTITIONED:
        raise OptionError("local_objects: topology='partitioned' holds most keys on other hosts; "
                          "decoded values are kept for the local and replicated topologies")
    client = _topology_client(name, chosen, topology_opts)
    opened = None
    try:
        opened = OpenTable(name, backend, backend_opts,
                           dict(layout, replicated=-1 if topology is None else topology),
                           serializer=serializer, stats_enabled=stats_enabled, lock_timeout=lock_timeout,
                           sweep_interval=sweep_interval)
        if opened.topology != chosen:  # (made again with another topology meanwhile)
            raise LayoutMismatch(f"cache {name!r} was made again with topology={_NAMES[opened.topology]} "
                                 "while this handle opened it: open it again")
        if chosen == _native.TOPOLOGY_PARTITIONED:
            from .partitioned import PartitionedStore

            return PartitionedStore(name, opened, client, near_l1_ttl)
        if chosen == _native.TOPOLOGY_REPLICATED:
            from .replicated import ReplicatedStore

            return ReplicatedStore(opened, client, local_objects)
        from .local import LocalStore

        return LocalStore(opened, local_objects)
    except BaseException:
        if opened is not None:
            opened.close()
        if client is not None:
            client.close()
        raise


def _topology_client(name, topology, topology_opts):
    """The worker's client of the host's bridge for a cluster topology (its options
    checked before anything is opened); None for a local cache."""
    if topology == _native.TOPOLOGY_LOCAL:
        if topology_opts not in (None, {}):
            raise OptionError(f"topology_opts: the local topology takes no options, got {topology_opts!r}")
        return None
    for module in ("zmq", "msgpack"):
        need(module, f"topology={_NAMES[topology]!r}")
    if topology == _native.TOPOLOGY_REPLICATED:
        from .replicated import BridgeClient

        return BridgeClient(name, topology_opts)
    from ..bridge.links import Links

    return Links(name, topology_opts)
