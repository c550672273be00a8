"""A Flask-Caching backend on a Vela cache: every worker process of the host (and
every host, where the store spans hosts) shares one cache.

    app.config.update(
        CACHE_TYPE="vela.contrib.flask.VelaCache",
        CACHE_VELA_NAME="shop",                       # the Vela cache name
        CACHE_VELA_OPTIONS={"capacity": "256MiB"},    # passed to vela.Cache
        CACHE_DEFAULT_TIMEOUT=300,
    )
    cache = flask_caching.Cache(app)

Timeouts have Flask-Caching's meaning: ``None`` the default timeout, ``0`` never
expires, a positive number seconds, a negative one expires at once. Keys are
prefixed with ``CACHE_KEY_PREFIX`` (Flask-Caching's default ``"flask_cache_"``).
``clear()`` empties the whole Vela cache. ``add`` and ``inc``/``dec`` are atomic
across processes. The underlying :class:`vela.Cache` is ``.vela_cache``.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

from flask import Flask
from flask_caching.backends.base import BaseCache

from ..cache import Cache
from ..errors import CacheFull, OptionError, ValueTooLarge
from ._handles import shared_handle

__all__ = ["VelaCache"]

log = logging.getLogger("vela.contrib.flask")

Timeout = Union[int, datetime.timedelta, None]


class VelaCache(BaseCache):
    """Flask-Caching's backend API on a :class:`vela.Cache`."""

    def __init__(self, cache: Cache, default_timeout: int = 300, key_prefix: str = "",
                 ignore_delete_many_errors: bool = False) -> None:
        super().__init__(default_timeout=default_timeout, ignore_delete_many_errors=ignore_delete_many_errors)
        self.vela_cache = cache
        self.key_prefix = key_prefix

    @classmethod
    def factory(cls, app: Flask, config: dict[str, Any], args: list[Any], kwargs: dict[str, Any]) -> VelaCache:
        name = config.get("CACHE_VELA_NAME")
        if not isinstance(name, str) or not name:
            raise OptionError("CACHE_TYPE vela.contrib.flask.VelaCache needs CACHE_VELA_NAME: the name of "
                              "the Vela cache")
        options = config.get("CACHE_VELA_OPTIONS") or {}
        if not isinstance(options, Mapping):
            raise OptionError(f"CACHE_VELA_OPTIONS must be a dict of vela.Cache options, not {options!r}")
        kwargs.setdefault("key_prefix", config.get("CACHE_KEY_PREFIX") or "")
        return cls(shared_handle(name, dict(options)), *args, **kwargs)

    def _ttl(self, timeout: Timeout) -> Optional[float]:
        """Vela ttl for a Flask-Caching timeout; None means 'expires at once'."""
        seconds = self._normalize_timeout(timeout)
        if seconds == 0:
            return math.inf
        return None if seconds < 0 else float(seconds)

    def get(self, key: str) -> Any:
        return self.vela_cache.get(self.key_prefix + key)

    def get_many(self, *keys: str) -> list[Any]:
        found = self.vela_cache.get_many([self.key_prefix + k for k in keys])
        return [found.get(self.key_prefix + k) for k in keys]

    def has(self, key: str) -> bool:
        return self.vela_cache.exists(self.key_prefix + key)

    def set(self, key: str, value: Any, timeout: Timeout = None) -> bool:
        ttl = self._ttl(timeout)
        if ttl is None:
            self.vela_cache.delete(self.key_prefix + key)
            return True
        return self._stored(key, lambda: self.vela_cache.put(self.key_prefix + key, value, ttl=ttl))

    def add(self, key: str, value: Any, timeout: Timeout = None) -> bool:
        ttl = self._ttl(timeout)
        if ttl is None:
            return False
        return self._stored(key, lambda: self.vela_cache.add(self.key_prefix + key, value, ttl=ttl))

    def set_many(self, mapping: Mapping[str, Any], timeout: Timeout = None) -> list[Any]:
        ttl = self._ttl(timeout)
        if ttl is None:
            self.vela_cache.delete_many([self.key_prefix + k for k in mapping])
            return list(mapping)
        items = {self.key_prefix + k: v for k, v in mapping.items()}
        stored = self._stored(", ".join(mapping), lambda: self.vela_cache.put_many(items, ttl=ttl))
        return list(mapping) if stored else []

    def _stored(self, what: str, write: Callable[[], Optional[bool]]) -> bool:
        # Flask-Caching's contract: a backend that cannot store says False (the view
        # still gets its value); say why in the log.
        try:
            result = write()  # put: None; add: whether it stored
            return True if result is None else result
        except (ValueTooLarge, CacheFull) as exc:
            log.warning("vela cache %r did not store %s: %s", self.vela_cache.name, what, exc)
            return False

    def delete(self, key: str) -> bool:
        return self.vela_cache.delete(self.key_prefix + key)

    def delete_many(self, *keys: str) -> list[Any]:
        # cachelib's contract: the keys absent afterwards (so all of them, here)
        self.vela_cache.delete_many([self.key_prefix + k for k in keys])
        return list(keys)

    def clear(self) -> bool:
        self.vela_cache.flush()
        return True

    def inc(self, key: str, delta: int = 1) -> int:
        return self.vela_cache.incr(self.key_prefix + key, delta, ttl=self._ttl(None) or math.inf)

    def dec(self, key: str, delta: int = 1) -> int:
        return self.inc(key, -delta)
