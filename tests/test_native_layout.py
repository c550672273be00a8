"""vela._native's interface to the Python layer: the C enums it exports (one place
for every number Python needs), the bridge's own table type, and the layout
format a segment records."""
import os

import posix_ipc
import pytest

import vela
from vela import _native
from vela.segments import shm


def test_enums_come_from_the_core():
    codecs = [_native.CODEC_BYTES, _native.CODEC_STR, _native.CODEC_INT, _native.CODEC_PICKLE,
              _native.CODEC_JSON, _native.CODEC_MSGPACK, _native.CODEC_CUSTOM, _native.CODEC_TOMBSTONE]
    assert codecs == list(range(8))  # stored in every entry: they never move
    assert [_native.EVICT_LRU, _native.EVICT_LFU, _native.EVICT_TTL_ONLY] == [0, 1, 2]
    assert [_native.TOPOLOGY_LOCAL, _native.TOPOLOGY_REPLICATED, _native.TOPOLOGY_PARTITIONED] == [0, 1, 2]
    assert [_native.OP_PUT, _native.OP_DELETE, _native.OP_FLUSH, _native.OP_TAG] == [1, 2, 3, 4]
    assert [_native.FETCH_HIT, _native.FETCH_MINE, _native.FETCH_TIMEOUT, _native.FETCH_ALONE,
            _native.FETCH_BUSY] == [0, 1, 2, 3, 4]
    assert (_native.BACKEND_SHM, _native.BACKEND_FILE) == (0, 1)
    assert _native.MAX_KEY == 1024 and _native.MAX_TAGS == 32
    assert _native.MAGIC == 0x56454C41A1B2C3D4 and _native.READY == 0x52454459  # "VELA", "REDY"


def test_a_segment_records_the_format_of_the_core_that_made_it(cache):
    assert cache._table.info()["format"] == _native.FORMAT == 4


def test_the_cluster_view_limit_is_the_cores(cache):
    cache._table.set_cluster(b"x" * _native.CLUSTER_BYTES)
    assert cache._table.cluster() == b"x" * _native.CLUSTER_BYTES
    with pytest.raises(ValueError, match=f"at most {_native.CLUSTER_BYTES}"):
        cache._table.set_cluster(b"x" * (_native.CLUSTER_BYTES + 1))


def _bridge_table(name):
    seg = posix_ipc.SharedMemory(shm.segment_name(name))
    try:
        fd = os.dup(seg.fd)
    finally:
        seg.close_fd()
    return _native.BridgeTable(fd=fd, backend=_native.BACKEND_SHM, capacity=-1, stripes=-1, max_size=-1,
                               max_entry_size=-1, eviction=-1, dumps=None, dumps_codec=0, loaders={})


def test_the_bridge_has_a_table_type_of_its_own(cache_name):
    with vela.Cache(cache_name, topology="local") as worker:
        bridge = _bridge_table(cache_name)
        try:
            assert isinstance(bridge, _native.Table)
            key = _native.encode_key("k")
            assert bridge.apply_put(key, b"remote", _native.CODEC_BYTES, 0, [], 1 << 40)
            assert worker.get("k") == b"remote"
            assert not bridge.apply_put(key, b"older", _native.CODEC_BYTES, 0, [], 1 << 39)  # last writer wins
            assert bridge.get_raw(key)[:2] == (b"remote", _native.CODEC_BYTES)
            # Until the bridge opens a BridgeTable, a Table still has the bridge's methods.
            assert {"apply_put", "apply_delete", "log_read", "scan"} <= set(dir(worker._table))
        finally:
            bridge.close()
