"""Telemetry events, in the manner of Elixir's :telemetry.

    vela.telemetry.attach("log-gets", [("vela", "cache", "get", "stop")], handler)
    def handler(event, measurements, metadata): ...

A traced call emits, as ``:telemetry.span`` does, ``(*prefix, op, "start")``
before its work, then ``(*prefix, op, "stop")`` when it returns or
``(*prefix, op, "exception")`` when it raises (see :class:`span`).
Handlers run in the calling process, thread and asyncio task, synchronously.
A handler that raises is detached and logged; the cache call is not affected.
With no handler attached, the cost to a cache call is one attribute check, and
``Cache.get`` is the native call itself: no check at all.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType
from typing import Any, Callable, Hashable, Iterable, Optional

from .errors import OptionError

__all__ = ["attach", "detach", "execute", "list_handlers", "span"]

log = logging.getLogger("vela.telemetry")

# True while any handler is attached: the one check the hot path makes.
active = False

_lock = threading.Lock()
# Called with the new `active` after every change (the cache module rebinds its
# handles' get between the bare native call and the traced one).
Event = tuple[str, ...]
Handler = Callable[[Event, dict[str, Any], dict[str, Any]], Any]

_listeners: list[Callable[[bool], None]] = []
_by_event: dict[Event, tuple[tuple[Hashable, Handler], ...]] = {}
_by_id: dict[Hashable, tuple[list[Event], Handler]] = {}


def check_prefix(option: str, prefix: Any) -> tuple[str, ...]:
    """``prefix`` as a tuple: the first words of event names, a non-empty tuple (or list) of str.

    :raises vela.OptionError: anything else (the message names ``option``).
    """
    if not isinstance(prefix, (tuple, list)) or not prefix or not all(isinstance(p, str) for p in prefix):
        raise OptionError(f"{option} must be a non-empty tuple of str, not {prefix!r}")
    return tuple(prefix)


def _rebuild() -> None:
    global active
    by_event: dict[Event, list[tuple[Hashable, Handler]]] = {}
    for handler_id, (events, fn) in _by_id.items():
        for event in events:
            by_event.setdefault(event, []).append((handler_id, fn))
    _by_event.clear()
    _by_event.update({e: tuple(h) for e, h in by_event.items()})
    active = bool(_by_event)
    for listener in _listeners:
        listener(active)


def attach(handler_id: Hashable, events: Iterable[Iterable[str]], fn: Handler) -> None:
    """Call ``fn(event, measurements, metadata)`` for each event in ``events``.

    :param handler_id: any hashable; attaching an id twice raises ValueError.
    :param events: iterable of event tuples such as ``("vela", "cache", "get", "stop")``.
    """
    if not callable(fn):
        raise TypeError("telemetry handler must be callable")
    wanted = [tuple(e) for e in events]
    if not wanted or not all(wanted):
        raise ValueError("attach needs at least one non-empty event tuple")
    with _lock:
        if handler_id in _by_id:
            raise ValueError(f"a telemetry handler with id {handler_id!r} is already attached")
        _by_id[handler_id] = (wanted, fn)
        _rebuild()


def detach(handler_id: Hashable) -> bool:
    """Remove a handler; True when it was attached."""
    with _lock:
        if _by_id.pop(handler_id, None) is None:
            return False
        _rebuild()
        return True


def list_handlers() -> dict[Hashable, list[Event]]:
    """``{handler_id: [event, ...]}`` of the attached handlers."""
    with _lock:
        return {hid: list(events) for hid, (events, _) in _by_id.items()}


def execute(event: Event, measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Deliver an event to its handlers."""
    for handler_id, fn in _by_event.get(event, ()):
        try:
            fn(event, measurements, metadata)
        except Exception:
            log.exception("telemetry handler %r raised and was detached", handler_id)
            detach(handler_id)


class span:
    """Emit the events of one call around a ``with`` block (Elixir's ``:telemetry.span``).

    On entry ``(*prefix, "start")`` with ``{"system_time": ns since the epoch}`` and
    ``metadata``. On a normal exit ``(*prefix, "stop")`` with ``{"duration": ns}``
    plus :attr:`measurements`, and :attr:`metadata` (the block may add to both, e.g.
    ``metadata["result"]``). When the block raises, ``(*prefix, "exception")`` with
    ``{"duration": ns}`` and the metadata plus ``kind`` (the exception's class) and
    ``reason`` (the exception), then the exception propagates unchanged.

    :param prefix: the event name without its last word, e.g. ``("vela", "cache", "get")``.
    :param metadata: the metadata of every event of the call (this dict, not a copy).
    """

    __slots__ = ("prefix", "metadata", "measurements", "_start")

    def __init__(self, prefix: tuple[str, ...], metadata: dict[str, Any]) -> None:
        self.prefix = prefix
        self.metadata = metadata
        self.measurements: dict[str, Any] = {}

    def __enter__(self) -> span:
        # A copy: a stop handler must not see what a start handler wrote.
        execute(self.prefix + ("start",), {"system_time": time.time_ns()}, dict(self.metadata))
        self._start = time.perf_counter_ns()
        return self

    def __exit__(self, kind: Optional[type[BaseException]], reason: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        duration = time.perf_counter_ns() - self._start
        if kind is None:
            self.measurements["duration"] = duration
            execute(self.prefix + ("stop",), self.measurements, self.metadata)
        else:
            execute(self.prefix + ("exception",), {"duration": duration},
                    dict(self.metadata, kind=kind, reason=reason))
