"""Vela's own worker threads for what the asyncio API must not do on the loop: wait
for a lease another caller holds, or make a remote store's request that has no
asyncio variant.

Never the loop's default executor: the application's ``asyncio.to_thread`` calls
share that one, and a burst of waits for a slow fetch would hold its threads. One
pool per process, made on first use after a fork (a pool inherited through fork
has no threads, and work given to it would wait for ever).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, TypeVar

__all__ = ["pool", "run"]

T = TypeVar("T")

# Waits at once: each holds a thread for at most stampede_timeout (or a request's timeout).
MAX_THREADS = 32

_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None
_pid = 0


def pool() -> ThreadPoolExecutor:
    """This process's pool of waiting threads."""
    global _pool, _pid
    if _pid != os.getpid():
        with _lock:
            if _pid != os.getpid():
                _pool = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="vela-wait")
                _pid = os.getpid()
    assert _pool is not None
    return _pool


def run(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``fn(*args)`` in one of the pool's threads, as a future of the running loop."""
    return asyncio.get_running_loop().run_in_executor(pool(), fn, *args)
