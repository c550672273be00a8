"""One member's Partitions in the test's process, no bridge and no network: the rules of
vela.bridge.partitions exercised directly, as member 1 of the ring [1, 2, 3] with one
backup. The ``parts`` fixture (import it into a test module to use it)."""
import uuid

import pytest

import vela
from vela.bridge.partitions import Partitions
from vela.bridge.quorum import Quorum


class LoneNode:
    """What Partitions asks of its bridge."""
    node_id = 1
    ring_epoch = 1
    quorum = Quorum(2.0)


@pytest.fixture
def parts(monkeypatch):
    monkeypatch.setenv("VELA_NAMESPACE", f"lm{uuid.uuid4().hex[:8]}")
    cache = vela.Cache(f"p{uuid.uuid4().hex[:8]}", capacity="8MiB", topology="partitioned", sweep_interval=None)
    try:
        p = Partitions(cache.name, cache, LoneNode(), backups=1)
        p.set_ring([1, 2, 3], {1, 2, 3})
        yield p
    finally:
        cache.destroy()
