"""memoize: cache a function's results, keyed by a stable hash of its arguments.

Works through the public API of :class:`vela.Cache` alone (``get_or_fetch``,
``aget_or_fetch``, ``delete``), so it behaves the same on every store, and inherits
its stampede protection: of the callers that miss a key together, one computes.

The key of a call is ``(prefix, digest)``, or ``(prefix, version, digest)`` when a
version is given. The digest hashes a canonical encoding of the call's arguments,
bound to the function's parameters (so ``f(1)``, ``f(x=1)`` and ``f(1, y=<default>)``
are one call), that is the same in every process and on every host (no ``hash()``,
so no ``PYTHONHASHSEED``). Arguments that compare equal encode alike (``1``, ``1.0``
and ``True``; ``{"a": 1, "b": 2}`` in any order), unless ``typed=True``.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import fractions
import functools
import hashlib
import inspect
import math
import pathlib
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Optional, ParamSpec, Protocol, TypeVar, Union, overload

from .errors import OptionError
from . import options
from .refresh import NotStored, plan

if TYPE_CHECKING:
    from .cache import Cache, Key

__all__ = ["memoize", "Memoized", "canonical", "digest"]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

# Parameters left out of the key by default when a function takes them first.
_RECEIVERS = ("self", "cls")


class Memoized(Protocol[P, R_co]):
    """A memoized function: call it as the function; ``key`` and ``invalidate`` take
    the same arguments (for a method, the instance first: ``Repo.find.invalidate(repo, 42)``)."""

    @property
    def __wrapped__(self) -> Callable[P, R_co]: ...

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def key(self, *args: P.args, **kwargs: P.kwargs) -> Key:
        """The cache key of this call."""
        ...

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> Key:
        """Same as :meth:`key` (the older name)."""
        ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Remove this call's cached result; True when there was one."""
        ...

    @overload
    def __get__(self, instance: None, owner: Optional[type] = None) -> Memoized[P, R_co]: ...

    @overload
    def __get__(self, instance: object, owner: Optional[type] = None) -> Callable[..., R_co]: ...


def memoize(cache: Cache, ttl: Optional[float] = None, tags: Iterable[str] = (),
            key: Optional[Callable[..., Key]] = None, *, prefix: Optional[str] = None,
            version: Union[int, str, None] = None, typed: bool = False,
            ignore: Optional[Collection[str]] = None, unless: Optional[Callable[[Any], bool]] = None,
            stale_ttl: Optional[float] = None, early: Union[float, bool, None] = None,
            stale_if_error: Optional[float] = None) -> Callable[[Callable[P, R]], Memoized[P, R]]:
    """Decorator: cache the results of a function (sync or ``async def``) in ``cache``.

    :param ttl: seconds a result lives (None: the cache's ``default_ttl``).
    :param tags: tags of every stored result (``cache.invalidate_tag`` drops them all).
    :param key: ``key(*args, **kwargs) -> cache key``, used as it is instead of the
        hashed key (then ``prefix``, ``version``, ``typed`` and ``ignore`` do not apply).
    :param prefix: first part of every key (default: the function's module and qualified name).
    :param version: part of every key: change it when the function's results change.
    :param typed: arguments of different types are different calls (``1`` and ``1.0``).
    :param ignore: names of parameters left out of the key (default: a first parameter
        named ``self`` or ``cls``; give ``ignore=()`` to key on the instance too).
    :param unless: ``unless(result) -> bool``: a result for which it is true is returned
        but not stored.
    :param stale_ttl: seconds past ``ttl`` a result is still returned at once while one
        caller recomputes it in the background (see ``Cache.get_or_fetch``).
    :param early: XFetch beta (``True``: 1.0): recompute in the background before ``ttl``
        ends, the sooner the slower the function.
    :param stale_if_error: seconds past ``ttl`` a call that raises returns the old result.
    :raises vela.OptionError: a bad option (a parameter name the function lacks...).
    """
    tags = tuple(tags)
    if key is not None and (prefix is not None or version is not None or typed or ignore is not None):
        raise OptionError("memoize: key= builds the whole key; prefix=, version=, typed= and ignore= "
                          "apply to the default key only")
    if prefix is not None and not isinstance(prefix, str):
        raise OptionError(f"memoize: prefix must be a str, not {type(prefix).__name__}")
    if version is not None and (isinstance(version, bool) or not isinstance(version, (int, str))):
        raise OptionError(f"memoize: version must be an int or a str, not {type(version).__name__}")
    if isinstance(ignore, str):
        raise OptionError(f"memoize: ignore must be a collection of parameter names, not the str {ignore!r}")
    if unless is not None and not callable(unless):
        raise OptionError("memoize: unless must be a callable taking the result")
    refresh = {"stale_ttl": stale_ttl, "early": early, "stale_if_error": stale_if_error}
    plan(options.ttl_ns(ttl, cache.default_ttl), **refresh)  # (refused here, not at the first call)

    def decorate(fn: Any) -> Any:
        if isinstance(fn, (classmethod, staticmethod)):  # @memoize above @classmethod
            return type(fn)(decorate(fn.__func__))
        if not callable(fn):
            raise TypeError(f"memoize decorates a function, not {type(fn).__name__}")
        make_key = key if key is not None else _hashed_key(fn, prefix, version, typed, ignore)

        def refuse(value: Any) -> Any:
            if unless is not None and unless(value):
                raise NotStored(value)
            return value

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                async def fetch(_key: Any) -> Any:
                    return refuse(await fn(*args, **kwargs))
                try:
                    return await cache.aget_or_fetch(make_key(*args, **kwargs), fetch, ttl=ttl, tags=tags,
                                                     **refresh)
                except NotStored as skipped:
                    return skipped.value
        else:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    return cache.get_or_fetch(make_key(*args, **kwargs),
                                              lambda _key: refuse(fn(*args, **kwargs)), ttl=ttl, tags=tags,
                                              **refresh)
                except NotStored as skipped:
                    return skipped.value

        w: Any = wrapper
        w.key = w.cache_key = make_key
        w.invalidate = lambda *args, **kwargs: cache.delete(make_key(*args, **kwargs))
        w.cache = cache
        return wrapper

    return decorate


def _hashed_key(fn: Callable[..., Any], prefix: Optional[str], version: Union[int, str, None], typed: bool,
                ignore: Optional[Collection[str]]) -> Callable[..., Key]:
    """The default key function of ``fn``: prefix, version, digest of the bound arguments."""
    signature = inspect.signature(fn)
    names = list(signature.parameters)
    if ignore is None:
        ignored = frozenset(names[:1]) & frozenset(_RECEIVERS)
    else:
        ignored = frozenset(ignore)
        unknown = sorted(ignored - set(names))
        if unknown:
            raise OptionError(f"memoize(ignore=...): {fn.__qualname__} has no parameter "
                              f"{', '.join(map(repr, unknown))} (its parameters: {', '.join(names)})")
    head = prefix if prefix is not None else f"{fn.__module__}.{fn.__qualname__}"
    start: tuple[Any, ...] = (head,) if version is None else (head, version)

    params = list(signature.parameters.values())
    plain = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    defaults = [p.default for p in params]
    name_parts = {name: _sized(b"a", name.encode()) for name in names}

    def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterable[tuple[str, Any]]:
        """(name, value) of every parameter, as Signature.bind + apply_defaults give them
        (positional arguments only: the same, without their cost)."""
        if plain and not kwargs and len(args) <= len(params) and all(
                d is not inspect.Parameter.empty for d in defaults[len(args):]):
            return zip(names, (*args, *defaults[len(args):]))
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments.items()

    def make_key(*args: Any, **kwargs: Any) -> Key:
        out: list[bytes] = []
        open_ids: set[int] = set()
        for name, value in bind(args, kwargs):
            if name not in ignored:
                out.append(name_parts[name])
                _encode(value, typed, out, open_ids)
        return start + (hashlib.blake2b(b"".join(out), digest_size=16).hexdigest(),)

    return make_key


def digest(value: Any, typed: bool = False) -> str:
    """Hex digest (128 bits) of the canonical encoding of ``value``: equal in every
    process and on every host for arguments that compare equal (see :func:`canonical`)."""
    return hashlib.blake2b(canonical(value, typed), digest_size=16).hexdigest()


def canonical(value: Any, typed: bool = False) -> bytes:
    """The canonical bytes of ``value``: values that compare equal give the same bytes
    (with ``typed=True``, only when their types also match, at every level).

    Takes None, bool, int, float, complex, Fraction, Decimal, str, bytes, bytearray,
    memoryview, tuples, lists, dicts (and other mappings), sets, frozensets,
    dataclass instances, enums, date/time/datetime/timedelta, UUID, paths, classes,
    and any object with a ``__vela_key__()`` method returning one of these.

    :raises TypeError: a value of another type (the message names it and the fixes).
    """
    out: list[bytes] = []
    _encode(value, typed, out, set())
    return b"".join(out)


def _sized(tag: bytes, payload: bytes) -> bytes:
    return tag + str(len(payload)).encode() + b":" + payload


def _number(value: Any) -> bytes:
    """Equal numbers of any type (int, float, Fraction, Decimal, bool) give equal bytes:
    they are written as the exact rational they are."""
    if type(value) is int:  # the common cases, first
        return _sized(b"i", str(value).encode())
    if type(value) is float and math.isfinite(value):
        numerator, denominator = value.as_integer_ratio()  # exact, in lowest terms
        if denominator == 1:
            return _sized(b"i", str(numerator).encode())
        return _sized(b"q", f"{numerator}/{denominator}".encode())
    if isinstance(value, complex):
        if value.imag:
            return b"c" + _number(value.real) + _number(value.imag)
        value = value.real
    if isinstance(value, decimal.Decimal) and not value.is_finite():
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return _sized(b"f", repr(value).encode())  # nan, inf, -inf
    exact = fractions.Fraction(value)
    if exact.denominator == 1:
        return _sized(b"i", str(exact.numerator).encode())
    return _sized(b"q", f"{exact.numerator}/{exact.denominator}".encode())


def _encode(value: Any, typed: bool, out: list[bytes], open_ids: set[int]) -> None:
    kind = type(value)
    if typed:
        out.append(_sized(b"@", f"{kind.__module__}.{kind.__qualname__}".encode()))
    if kind is str:  # the common cases first (the same bytes as below)
        out.append(_sized(b"s", value.encode("utf-8", "surrogatepass")))
    elif kind is int:
        out.append(_sized(b"i", str(value).encode()))
    elif value is None:
        out.append(b"N")
    elif isinstance(value, str):  # before enums: a str enum equals its str
        out.append(_sized(b"s", value.encode("utf-8", "surrogatepass")))
    elif isinstance(value, (int, float, complex, fractions.Fraction, decimal.Decimal)):
        out.append(_number(value))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        out.append(_sized(b"b", bytes(value)))
    elif isinstance(value, enum.Enum):
        out.append(_sized(b"E", f"{kind.__module__}.{kind.__qualname__}.{value.name}".encode()))
    elif isinstance(value, datetime.datetime):
        if value.tzinfo is not None and value.utcoffset() is not None:  # equal instants are equal
            value = value.astimezone(datetime.timezone.utc)
        out.append(_sized(b"T", value.isoformat().encode()))
    elif isinstance(value, datetime.date):
        out.append(_sized(b"D", value.isoformat().encode()))
    elif isinstance(value, datetime.time):
        out.append(_sized(b"H", value.isoformat().encode()))
    elif isinstance(value, datetime.timedelta):
        out.append(_sized(b"d", str(value // datetime.timedelta(microseconds=1)).encode()))
    elif isinstance(value, uuid.UUID):
        out.append(_sized(b"U", value.bytes))
    elif isinstance(value, pathlib.PurePath):
        out.append(_sized(b"P", str(value).encode("utf-8", "surrogateescape")))
    elif isinstance(value, type):
        out.append(_sized(b"C", f"{value.__module__}.{value.__qualname__}".encode()))
    else:
        _encode_container(value, typed, out, open_ids)


def _encode_container(value: Any, typed: bool, out: list[bytes], open_ids: set[int]) -> None:
    if id(value) in open_ids:
        raise TypeError(f"memoize cannot key an argument that contains itself ({type(value).__name__})")
    open_ids.add(id(value))
    try:
        if isinstance(value, (tuple, list)):
            out.append((b"t" if isinstance(value, tuple) else b"l") + str(len(value)).encode() + b"[")
            for item in value:
                _encode(item, typed, out, open_ids)
            out.append(b"]")
        elif isinstance(value, Mapping):
            pairs = sorted((_part(k, typed, open_ids), _part(v, typed, open_ids)) for k, v in value.items())
            out.append(b"M" + str(len(pairs)).encode() + b"{" + b"".join(k + v for k, v in pairs) + b"}")
        elif isinstance(value, (set, frozenset)):
            items = sorted(_part(item, typed, open_ids) for item in value)
            out.append(b"S" + str(len(items)).encode() + b"{" + b"".join(items) + b"}")
        elif dataclasses.is_dataclass(value):
            kind = type(value)
            # The fields that take part in == (compare=True), by name.
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.compare}
            out.append(_sized(b"O", f"{kind.__module__}.{kind.__qualname__}".encode()))
            _encode(fields, typed, out, open_ids)
        elif callable(getattr(value, "__vela_key__", None)):
            kind = type(value)
            out.append(_sized(b"K", f"{kind.__module__}.{kind.__qualname__}".encode()))
            _encode(value.__vela_key__(), typed, out, open_ids)
        else:
            raise TypeError(f"memoize cannot build a stable key from an argument of type "
                            f"{type(value).__module__}.{type(value).__qualname__}: give the class a "
                            f"__vela_key__() method, leave the parameter out with ignore=, or pass key=")
    finally:
        open_ids.discard(id(value))


def _part(value: Any, typed: bool, open_ids: set[int]) -> bytes:
    out: list[bytes] = []
    _encode(value, typed, out, open_ids)
    return b"".join(out)
