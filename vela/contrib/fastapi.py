"""FastAPI and Starlette: a dependency that gives routes a Vela cache, and an ASGI
middleware that caches whole responses in it (shared by every worker process).

    from fastapi import Depends, FastAPI
    from vela.contrib.fastapi import CacheDependency, CachedResponses

    shop_cache = CacheDependency("shop", capacity="256MiB")
    app = FastAPI()
    app.add_middleware(CachedResponses, cache=shop_cache, ttl=30, paths=["/catalog"])

    @app.get("/visits")
    def visits(cache: vela.Cache = Depends(shop_cache)):
        return {"visits": cache.incr("visits")}

The middleware caches GET and HEAD responses under ``paths`` through
:meth:`vela.Cache.memoize`, so of the requests that miss the same page at once (in
any worker process), one renders it and the others wait for it. The key is the
method, the path, the query parameters (in any order) and the request headers
named by ``vary``. A request that carries one of the ``private`` headers
(``Authorization`` and ``Cookie``: what it gets may be someone's own) goes to the
app as it is, neither read from nor stored in the cache. A response is stored only when its status is in
``status_codes``, it sets no cookie, its ``Cache-Control`` does not say
``no-store``, ``no-cache`` or ``private``, and its body is at most ``max_body``
bytes. Every response it handles carries ``x-vela-cache: hit`` or ``miss``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any, Awaitable, Callable, MutableMapping, Optional, Union
from urllib.parse import parse_qsl

from ..cache import Cache
from ..errors import OptionError
from ._handles import shared_handle

__all__ = ["CacheDependency", "CachedResponses"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# What a cached response is: (status, [(header, value), ...], body), picklable.
_Response = tuple[int, list[tuple[bytes, bytes]], bytes]


class CacheDependency:
    """``Depends(CacheDependency("shop", **options))``: the process's handle on the Vela
    cache ``name``, opened on first use (so in each worker, after the fork)."""

    def __init__(self, name: str, **options: Any) -> None:
        self.name = name
        self.options = options

    def __call__(self) -> Cache:
        return shared_handle(self.name, self.options)


class CachedResponses:
    """ASGI middleware caching whole responses in a Vela cache (see the module's doc).

    :param cache: a :class:`vela.Cache`, or a :class:`CacheDependency` (opened on first request).
    :param ttl: seconds a response is kept (None: the cache's ``default_ttl``).
    :param tags: tags of every stored response (``cache.invalidate_tag`` drops them).
    :param paths: path prefixes whose responses are cached (default: every path).
    :param vary: request headers that are part of the key.
    :param private: request headers whose presence makes a request bypass the cache.
    :param status_codes: statuses of the responses that are stored.
    :param max_body: largest body stored, bytes.
    :param prefix: first part of every key (change it to drop every cached page at once).
    """

    def __init__(self, app: ASGIApp, cache: Union[Cache, CacheDependency], ttl: Optional[float] = 60.0,
                 tags: Iterable[str] = (), paths: Collection[str] = ("/",),
                 vary: Collection[str] = ("host", "accept", "accept-encoding"),
                 private: Collection[str] = ("authorization", "cookie"), status_codes: Collection[int] = (200,),
                 max_body: int = 1 << 20, prefix: str = "vela.http") -> None:
        if isinstance(paths, str) or not all(isinstance(p, str) and p.startswith("/") for p in paths):
            raise OptionError(f"paths must be a list of path prefixes starting with '/', not {paths!r}")
        if not isinstance(cache, (Cache, CacheDependency)):
            raise OptionError(f"cache must be a vela.Cache or a CacheDependency, not {type(cache).__name__}")
        self.app = app
        self._cache = cache
        self.paths = tuple(paths)
        self.vary = tuple(h.lower().encode("latin-1") for h in vary)
        self.private = frozenset(h.lower().encode("latin-1") for h in private)
        self.status_codes = frozenset(status_codes)
        self.max_body = max_body
        self.ttl, self.tags, self.prefix = ttl, tuple(tags), prefix
        self._render: Optional[Callable[..., Awaitable[_Response]]] = None

    def _memoized_render(self) -> Callable[..., Awaitable[_Response]]:
        if self._render is None:
            cache = self._cache if isinstance(self._cache, Cache) else self._cache()
            self._render = cache.memoize(ttl=self.ttl, tags=self.tags, prefix=self.prefix,
                                         ignore=("scope", "receive", "rendered"),
                                         unless=lambda response: not self._storable(response))(self._run_app)
        return self._render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        if (scope["type"] != "http" or scope["method"] not in ("GET", "HEAD")
                or not scope["path"].startswith(self.paths) or not self.private.isdisjoint(headers)):
            await self.app(scope, receive, send)
            return
        query = sorted(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        rendered: list[bool] = []
        status, response_headers, body = await self._memoized_render()(
            scope, receive, rendered, scope["method"], scope["path"], query,
            [headers.get(name, b"") for name in self.vary])
        outcome = b"miss" if rendered else b"hit"
        await send({"type": "http.response.start", "status": status,
                    "headers": [*response_headers, (b"x-vela-cache", outcome)]})
        await send({"type": "http.response.body", "body": body})

    async def _run_app(self, scope: Scope, receive: Receive, rendered: list[bool], method: str, path: str,
                       query: list[tuple[str, str]], vary: list[bytes]) -> _Response:
        """The response of the app, whole (the key is made of the other arguments)."""
        rendered.append(True)
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))

        await self.app(scope, receive, capture)
        headers = [(bytes(k), bytes(v)) for k, v in start.get("headers", [])]
        return int(start.get("status", 500)), headers, b"".join(chunks)

    def _storable(self, response: _Response) -> bool:
        status, headers, body = response
        if status not in self.status_codes or len(body) > self.max_body:
            return False
        for name, value in headers:
            name = name.lower()
            if name == b"set-cookie":
                return False
            if name == b"cache-control" and any(word in value.lower()
                                                for word in (b"no-store", b"no-cache", b"private")):
                return False
        return True
