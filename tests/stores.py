"""Every store a ``vela.Cache`` can sit on, set up for the contract suite.

A ``Store`` is one cache of one kind, opened in the test process as a worker of
host A (``store.cache``), with what the kind needs around it:

- ``shm-local``, ``file-local``: the table alone; ``shm-local-objects``: shm-local
  opened with ``local_objects=True`` (every read through the kept objects);
- ``shm-replicated``, ``file-replicated``, ``shm-partitioned``, ``file-partitioned``:
  two simulated hosts (``cluster.Host``: a namespace, an agent holding the cache
  open, a real ``vela-bridge``; file-backed hosts each have their own data dir and
  their bridge runs with ``--backend file --data-dir DIR``);
- ``redis``, ``redis-near``: a real ``redis-server``; host B is a second namespace
  (its own host table) on the same server.

``store.open(**options)`` opens one more handle on host A with the store's options
(per-handle options may be added); ``store.on_host_b(fn, *args)`` runs
``fn(cache, *args)`` in a forked process that is a worker of host B and returns its
result; ``store.in_worker_of(host, fn, *args)`` is the same as a child function for
``conftest.run_children``. ``Store.close()`` stops everything it started and
removes every segment and file of its namespaces.
"""

import glob
import os
import shutil
import tempfile
import uuid

import vela
from cluster import Cluster, Host, eventually
from conftest import run_in_child

STORE_KINDS = ("shm-local", "file-local", "shm-replicated", "file-replicated", "shm-partitioned",
               "file-partitioned", "redis", "redis-near", "shm-local-objects")

CAPACITY = "16MiB"
CAPACITY_BYTES = 16 << 20
BRIDGE_TIMEOUT = 5.0
# Long enough that a bridge paused for a test's timeout is not declared dead meanwhile.
FAILURE_TIMEOUT = 4.0


def unlink_namespace_segments(namespace):
    """Remove every shared-memory segment of a simulated host (tables, bridge marks, L1)."""
    for path in glob.glob(f"/dev/shm/vela.{namespace}.*"):
        try:
            os.unlink(path)
        except OSError:
            pass


def _worker(namespace, options, fn, args):
    """Body of a forked worker of the host ``namespace``: its own handle, ``fn(cache, *args)``."""
    os.environ["VELA_NAMESPACE"] = namespace
    cache = vela.Cache(**options)
    try:
        return fn(cache, *args)
    finally:
        cache.close()


class Store:
    def __init__(self, kind, redis_url=None):
        assert kind in STORE_KINDS, kind
        self.kind = kind
        self.backend, _, topology = kind.partition("-")
        self.topology = topology if topology in ("replicated", "partitioned") else "local"
        self.near = kind == "redis-near"
        self.objects = kind.endswith("-objects")  # local_objects=True: reads return kept objects
        self.redis_url = redis_url
        self.name = f"k{uuid.uuid4().hex[:10]}"
        self.workdir = tempfile.mkdtemp(prefix=f"vela-contract-{kind}-")
        self.cluster = None
        self.cache = None
        self.namespaces = {"A": f"vc{uuid.uuid4().hex[:8]}A", "B": f"vc{uuid.uuid4().hex[:8]}B"}
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def __repr__(self):
        return f"<Store {self.kind} {self.name}>"

    # ---- what the kind is -----------------------------------------------------------

    @property
    def spans_hosts(self):
        """A write on host A is read on host B (replicated, partitioned, Redis)."""
        return self.topology != "local" or self.backend == "redis"

    @property
    def bridged(self):
        return self.topology in ("replicated", "partitioned")

    @property
    def one_host_holds_everything(self):
        """Local and replicated: every key of a batch is on this host (all-or-nothing)."""
        return self.backend != "redis" and self.topology in ("local", "replicated")

    def data_dir(self, host):
        return os.path.join(self.workdir, f"data-{host}")

    def options(self, host="A", **extra):
        """The keyword arguments of ``vela.Cache`` for a worker of ``host``."""
        opts = dict(name=self.name, capacity=CAPACITY, sweep_interval=None)
        if self.backend == "file":
            opts.update(backend="file", backend_opts={"data_dir": self.data_dir(host)})
        elif self.backend == "redis":
            opts.update(backend="redis", backend_opts={"url": self.redis_url}, near_cache=self.near)
        if self.objects:
            opts.update(local_objects=True)
        if self.topology == "replicated":
            opts.update(topology="replicated", topology_opts={"bridge_timeout": BRIDGE_TIMEOUT})
        elif self.topology == "partitioned":
            opts.update(topology="partitioned", topology_opts={"timeout": BRIDGE_TIMEOUT})
        opts.update(extra)
        return opts

    # ---- set-up -----------------------------------------------------------------------

    def _start(self):
        if self.bridged:
            self._start_cluster()
        os.makedirs(self.data_dir("A"), exist_ok=True)
        os.makedirs(self.data_dir("B"), exist_ok=True)
        self.cache = self.open()
        if self.bridged:  # (partitioned: its partition table; replicated: synced, and it knows the cluster)
            eventually(lambda: (self.cache.cluster() or {}).get("ready"), 20,
                       what=f"{self.kind}: the bridge of host A is ready")

    def _start_cluster(self):
        self.cluster = Cluster(self.workdir, n=0, start=False, name=self.name, topology=self.topology)
        for node_id, label in ((1, "A"), (2, "B")):
            os.makedirs(self.data_dir(label), exist_ok=True)
            cache_opts = {}
            bridge_extra = []
            if self.backend == "file":
                cache_opts = {"backend": "file", "backend_opts": {"data_dir": self.data_dir(label)}}
                bridge_extra = ["--backend", "file", "--data-dir", self.data_dir(label)]
            host = Host(label, self.name, self.workdir, node_id=node_id, capacity=CAPACITY,
                        run_id=self.cluster.run_id, topology=self.topology, cache_opts=cache_opts,
                        bridge_extra=bridge_extra, bridge_timeout=BRIDGE_TIMEOUT)
            self.namespaces[label] = host.namespace
            self.cluster.hosts.append(host)
        hosts = self.cluster.hosts
        for i, host in enumerate(hosts):
            host.start_bridge(join=[hosts[1 - i]], wait=False, failure_timeout=FAILURE_TIMEOUT)
        for host in hosts:
            host.wait_bridge()
        self.cluster.wait_members(timeout=20)

    # ---- handles ------------------------------------------------------------------------

    def open(self, host="A", **extra):
        """One more handle in this process on ``host`` (the environment names the host
        while it opens)."""
        old = os.environ.get("VELA_NAMESPACE")
        os.environ["VELA_NAMESPACE"] = self.namespaces[host]
        try:
            return vela.Cache(**self.options(host, **extra))
        finally:
            if old is None:
                os.environ.pop("VELA_NAMESPACE", None)
            else:
                os.environ["VELA_NAMESPACE"] = old

    def worker_args(self, host, fn, *args):
        """Arguments of ``_worker`` for ``conftest.run_children``: a worker of ``host``."""
        return (self.namespaces[host], self.options(host), fn, args)

    run_worker = staticmethod(_worker)

    def on_host_b(self, fn, *args, timeout=60.0):
        """``fn(cache, *args)`` in a forked worker of host B; its result."""
        return run_in_child(_worker, *self.worker_args("B", fn, *args), timeout=timeout)

    def on_host_a(self, fn, *args, timeout=60.0):
        """``fn(cache, *args)`` in a forked worker of host A (another process); its result."""
        return run_in_child(_worker, *self.worker_args("A", fn, *args), timeout=timeout)

    # ---- the end ------------------------------------------------------------------------

    def close(self):
        if self.cache is not None:
            try:
                self.cache.close()
            except Exception:  # noqa: BLE001 - cleaning up whatever is left
                pass
        if self.cluster is not None:
            self.cluster.close()
        if self.backend == "redis" and self.redis_url:
            try:
                import redis

                client = redis.Redis.from_url(self.redis_url)
                keys = list(client.scan_iter(match=f"vela:{self.name}:*", count=1000))
                if keys:
                    client.delete(*keys)
                client.close()
            except Exception:  # noqa: BLE001
                pass
        for namespace in self.namespaces.values():
            unlink_namespace_segments(namespace)
        for path in glob.glob(f"/dev/shm/vela.{self.name}.*"):  # the Redis listener's election
            try:
                os.unlink(path)
            except OSError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)


# ---- the fixtures of a module that runs its tests on several stores ------------------------


def store_fixtures(kinds):
    """``(redis_server, opened, store)``: pytest fixtures for a module whose tests run on
    every store of ``kinds`` (assign them to those names at the module's top level).
    ``opened``: one Store per kind for the module (a Redis server started if a kind
    needs one); ``store``: that store, emptied, its counters zero, this process a
    worker of host A."""
    import pytest

    from redis_server import RedisServer

    @pytest.fixture(scope="module")
    def redis_server():
        server = RedisServer().start()
        yield server
        server.stop()

    @pytest.fixture(scope="module", params=kinds)
    def opened(request):
        url = request.getfixturevalue("redis_server").url if request.param.startswith("redis") else None
        opened = Store(request.param, redis_url=url)
        yield opened
        opened.close()

    @pytest.fixture
    def store(opened, monkeypatch):
        monkeypatch.setenv("VELA_NAMESPACE", opened.namespaces["A"])
        opened.cache.flush()
        opened.cache.stats(reset=True)
        return opened

    return redis_server, opened, store
