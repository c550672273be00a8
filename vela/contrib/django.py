"""A Django cache backend on a Vela cache: one shared table for every worker of the host.

    CACHES = {
        "default": {
            "BACKEND": "vela.contrib.django.VelaCache",
            "LOCATION": "shop",                     # the Vela cache name
            "TIMEOUT": 300,                         # Django's default timeout, seconds
            "OPTIONS": {"capacity": "256MiB"},      # passed to vela.Cache
        },
    }

Timeouts have Django's meaning: ``None`` stores forever, ``0`` (or less) expires
at once (``set`` removes the key, ``add`` stores nothing), otherwise seconds
(floats work). Keys are made and validated as by Django's ``BaseCache``
(``KEY_PREFIX``, ``VERSION``, ``KEY_FUNCTION``, memcached-portability warnings);
a made key longer than Vela's 1 KiB limit raises ``InvalidCacheKey``.
``OPTIONS`` go to :class:`vela.Cache`, except ``MAX_ENTRIES`` (becomes
``max_size``) and ``CULL_FREQUENCY`` (ignored: Vela evicts a few entries per
write, it never culls a fraction of the cache).

``clear()`` empties the whole Vela cache named by ``LOCATION``, whatever the
key prefix (as memcached's flush does). ``close()`` does nothing: one handle
per process and configuration is shared by Django's per-thread backend objects
and stays open. ``get_or_set`` with a callable default runs it once per host
while concurrent callers wait (Vela's stampede protection), and ``add`` is
atomic across processes. The underlying :class:`vela.Cache` is ``.vela_cache``
(for ``invalidate_tag``, ``stats``, ...).

The async methods (``aget``, ``aset``, ...) are Vela's own, not Django's default of
running the sync method in a thread: ``aget``/``aset``/``adelete``/``ahas_key``/
``aget_many``/``aset_many``/``aclear``/``aget_or_set`` await the matching
:class:`vela.Cache` coroutine (inline on the host's table; Redis and partitioned
caches wait without blocking the loop); the others (``aadd``, ``atouch``, ``aincr``,
``adecr``, ``adelete_many``) run the sync call inline on the host's table and in one
of Vela's worker threads (:mod:`vela.waits`) for a remote store.
"""

import math

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache, InvalidCacheKey
from django.core.exceptions import ImproperlyConfigured

from .. import _native, waits
from ._handles import shared_handle as _shared_handle

__all__ = ["VelaCache"]

# Django options that are not vela.Cache options
_DJANGO_OPTIONS = ("MAX_ENTRIES", "CULL_FREQUENCY")


def _serializer_error(exc):
    """The serializer's own exception behind Vela's TypeError (Django callers expect
    pickle's errors), or None when the TypeError is Vela's."""
    cause = exc.__cause__
    return cause if isinstance(cause, Exception) and not isinstance(cause, TypeError) else None


class VelaCache(BaseCache):
    """Django's cache API on the Vela cache named by ``LOCATION``."""

    def __init__(self, location, params):
        super().__init__(params)
        if not location or not isinstance(location, str):
            raise ImproperlyConfigured("VelaCache needs LOCATION: the name of the Vela cache")
        self._name = location
        opts = dict(params.get("OPTIONS") or {})
        max_entries = opts.pop("MAX_ENTRIES", None)
        for name in _DJANGO_OPTIONS:
            opts.pop(name, None)
        if max_entries is not None:
            opts.setdefault("max_size", int(max_entries))
        self._options = opts
        self._handle = None

    @property
    def vela_cache(self):
        """The :class:`vela.Cache` behind this backend (opened on first use)."""
        handle = self._handle
        if handle is None or handle.closed:
            handle = self._handle = _shared_handle(self._name, self._options)
        return handle

    # ---- keys and timeouts ------------------------------------------------------

    def validate_key(self, key):
        super().validate_key(key)  # Django's memcached-portability warnings
        try:
            _native.encode_key(key)
        except ValueError:
            raise InvalidCacheKey(f"Cache key is too long for Vela (more than {_native.MAX_KEY} "
                                  f"bytes encoded): {key!r}") from None
        except TypeError as e:
            raise InvalidCacheKey(f"Cache key {key!r} cannot be stored by Vela: {e}") from None

    def _ttl(self, timeout):
        """Vela ttl (seconds) for a Django timeout; None means 'expires at once'."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return math.inf
        if timeout <= 0:
            return None
        return float(timeout)

    # ---- the API ------------------------------------------------------------------

    def get(self, key, default=None, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self.vela_cache.get(key, default)

    def set(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        if ttl is None:  # stored already expired: the key is gone
            self.vela_cache.delete(key)
            return
        try:
            self.vela_cache.put(key, value, ttl=ttl)
        except TypeError as e:
            raise (_serializer_error(e) or e) from None

    def add(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        if ttl is None:
            return not self.vela_cache.exists(key)
        try:
            return self.vela_cache.add(key, value, ttl=ttl)  # atomic on every store
        except TypeError as e:
            raise (_serializer_error(e) or e) from None

    def touch(self, key, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        if ttl is None:
            return self.vela_cache.delete(key)
        return self.vela_cache.touch(key, ttl=ttl)

    def delete(self, key, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self.vela_cache.delete(key)

    def has_key(self, key, version=None):
        key = self.make_and_validate_key(key, version=version)
        return self.vela_cache.exists(key)

    def incr(self, key, delta=1, version=None):
        key = self.make_and_validate_key(key, version=version)
        cache = self.vela_cache
        # Django raises for a missing key where Vela would start at 0. Between this
        # test and the increment another process may delete the key; the increment
        # then recreates it (without expiry) instead of raising.
        if not cache.exists(key):
            raise ValueError("Key '%s' not found" % key)
        return cache.incr(key, delta)

    def get_many(self, keys, version=None):
        made = {self.make_and_validate_key(k, version=version): k for k in keys}
        found = self.vela_cache.get_many(list(made))
        return {made[k]: v for k, v in found.items()}

    def set_many(self, data, timeout=DEFAULT_TIMEOUT, version=None):
        items = {self.make_and_validate_key(k, version=version): v for k, v in data.items()}
        if not items:
            return []
        ttl = self._ttl(timeout)
        if ttl is None:
            self.vela_cache.delete_many(list(items))
            return []
        try:
            self.vela_cache.put_many(items, ttl=ttl)
        except TypeError as e:
            raise (_serializer_error(e) or e) from None
        return []

    def delete_many(self, keys, version=None):
        made = [self.make_and_validate_key(k, version=version) for k in keys]
        if made:
            self.vela_cache.delete_many(made)

    def get_or_set(self, key, default, timeout=DEFAULT_TIMEOUT, version=None):
        ttl = self._ttl(timeout)
        if not callable(default) or ttl is None:
            return super().get_or_set(key, default, timeout=timeout, version=version)
        made = self.make_and_validate_key(key, version=version)
        try:
            return self.vela_cache.get_or_fetch(made, lambda _key: default(), ttl=ttl)
        except TypeError as e:
            raise (_serializer_error(e) or e) from None

    def clear(self):
        self.vela_cache.flush()

    # ---- the async API: Vela's coroutines, not a thread per call -----------------

    async def aget(self, key, default=None, version=None):
        key = self.make_and_validate_key(key, version=version)
        return await self.vela_cache.aget(key, default)

    async def aset(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        if ttl is None:
            await self.vela_cache.adelete(key)
            return
        try:
            await self.vela_cache.aput(key, value, ttl=ttl)
        except TypeError as e:
            raise (_serializer_error(e) or e) from None

    async def adelete(self, key, version=None):
        key = self.make_and_validate_key(key, version=version)
        return await self.vela_cache.adelete(key)

    async def ahas_key(self, key, version=None):
        key = self.make_and_validate_key(key, version=version)
        return await self.vela_cache.aexists(key)

    async def aget_many(self, keys, version=None):
        made = {self.make_and_validate_key(k, version=version): k for k in keys}
        found = await self.vela_cache.aget_many(list(made))
        return {made[k]: v for k, v in found.items()}

    async def aset_many(self, data, timeout=DEFAULT_TIMEOUT, version=None):
        items = {self.make_and_validate_key(k, version=version): v for k, v in data.items()}
        ttl = self._ttl(timeout)
        if not items or ttl is None:
            return await self._off_loop(self.set_many, data, timeout, version)
        try:
            await self.vela_cache.aput_many(items, ttl=ttl)
        except TypeError as e:
            raise (_serializer_error(e) or e) from None
        return []

    async def aclear(self):
        await self.vela_cache.aflush()

    async def aget_or_set(self, key, default, timeout=DEFAULT_TIMEOUT, version=None):
        ttl = self._ttl(timeout)
        if not callable(default) or ttl is None:
            return await self._off_loop(self.get_or_set, key, default, timeout, version)
        made = self.make_and_validate_key(key, version=version)
        try:
            return await self.vela_cache.aget_or_fetch(made, lambda _key: default(), ttl=ttl)
        except TypeError as e:
            raise (_serializer_error(e) or e) from None

    async def aadd(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        return await self._off_loop(self.add, key, value, timeout, version)

    async def atouch(self, key, timeout=DEFAULT_TIMEOUT, version=None):
        return await self._off_loop(self.touch, key, timeout, version)

    async def aincr(self, key, delta=1, version=None):
        return await self._off_loop(self.incr, key, delta, version)

    async def adecr(self, key, delta=1, version=None):
        return await self._off_loop(self.decr, key, delta, version)

    async def adelete_many(self, keys, version=None):
        return await self._off_loop(self.delete_many, keys, version)

    async def aclose(self, **kwargs):
        """Nothing to do (see :meth:`close`)."""

    async def _off_loop(self, method, *args):
        """A sync method with no Vela coroutine: inline on the host's table (microseconds),
        in a worker thread where the store is remote (Redis, partitioned)."""
        if getattr(self.vela_cache._store, "remote", True):
            return await waits.run(method, *args)
        return method(*args)

    def close(self, **kwargs):
        """Nothing to do: the process's handle stays open for the next request."""
