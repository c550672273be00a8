"""The workloads: what is stored first, which keys each worker touches, and the timed loop.

Every store runs the same loop over the same keys; the loops are as bare as
Python allows (a for loop over a prebuilt list of keys calling one callable),
so their own cost is the same for all stores and as small as possible.
"""

import random
from dataclasses import dataclass

KEY_SPACE = 10_000
BATCH = 50

# Keys in a fixed shuffled order, so consecutive operations hit unrelated buckets
# (and stripes) as a real request mix does, identically for every store.
KEYS = [f"k{i}" for i in range(KEY_SPACE)]
random.Random(1).shuffle(KEYS)
MISS_KEYS = [f"absent{i}" for i in range(KEY_SPACE)]

SMALL_DICT = {"id": 1, "name": "Alice", "tags": ["a", "b"]}


_ITEMS = {}


def _never_called(key):
    raise RuntimeError(f"fetch_fn called for {key!r} in a hit-only workload")


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    kind: str           # get | put | mix | get_many | fetch
    value_size: int     # bytes of a bytes value; 0 = the small dict, pickled
    hit: bool = True    # False: the keys looked up are never stored
    batch: int = BATCH  # keys of one get_many call

    def value(self, i):
        if self.value_size == 0:
            return dict(SMALL_DICT, id=i)
        return random.Random(i).randbytes(self.value_size)

    def items(self):
        """What the store holds before the timed loop (the whole key space)."""
        if self.value_size not in _ITEMS:  # built once per value type, shared by all stores
            _ITEMS[self.value_size] = {key: self.value(i) for i, key in enumerate(KEYS)}
        return _ITEMS[self.value_size]

    def plan(self, index, nprocs, n_ops):
        """The arguments of worker `index`'s n_ops calls: keys, or batches of keys.

        Workers start at different points of the key space, as independent
        requests would, and cycle through it.
        """
        keys = KEYS if self.hit else MISS_KEYS
        if self.kind == "get_many":
            n = self.batch
            batches = [keys[i:i + n] for i in range(0, len(keys) - n + 1, n)]
            start = index * len(batches) // nprocs
            batches = batches[start:] + batches[:start]
            return (batches * (n_ops // len(batches) + 1))[:n_ops]
        start = index * len(keys) // nprocs
        keys = keys[start:] + keys[:start]
        return (keys * (n_ops // len(keys) + 1))[:n_ops]

    def loop(self, store):
        """The timed function: loop(plan) runs every call of the plan on `store`."""
        get, put = store.get, store.put
        new_value = self.value(-1)  # what puts write (bytes: stored as is by Vela)

        if self.kind == "get":
            def run(keys):
                for key in keys:
                    get(key)
        elif self.kind == "put":
            def run(keys):
                for key in keys:
                    put(key, new_value)
        elif self.kind == "mix":
            def run(keys):  # 90 % gets, 10 % puts, interleaved evenly
                for i, key in enumerate(keys):
                    if i % 10 == 9:
                        put(key, new_value)
                    else:
                        get(key)
        elif self.kind == "get_many":
            get_many = store.get_many

            def run(batches):
                for batch in batches:
                    get_many(batch)
        elif self.kind == "fetch":
            get_or_fetch = store.get_or_fetch

            def run(keys):
                for key in keys:
                    get_or_fetch(key, _never_called)
        else:
            raise ValueError(self.kind)
        return run

    def check(self, store):
        """Fail loudly if a store does not return what it should: a fast wrong answer counts for nothing."""
        if self.kind == "get_many":
            batch = (KEYS if self.hit else MISS_KEYS)[:self.batch]
            found = store.get_many(batch)
            expect = {k: self.value(KEYS.index(k)) for k in batch} if self.hit else {}
            if found != expect:
                raise AssertionError(f"{store.name}: get_many returned {len(found)} of {len(expect)} expected")
            return
        for i in (0, 1, KEY_SPACE - 1):
            key = (KEYS if self.hit else MISS_KEYS)[i]
            got = store.get(key)
            want = self.value(i) if self.hit else None
            if got != want:
                raise AssertionError(f"{store.name}: get({key!r}) returned {got!r:.60}, expected {want!r:.60}")


WORKLOADS = [
    Workload("get_hit_100b", "get, hit, 100 B bytes", "get", 100),
    Workload("get_hit_dict", "get, hit, small dict (pickled)", "get", 0),
    Workload("get_hit_4k", "get, hit, 4 KiB bytes", "get", 4096),
    Workload("get_miss", "get, miss", "get", 100, hit=False),
    Workload("put_100b", "put, 100 B bytes (overwrites)", "put", 100),
    Workload("mix_90_10", "90 % get / 10 % put, 100 B", "mix", 100),
    Workload("get_many_50", f"get_many of {BATCH} keys, 100 B (one op = one call)", "get_many", 100),
    Workload("fetch_hit", "get_or_fetch, hit, 100 B (peers: get)", "fetch", 100),
    # The reads local_objects serves from kept objects (vela-objects against vela and the floor).
    Workload("get_many_dict_20", "get_many of 20 keys, small dict (pickled)", "get_many", 0, batch=20),
    Workload("fetch_hit_dict", "get_or_fetch, hit, small dict (pickled; peers: get)", "fetch", 0),
]
BY_NAME = {w.name: w for w in WORKLOADS}
