"""One adapter per store, all with the same small interface.

Life of an adapter, driven by the harness:

    setup()        parent, once per workload: an empty store
    connect()      open this process's client (parent to populate, each worker after fork)
    populate(d)    parent: store every item of d
    disconnect()   close the client before forking: sockets, sqlite and LMDB
                   handles must not be shared by a parent and its children
    teardown()     parent: remove the store

After connect(), these attributes are plain callables, looked up once by the
timing loops so no adapter method call sits between the loop and the store:

    get(key) -> value or None
    put(key, value)
    get_many(keys) -> {key: value} of the keys present
    get_or_fetch(key, fetch_fn) -> value   (a peer's is its get, plus fetch+put on a miss)

Values: Vela and diskcache take Python objects (both store bytes as they are
and pickle the rest). The stores that only hold bytes (redis, memcached, lmdb)
and the floor pickle every value, as a general-purpose Python cache client does,
so every store hands back a fresh Python object, as Vela does.
"""

import os
import pickle
import secrets
import shutil
import tempfile

_dumps = pickle.dumps
_loads = pickle.loads


def _peer_get_or_fetch(get, put):
    """get_or_fetch for a store without one: a hit is a get."""
    def get_or_fetch(key, fetch_fn):
        value = get(key)
        if value is None:
            value = fetch_fn(key)
            put(key, value)
        return value
    return get_or_fetch


class Store:
    name = "?"
    shared = True  # False: each process has its own copy (the floor)

    @classmethod
    def unavailable(cls):
        """None when the store can run here, else why not."""
        return None

    def setup(self, label):
        pass

    def connect(self):
        pass

    def disconnect(self):
        pass

    def teardown(self):
        pass

    def populate(self, items):
        put = self.put
        for key, value in items.items():
            put(key, value)


class VelaStore(Store):
    """The cache under test: one segment per workload, uniquely named, destroyed after."""

    name = "vela"
    options = {}

    def __init__(self, capacity="128MiB"):
        self.capacity = capacity
        self.cache = None

    def setup(self, label):
        import vela
        self.cache = vela.Cache(f"bench-{label}-{os.getpid()}-{secrets.token_hex(3)}",
                                capacity=self.capacity, **self.options)
        # Workers use the handle inherited through fork, the documented pattern
        # (create in the master, then fork); each child counts in its own stats slot.
        c = self.cache
        self.get, self.put, self.get_many, self.get_or_fetch = c.get, c.put, c.get_many, c.get_or_fetch

    def populate(self, items):
        self.cache.put_many(items)

    def teardown(self):
        if self.cache is not None:
            self.cache.destroy()
            self.cache = None


class VelaObjectsStore(VelaStore):
    """Vela with ``local_objects``: each process keeps the values it decoded (enough
    for the whole key space of a workload), checked against the entry's version."""

    name = "vela-objects"
    options = {"local_objects": 16_384}


class FloorStore(Store):
    """The per-process floor: a dict of pickled values, a lookup and a pickle.loads.

    Not shared between processes (each worker has its own copy after fork): it is
    the least work any cache can do to hand back a fresh object, not a competitor.
    """

    name = "floor"
    shared = False

    def setup(self, label):
        data = self.data = {}
        lookup = data.get

        def get(key):
            blob = lookup(key)
            return None if blob is None else _loads(blob)

        def put(key, value):
            data[key] = _dumps(value)

        def get_many(keys):
            found = {}
            for key in keys:
                blob = lookup(key)
                if blob is not None:
                    found[key] = _loads(blob)
            return found

        self.get, self.put, self.get_many = get, put, get_many
        self.get_or_fetch = _peer_get_or_fetch(get, put)

    def teardown(self):
        self.data = None


class DiskCacheStore(Store):
    """diskcache.Cache (SQLite + files) in a temp dir on local disk."""

    name = "diskcache"

    @classmethod
    def unavailable(cls):
        try:
            import diskcache  # noqa: F401
        except ImportError:
            return "pip install diskcache"
        return None

    def setup(self, label):
        # The default temp dir, which is local disk on a usual host (not tmpfs).
        self.dir = tempfile.mkdtemp(prefix="vela-bench-diskcache-")
        self.cache = None

    def connect(self):
        import diskcache
        c = self.cache = diskcache.Cache(self.dir)
        self.get, self.put = c.get, c.set

        def get_many(keys, get=c.get):  # diskcache has no batch read: a loop
            found = {}
            for key in keys:
                value = get(key)
                if value is not None:
                    found[key] = value
            return found

        self.get_many = get_many
        self.get_or_fetch = _peer_get_or_fetch(c.get, c.set)

    def populate(self, items):
        with self.cache.transact():  # one SQLite transaction instead of one per key
            for key, value in items.items():
                self.cache.set(key, value)

    def disconnect(self):
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisStore(Store):
    """redis-py (hiredis parser) against the local redis-server, unix socket or TCP."""

    def __init__(self, server, transport):
        self.server = server
        self.transport = transport
        self.name = f"redis-{transport}"
        self.client = None

    @classmethod
    def unavailable(cls):
        try:
            import redis
            from redis.utils import HIREDIS_AVAILABLE
        except ImportError:
            return "pip install redis hiredis"
        if not HIREDIS_AVAILABLE:
            return "pip install hiredis"
        from servers import RedisServer
        if not RedisServer.available():
            return "redis-server not installed"
        return None

    def _client(self):
        import redis
        if self.transport == "unix":
            return redis.Redis(unix_socket_path=self.server.unix_socket)
        return redis.Redis(host="127.0.0.1", port=self.server.port)

    def setup(self, label):
        client = self._client()
        client.flushdb()
        client.close()

    def connect(self):
        r = self.client = self._client()
        rget, rset, mget = r.get, r.set, r.mget

        def get(key):
            blob = rget(key)
            return None if blob is None else _loads(blob)

        def put(key, value):
            rset(key, _dumps(value))

        def get_many(keys):  # one MGET round trip
            return {key: _loads(blob) for key, blob in zip(keys, mget(keys)) if blob is not None}

        self.get, self.put, self.get_many = get, put, get_many
        self.get_or_fetch = _peer_get_or_fetch(get, put)

    def populate(self, items):
        self.client.mset({key: _dumps(value) for key, value in items.items()})

    def disconnect(self):
        if self.client is not None:
            self.client.close()
            self.client = None

    def teardown(self):
        self.setup(None)  # flushdb: the next workload starts empty


class MemcachedStore(Store):
    """pymemcache against the local memcached over TCP loopback."""

    name = "memcached"

    def __init__(self, server):
        self.server = server
        self.client = None

    @classmethod
    def unavailable(cls):
        try:
            import pymemcache  # noqa: F401
        except ImportError:
            return "pip install pymemcache"
        from servers import MemcachedServer
        if not MemcachedServer.available():
            return "memcached not installed"
        return None

    def _client(self):
        from pymemcache.client.base import Client
        # default_noreply=False: a set waits for memcached's answer, as every other
        # store's write does (pymemcache's default fires and forgets).
        return Client(("127.0.0.1", self.server.port), default_noreply=False, no_delay=True)

    def setup(self, label):
        client = self._client()
        client.flush_all()
        client.close()

    def connect(self):
        c = self.client = self._client()
        mget, mset, mget_many = c.get, c.set, c.get_many

        def get(key):
            blob = mget(key)
            return None if blob is None else _loads(blob)

        def put(key, value):
            mset(key, _dumps(value))

        def get_many(keys):  # one multi-key get
            return {key: _loads(blob) for key, blob in mget_many(keys).items()}

        self.get, self.put, self.get_many = get, put, get_many
        self.get_or_fetch = _peer_get_or_fetch(get, put)

    def populate(self, items):
        failed = self.client.set_many({key: _dumps(value) for key, value in items.items()})
        if failed:
            raise RuntimeError(f"memcached refused {len(failed)} keys")

    def disconnect(self):
        if self.client is not None:
            self.client.close()
            self.client = None

    def teardown(self):
        self.setup(None)


class LmdbStore(Store):
    """py-lmdb in a temp dir on tmpfs (/dev/shm), one transaction per call."""

    name = "lmdb"
    map_size = 1 << 30

    @classmethod
    def unavailable(cls):
        try:
            import lmdb  # noqa: F401
        except ImportError:
            return "pip install lmdb"
        return None

    def setup(self, label):
        # tmpfs, where Vela's segment lives too: neither pays for a disk.
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.mkdtemp(prefix="vela-bench-lmdb-", dir=base)
        self.env = None

    def connect(self):
        import lmdb
        # sync/metasync off: durability means nothing on tmpfs, and no other store
        # here syncs; each process opens its own environment (LMDB forbids sharing
        # one across fork).
        env = self.env = lmdb.open(self.dir, map_size=self.map_size, sync=False, metasync=False,
                                   readahead=False, max_readers=256)
        begin = env.begin

        def get(key):
            with begin() as txn:
                blob = txn.get(key.encode())
            return None if blob is None else _loads(blob)

        def put(key, value):
            with begin(write=True) as txn:
                txn.put(key.encode(), _dumps(value))

        def get_many(keys):  # one read transaction for the batch
            found = {}
            with begin() as txn:
                tget = txn.get
                for key in keys:
                    blob = tget(key.encode())
                    if blob is not None:
                        found[key] = _loads(blob)
            return found

        self.get, self.put, self.get_many = get, put, get_many
        self.get_or_fetch = _peer_get_or_fetch(get, put)

    def populate(self, items):
        with self.env.begin(write=True) as txn:
            for key, value in items.items():
                txn.put(key.encode(), _dumps(value))

    def disconnect(self):
        if self.env is not None:
            self.env.close()
            self.env = None

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# The order of the columns in the tables.
ORDER = ["vela", "vela-objects", "floor", "diskcache", "redis-unix", "redis-tcp", "memcached", "lmdb"]
