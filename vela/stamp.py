"""The stamp: what a value fetched with ``stale_ttl``, ``early`` or ``stale_if_error``
carries so that every process and every host judges its freshness alike.

A stamped value is stored as the handle's serializer output (so under its codec,
whatever the store) of this layout::

    MAGIC | fresh_until (int64, ns of the wall clock) | fetch_ns (int64) | kind (1 byte) | payload

``kind`` says how the payload holds the value: bytes as they are, str as UTF-8, an
int in decimal, or anything else as the serializer's own bytes (so a signed
serializer still verifies them before they are unpickled). The serializers of every
handle (``vela.serializers.resolve``) recognise the magic and return the value
itself, so ``get()`` and friends never see the stamp; only ``get_or_fetch`` asks for
it (:func:`reading_stamps`).

The fresh-until time is an absolute wall-clock time: the one time every process of
every host can compare without a round trip. A host whose clock is off by d judges a
value stale d early or late; the entry's real lifetime is the store's ttl, which
travels as remaining time, so clock skew never keeps an entry past it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["Stamped", "MAGIC", "READING", "stamping", "unstamping", "reading_stamps", "as_read"]

# No pickle, JSON or msgpack payload starts with a NUL followed by more bytes; a custom
# serializer's output would have to start with these 12 bytes to be mistaken for a stamp.
MAGIC = b"\x00vela-stamp\x01"
_HEADER = struct.Struct("<qqB")
_BYTES, _STR, _INT, _CODED = range(4)


class Stamped:
    """A value with its fresh-until time (ns since the epoch, wall clock) and the
    nanoseconds its fetch took (XFetch's delta)."""

    __slots__ = ("value", "fresh_until", "fetch_ns")

    def __init__(self, value: Any, fresh_until: int, fetch_ns: int) -> None:
        self.value = value
        self.fresh_until = fresh_until
        self.fetch_ns = fetch_ns

    def __repr__(self) -> str:
        return f"Stamped({self.value!r}, fresh_until={self.fresh_until}, fetch_ns={self.fetch_ns})"


def _encode(stamped: Stamped, dumps: Callable[[Any], bytes]) -> bytes:
    value = stamped.value
    kind = type(value)
    payload: bytes
    if kind is bytes:
        code, payload = _BYTES, value
    elif kind is str:
        code, payload = _STR, value.encode("utf-8", "surrogatepass")
    elif kind is int:
        code, payload = _INT, b"%d" % value
    else:
        code, payload = _CODED, bytes(dumps(value))
    return MAGIC + _HEADER.pack(stamped.fresh_until, stamped.fetch_ns, code) + payload


def _decode(data: bytes, loads: Callable[[bytes], Any]) -> Stamped:
    start = len(MAGIC)
    fresh_until, fetch_ns, code = _HEADER.unpack_from(data, start)
    payload = data[start + _HEADER.size:]
    if code == _BYTES:
        value: Any = bytes(payload)
    elif code == _STR:
        value = bytes(payload).decode("utf-8", "surrogatepass")
    elif code == _INT:
        value = int(payload)
    elif code == _CODED:
        value = loads(payload)
    else:
        raise ValueError(f"a stamped value of unknown kind {code} (written by a newer Vela?)")
    return Stamped(value, fresh_until, fetch_ns)


# Set while get_or_fetch reads: the loaders then hand it the stamp, not the bare value.
# A context variable, not a thread-local: an asyncio task that reads with stamps across
# an await must not hand stamps to the other tasks of its thread meanwhile.
_reading: ContextVar[bool] = ContextVar("vela_reading_stamps", default=False)
# The variable itself, for the C core: a handle that keeps decoded values
# (local_objects) sets it around the decodes it keeps, then reads them with as_read.
READING = _reading


@contextmanager
def reading_stamps() -> Iterator[None]:
    """Within it (this thread or asyncio task), a stamped value reads as its :class:`Stamped`."""
    token = _reading.set(True)
    try:
        yield
    finally:
        _reading.reset(token)


def as_read(value: Any) -> Any:
    """``value``, read within :func:`reading_stamps`, as a read here returns it: a store
    that keeps a copy of what it read (a near cache) reads with the stamp, so that the
    copy keeps it, then hands its caller this."""
    if type(value) is Stamped and not _reading.get():
        return value.value
    return value


def stamping(dumps: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """``dumps`` that also writes a :class:`Stamped` (its value through ``dumps``)."""
    def dumps_or_stamp(obj: Any) -> bytes:
        if type(obj) is Stamped:
            return _encode(obj, dumps)
        return dumps(obj)
    return dumps_or_stamp


def unstamping(loads: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``loads`` that also reads a stamped value: its value, or (within
    :func:`reading_stamps`) its :class:`Stamped`."""
    def loads_or_unstamp(data: bytes) -> Any:
        # (the first byte alone, first: this runs on every get of a serialized value)
        if not data or data[0] or not data.startswith(MAGIC):
            return loads(data)
        stamped = _decode(data, loads)
        return stamped if _reading.get() else stamped.value
    return loads_or_unstamp
