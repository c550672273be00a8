"""One :class:`vela.Cache` handle per process and configuration, shared by the backend
objects a framework makes (per thread, per request, per region...)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from ..cache import Cache

__all__ = ["shared_handle"]

_lock = threading.Lock()
_handles: dict[tuple[str, str], Cache] = {}


def shared_handle(name: str, options: Mapping[str, Any]) -> Cache:
    """The open handle on cache ``name`` with ``options`` in this process (opened on first use)."""
    ident = (name, repr(sorted(options.items())))
    with _lock:
        handle = _handles.get(ident)
        if handle is None or handle.closed:
            handle = _handles[ident] = Cache(name, **options)
        return handle
