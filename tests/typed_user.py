"""A user's script calling every public method of vela.Cache; tests/test_typing.py runs
mypy --strict on it, then runs it."""
import asyncio
import math
import uuid
from typing import Any, Optional

import vela

name = f"typing{uuid.uuid4().hex[:8]}"
cache = vela.Cache(name, capacity="4MiB", default_ttl=300, eviction_policy="lru", max_size=None,
                   stampede_timeout=2.0, serializer="pickle")
cache.put("user:1", {"name": "Alice"}, ttl=60, tags=["users"])
cache.put(("order", 7), b"raw", ttl=math.inf)
cache["plain"] = "text"
value: Any = cache.get("user:1")
missing: Any = cache.get("absent", default=0)
item: Any = cache["plain"]
present: bool = cache.exists("user:1") and "plain" in cache
remaining: Optional[float] = cache.ttl("user:1")
touched: bool = cache.touch("user:1", ttl=120)
count: int = cache.incr("hits") + cache.incr("hits", 5, ttl=60) + cache.decr("hits", 2)


def load_user(key: str) -> dict[str, str]:
    return {"id": key}


user: dict[str, str] = cache.get_or_fetch("user:2", load_user, ttl=30, tags=["users"])


async def load_async(key: tuple[str, int]) -> int:
    return key[1] * 2


async def main() -> int:
    return await cache.aget_or_fetch(("n", 21), load_async)


doubled: int = asyncio.run(main())


async def async_calls() -> tuple[Any, bool, dict[Any, Any], bool, int]:
    async with vela.Cache(name) as handle:
        await handle.aput("async", 1, ttl=60, tags=["async"])
        await handle.aput_many({"async2": 2}, ttl=None)
        got: Any = await handle.aget("async", default=None)
        return (got, await handle.aexists("async"), await handle.aget_many(["async", "async2"]),
                await handle.adelete("async2"), await handle.ainvalidate_tag("async"))


async_results: tuple[Any, bool, dict[Any, Any], bool, int] = asyncio.run(async_calls())
assert async_results == (1, True, {"async": 1, "async2": 2}, True, 1), async_results


@cache.memoize(ttl=60, tags=["squares"])
def square(n: int) -> int:
    return n * n


squared: int = square(12)
square_key: vela.cache.Key = square.key(12)
dropped: bool = square.invalidate(12) and not square.invalidate(n=12)


class Repo:
    @cache.memoize(ttl=60, prefix="repo.find", version=2, typed=True, unless=lambda r: r is None)
    def find(self, item_id: int) -> Optional[str]:
        return str(item_id)

    @cache.memoize(ignore=("self",))
    async def afind(self, item_id: int) -> str:
        return str(item_id)


repo = Repo()
found_item: Optional[str] = repo.find(3)
found_async: str = asyncio.run(repo.afind(4))
forgot: bool = Repo.find.invalidate(repo, 3)
with cache.lock("job", ttl=30, timeout=5) as job_lock:
    job_held: bool = job_lock.held
lock_free: bool = not cache.lock("job").locked() and cache.lock("job").acquire(blocking=False, timeout=None)


async def locked_work() -> bool:
    async with cache.lock("async-job", ttl=10.0, timeout=1.0) as lock:
        return lock.held


async_held: bool = asyncio.run(locked_work())
allowed: bool = cache.throttle("api", 10, per=60.0).allow() and cache.throttle("api", 10).used() == 1
found: dict[Any, Any] = cache.get_many(["user:1", "plain", "absent"])
cache.put_many({"a": 1, "b": 2}, ttl=60, tags=["batch"])
cache.put_many([("c", 3)])
removed: int = cache.delete_many(["a", "b"])
deleted: bool = cache.delete("c")
del cache["plain"]
tagged: int = cache.invalidate_tag("users")
expired: int = cache.expire()
size: int = cache.size() + len(cache)
stats: dict[str, Any] = cache.stats()
cache.reset_stats()
info: dict[str, Any] = cache.info()
problems: list[str] = cache.check()
view: Optional[dict[str, Any]] = cache.cluster()
released: int = cache.release_leases(12345)
cache.flush_to_disk()
flushed: int = cache.flush()
closed: bool = cache.closed
text: str = repr(cache)
with vela.Cache(name) as again:
    again.put("k", 1)
cache.close()
existed: bool = vela.Cache(name).destroy() or vela.destroy(name)
errors: tuple[type[vela.VelaError], ...] = (vela.CacheFull, vela.ValueTooLarge, vela.LayoutMismatch,
                                             vela.BackendUnavailable, vela.BridgeUnavailable, vela.OptionError,
                                             vela.CacheClosed, vela.LockTimeout, vela.SegmentCorrupt)
version: str = vela.__version__
print("ok", value, missing, item, present, remaining, touched, count, user, doubled, squared, sorted(found),
      removed, deleted, tagged, expired, size, len(stats), len(info), problems, view, released, flushed, closed,
      text, existed, len(errors), version)
