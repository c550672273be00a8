"""The Redis store's asyncio API: the same commands and Lua scripts, sent with ``redis.asyncio``.

:class:`AsyncRedisStore` is the Redis store vela.Cache opens: the sync store of
vela.stores.redis plus its async variants, the ``a*`` methods vela.Cache's ``aget``,
``aput``, ... call.
They build key names, values and script arguments with the store's own helpers and
count on the same host counters; only the client differs: one ``redis.asyncio``
client per event loop (a connection belongs to the loop that opened it), made on
first use, with the sync client's URL and timeouts.

Cancel-safety: a command cut short by a cancellation or a timeout takes its
connection with it (redis-py disconnects it: a late reply never meets the next
command). Every write is one atomic Lua call, and ``aput_many`` sends its batches
in one MULTI/EXEC, so a cancelled call has either stored everything or nothing
(where the sync ``put_many`` may raise PartialWrite). A cancelled ``ainvalidate_tag``
or ``aflush`` has done its removal; its acknowledgement list expires by itself.
Plain ``redis://``, ``rediss://`` and ``unix://`` URLs are served; Sentinel and
Cluster URLs raise :class:`vela.VelaError` in the async API (their sync API works).
"""

import asyncio
import os
import threading
import weakref

import redis.asyncio
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .. import _native
from ..errors import BackendUnavailable, OptionError, VelaError
from .base import MISSING, count_lookups
from .near import FLUSH_ALL
from .redis import _BATCH, _SCRIPTS, _UNREACHABLE, RedisStore, _remaining_ns, _tag_bytes, _tag_names, flushed

__all__ = ["AsyncRedisStore"]


class AsyncRedisStore(RedisStore):
    """The Redis store with the async variants of its calls (see the module's doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._aio_clients = weakref.WeakKeyDictionary()  # event loop -> its redis.asyncio client
        self._aio_pid = os.getpid()
        self._aio_lock = threading.Lock()  # (event loops of several threads may share the handle)

    # ---- the client of this event loop ---------------------------------------------

    def _aclient(self):
        self._redis()  # the sync client's state: script digests (raises CacheClosed)
        loop = asyncio.get_running_loop()
        with self._aio_lock:
            if self._aio_pid != os.getpid():  # a forked child opens its own
                self._aio_clients = weakref.WeakKeyDictionary()
                self._aio_pid = os.getpid()
            client = self._aio_clients.get(loop)
        if client is None:
            o = self._o
            if o.cluster or o.scheme.endswith("+sentinel"):
                raise VelaError(f"the async API of the Redis backend serves redis://, rediss:// and unix:// URLs; "
                                f"{o.where} is a {'cluster' if o.cluster else 'sentinel'} URL (use the sync API)")
            kw = dict(socket_timeout=o.socket_timeout, socket_connect_timeout=o.connect_timeout,
                      retry=Retry(NoBackoff(), 0))  # retried below, idempotent calls only (as the sync _call)
            kw.update(o.client_options)
            try:
                client = redis.asyncio.Redis.from_url(o.url, **kw)
            except (TypeError, ValueError) as exc:
                raise OptionError(f"backend_opts: redis.asyncio refuses the URL or client_options: {exc}") from None
            with self._aio_lock:
                self._aio_clients[loop] = client
        return client

    async def aclose(self):
        """Close this event loop's client (vela.Cache's ``async with`` calls it)."""
        with self._aio_lock:
            client = self._aio_clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await (client.aclose() if hasattr(client, "aclose") else client.close())  # (aclose: redis-py 5+)

    async def _acall(self, fn, idempotent=True):
        """``await fn(client)`` with the sync ``_call``'s rules: connection errors and
        timeouts are retried (idempotent calls only) and end as BackendUnavailable; a
        script the server forgot is loaded and run again; Redis's errors are translated."""
        o = self._o
        client = self._aclient()
        attempts = o.retries + 1 if idempotent else 1
        last = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(o.retry_backoff * 2 ** (attempt - 1))
            try:
                return await fn(client)
            except rex.ResponseError as exc:
                if isinstance(exc, _UNREACHABLE):
                    last = exc
                    continue
                raise self._translate(exc) from exc
            except _UNREACHABLE as exc:
                last = exc
            except rex.RedisError as exc:
                raise VelaError(f"Redis at {o.where}: {exc}") from exc
        raise BackendUnavailable(f"Redis at {o.where} is unavailable: {last}") from last

    def _acommand(self, *args, idempotent=True):
        return self._acall(lambda client: client.execute_command(*args), idempotent)

    def _arun(self, script, keys, args, idempotent=True):
        """A Lua script by its digest (loaded again when the server forgot it)."""
        async def run(client):
            try:
                return await client.execute_command("EVALSHA", self._shas[script], len(keys), *keys, *args)
            except rex.NoScriptError:
                await client.execute_command("SCRIPT", "LOAD", _SCRIPTS[script])
                return await client.execute_command("EVALSHA", self._shas[script], len(keys), *keys, *args)
        return self._acall(run, idempotent)

    # ---- reading -------------------------------------------------------------------

    async def aget(self, key, default=None):
        self._check_open()
        raw = await self._acommand("GET", self._vkey(_native.encode_key(key)))
        if raw is None:
            self._bump("misses")
            return default
        self._bump("hits")
        return self._decode(raw)

    async def acontains(self, key):
        self._check_open()
        return await self._acommand("EXISTS", self._vkey(_native.encode_key(key))) == 1

    async def aget_many(self, keys):
        self._check_open()
        found = {}
        if keys:
            raws = await self._acommand("MGET", *[self._vkey(_native.encode_key(k)) for k in keys])
            found = {k: self._decode(raw) for k, raw in zip(keys, raws) if raw is not None}
        count_lookups(self._bump, keys, found)
        return found

    async def aread(self, key):
        """``read`` (the near cache's uncounted L2 read) for asyncio."""
        enc = _native.encode_key(key)
        got = await self._arun("read", [self._vkey(enc), self._mkey(enc)], [])
        if got is None:
            return MISSING, 0, ()
        return self._decode(got[0]), _remaining_ns(got[1]), _tag_names(got[2])

    async def aread_many(self, keys):
        """``read_many`` for asyncio."""
        names = []
        for k in keys:
            enc = _native.encode_key(k)
            names += (self._vkey(enc), self._mkey(enc))
        got = await self._arun("read_many", names, [])
        return [(MISSING, 0, ()) if got[3 * i] is None else
                (self._decode(got[3 * i]), _remaining_ns(got[3 * i + 1]), _tag_names(got[3 * i + 2]))
                for i in range(len(keys))]

    # ---- writing -------------------------------------------------------------------

    async def aput(self, key, value, ns, tags):
        self._check_open()
        tags = _tag_bytes(tags)
        entry = self._entry(key, value, tags)
        await self._arun("store", *self._store_call([entry], ns, tags))
        self._bump("writes")

    async def aput_many(self, items, ns, tags):
        """Every item in one MULTI/EXEC (batches of 500 entries a script call): all or none."""
        self._check_open()
        tags = _tag_bytes(tags)
        entries = [self._entry(k, v, tags) for k, v in items]
        if not entries:
            return
        calls = [self._store_call(entries[i:i + _BATCH], ns, tags) for i in range(0, len(entries), _BATCH)]

        async def transaction(client):
            for attempt in range(2):
                pipe = client.pipeline(transaction=True)
                for keys, args in calls:
                    pipe.execute_command("EVALSHA", self._shas["store"], len(keys), *keys, *args)
                try:
                    await pipe.execute()
                    return
                except rex.NoScriptError:
                    # (every call of the transaction runs the same script: all failed, none applied)
                    await client.execute_command("SCRIPT", "LOAD", _SCRIPTS["store"])
                finally:
                    await pipe.reset()
            raise VelaError(f"Redis at {self._o.where} does not keep the store script")

        await self._acall(transaction)  # (applied whole or not at all: never a PartialWrite)
        self._bump("writes", len(entries))

    async def adelete(self, key):
        self._check_open()
        enc = _native.encode_key(key)
        removed = await self._arun("delete", [self._vkey(enc), self._mkey(enc)], [self._prefix(enc), enc]) == 1
        if removed:
            self._bump("deletes")
        return removed

    # ---- tags and flush --------------------------------------------------------------

    async def ainvalidate_tag(self, tag, drop_copies=None):
        self._check_open()
        b = tag.encode("utf-8")
        ack = self._ack_key()
        count, encs, hosts = await self._arun("invalidate_tag", [self._P + b"t:" + b], [self._P, b, ack])
        if count:
            self._bump("invalidations", count)
        if drop_copies is not None:
            drop_copies([_native.decode_key(enc) for enc in encs])
        await self._aconfirm(ack, hosts, f"invalidate_tag removed {count} entries")
        return count

    async def aflush(self, drop_copies=None):
        """``flush`` for asyncio: SCAN + UNLINK of this cache's prefix (never FLUSHDB)."""
        self._check_open()

        async def scan(client):
            return [k async for k in client.scan_iter(match=self._P + b"*", count=1000)]

        keys = await self._acall(scan)
        values, others = flushed(self._P, keys)  # (one shard: cluster URLs take the sync API)
        count = 0
        for i in range(0, len(values), 1000):
            count += await self._acommand("UNLINK", *values[i:i + 1000])
        for i in range(0, len(others), 1000):
            await self._acommand("UNLINK", *others[i:i + 1000])
        if drop_copies is not None:
            drop_copies(None)
        ack = self._ack_key()
        hosts = await self._arun("announce", [], [self._P, FLUSH_ALL, ack])
        await self._aconfirm(ack, hosts, f"flush removed {count} entries")
        return count

    async def _aconfirm(self, ack, hosts, done):
        """``_confirm`` for asyncio: BLPOP on the event loop's client, never on the loop's thread."""
        loop = asyncio.get_running_loop()
        waiting = {h.decode() if isinstance(h, bytes) else h for h in hosts}
        o = self._o
        deadline = loop.time() + o.ack_timeout
        while waiting:
            left = deadline - loop.time()
            if left <= 0:
                raise BackendUnavailable(
                    f"{done} in Redis at {o.where}, but the near cache of host(s) {', '.join(sorted(waiting))} "
                    f"did not confirm dropping its copies within {o.ack_timeout:g} s (a stalled "
                    "listener: its host drops them when the others see it, else they live their L1 age)")
            answer = await self._acommand("BLPOP", ack, "%.3f" % max(0.001, min(left, o.socket_timeout / 2)),
                                          idempotent=False)
            if answer:
                waiting.discard(answer[1].decode())
        if hosts:
            await self._acommand("UNLINK", ack)
