"""The local store: the host's shared table holds every entry.

Every worker of the host maps the same table; a call is one call into the C core
(the methods below are the native table's own, bound once: no Python frame).
"""

from __future__ import annotations

from typing import Any

from ..errors import CacheFull
from ..segments.table import OpenTable
from ..stamp import READING, Stamped, as_read
from .base import ALONE, HIT, MISSING

__all__ = ["LocalStore"]

# A waiter checks at least this often that the lease holder still lives.
POLL_NS = 20_000_000


class LocalStore:
    """The store of a table on this host (see vela.stores.base.Store)."""

    remote = False

    def __init__(self, opened: OpenTable, local_objects: int = 0):
        """:param local_objects: how many decoded values this process keeps (0: none);
        every read (get, get_many, get_or_fetch's hit) then returns a kept value while
        its entry's version is unchanged."""
        self.opened = opened
        self.segment = opened.segment
        t = self.table = opened.table
        # The native methods themselves: vela.Cache.get is bound to self.get.
        if local_objects:
            t.keep_objects(local_objects, (Stamped, as_read, READING))
            self.get, self.get_many, self.hit = t.get_object, t.get_objects, t.get_object_hit
        else:
            self.get, self.get_many, self.hit = t.get, t.get_many, t.get_hit
        self.contains = t.contains
        self.ttl = t.ttl
        self.put = t.put
        self.add = t.add
        self.replace = t.replace
        self.cas = t.cas
        self.put_many = t.put_many
        self.delete = t.delete
        self.delete_many = t.delete_many
        self.touch = t.touch
        self.incr = t.incr
        self.expire = t.expire
        self.size = t.size
        self.info = t.info
        self.check = t.check

    # ---- get_or_fetch ---------------------------------------------------------------

    def fetch_begin(self, key: Any, protect: bool, budget_ns: int):
        value = self.hit(key, MISSING)  # lock-free; a hit ends here
        if value is not MISSING:
            return HIT, value, None, False
        if protect:
            return self.table.fetch_begin(key, budget_ns, POLL_NS)
        self.table.bump("misses")
        return ALONE, None, None, False

    def fetch_complete(self, key: Any, token: Any, value: Any, ns: int, tags: tuple) -> None:
        self.table.bump("fetches")
        try:
            if token is not None:
                self.table.fetch_complete(token, key, value, ns, tags)
            else:
                self.table.put(key, value, ns, tags)
        except CacheFull:
            pass  # the caller still gets its value; waiters wake and fetch for themselves

    def fetch_abort(self, key: Any, token: Any) -> None:
        if token is not None:
            self.table.fetch_abort(token)

    # ---- every entry ----------------------------------------------------------------

    def invalidate_tag(self, tag: str) -> int:
        return self.table.invalidate_tag(tag)

    def flush(self) -> int:
        return self.table.flush()

    def stats(self, reset: bool) -> dict[str, Any]:
        counters = self.table.stats(reset)
        info = self.table.info()
        counters.update(size=info["entries"], memory_used=info["memory_used"], capacity=info["capacity"])
        return counters

    def reset_stats(self) -> None:
        self.table.stats(True)

    def sync(self) -> None:
        self.opened.sync()

    # ---- lifetime -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.opened.closed

    def close(self) -> None:
        self.opened.close()

    def destroy(self) -> bool:
        return self.opened.destroy()

    def describe(self) -> str:
        return f"{self.table.size()} entries"
