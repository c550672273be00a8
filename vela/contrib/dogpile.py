"""A dogpile.cache backend on a Vela cache (registered as ``"vela"`` by an entry point).

    from dogpile.cache import make_region

    region = make_region().configure(
        "vela",
        expiration_time=300,                    # dogpile's: when a value is regenerated
        arguments={
            "name": "shop",                     # the Vela cache name
            "options": {"capacity": "256MiB"},  # passed to vela.Cache
            "expiration_time": 3600,            # Vela's ttl of every entry (None: default_ttl)
        },
    )

dogpile serializes values to bytes; they are stored as they are (no second
pickling). ``distributed_lock`` (default True) makes dogpile's regeneration mutex
a :class:`vela.locks.Lock` shared by every process (and host, where the store spans
hosts): of all the processes that find a value missing or expired, one regenerates it
while the others serve the old value or wait. ``lock_ttl`` (default 30 s) bounds
how long a regeneration may hold it; a holder that dies on this host frees it at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

from dogpile.cache.api import NO_VALUE, BytesBackend, CacheMutex, NoValue

from .. import options as vela_options
from ..cache import Cache
from ..errors import OptionError
from ..locks import Lock
from ._handles import shared_handle

__all__ = ["VelaBackend"]

class VelaBackend(BytesBackend):
    """dogpile.cache's backend API on a :class:`vela.Cache`.

    ``arguments``: ``name`` (the Vela cache; or ``cache``, an open :class:`vela.Cache`),
    ``options`` (dict for :class:`vela.Cache`), ``expiration_time`` (seconds Vela keeps
    an entry; None: the cache's ``default_ttl``), ``distributed_lock`` (bool, True),
    ``lock_ttl`` (seconds, 30). Other arguments are ignored, as dogpile's own backends do.
    """

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        cache = arguments.get("cache")
        if cache is None:
            name = arguments.get("name")
            if not isinstance(name, str):
                raise OptionError("vela dogpile backend: arguments need 'name' (the Vela cache) or 'cache'")
            cache = shared_handle(name, dict(arguments.get("options") or {}))
        elif not isinstance(cache, Cache):
            raise OptionError(f"vela dogpile backend: 'cache' must be a vela.Cache, not {type(cache).__name__}")
        self.cache: Cache = cache
        expiration = arguments.get("expiration_time")
        self.ttl: Optional[float] = (None if expiration is None
                                     else vela_options.seconds("expiration_time", expiration))
        self.distributed_lock = bool(arguments.get("distributed_lock", True))
        self.lock_ttl = vela_options.seconds("lock_ttl", arguments.get("lock_ttl", 30.0), allow_none=False,
                                             allow_inf=False)

    def get_mutex(self, key: str) -> Optional[CacheMutex]:
        return _VelaMutex(self.cache, key, self.lock_ttl) if self.distributed_lock else None

    def get_serialized(self, key: str) -> Union[bytes, NoValue]:
        value = self.cache.get(key, NO_VALUE)
        return value if value is NO_VALUE or isinstance(value, bytes) else NO_VALUE

    def get_serialized_multi(self, keys: Iterable[str]) -> list[Union[bytes, NoValue]]:
        keys = list(keys)
        found = self.cache.get_many(keys)
        return [found[k] if isinstance(found.get(k), bytes) else NO_VALUE for k in keys]

    def set_serialized(self, key: str, value: bytes) -> None:
        self.cache.put(key, value, ttl=self.ttl)

    def set_serialized_multi(self, mapping: Mapping[str, bytes]) -> None:
        self.cache.put_many(mapping, ttl=self.ttl)

    def delete(self, key: str) -> None:
        self.cache.delete(key)

    def delete_multi(self, keys: Iterable[str]) -> None:
        self.cache.delete_many(keys)


class _VelaMutex(CacheMutex):
    """dogpile's regeneration mutex as a Vela lock: one holder among every process.
    dogpile may share one mutex object between threads; each acquire takes its own
    :class:`Lock`, so a second acquire waits (or fails) as for a threading.Lock."""

    def __init__(self, cache: Cache, key: str, ttl: float) -> None:
        self._cache = cache
        self._name = f"dogpile:{key}"
        self._ttl = ttl
        self._holding: Optional[Lock] = None

    def acquire(self, wait: bool = True) -> bool:
        lock = Lock(self._cache, self._name, ttl=self._ttl, timeout=None if wait else 0)
        if not lock.acquire():
            return False
        self._holding = lock
        return True

    def release(self) -> None:
        lock, self._holding = self._holding, None
        if lock is None:
            raise RuntimeError(f"release of the unheld dogpile mutex {self._name!r}")
        lock.release()

    def locked(self) -> bool:
        return Lock(self._cache, self._name, ttl=self._ttl).locked()

