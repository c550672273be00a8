"""Vela: a cache shared by every worker process of a host, in shared memory.

    import vela
    cache = vela.Cache("shop", capacity="256MiB", default_ttl=300)
    cache.put("user:1", {"name": "Alice"}, ttl=60, tags=["users"])
    cache.get("user:1")
"""

import logging

__version__ = "0.1.0"  # the one place the version lives (pyproject.toml reads it)

# A library logs, the application decides where to: nothing is printed unless it
# configures logging.
logging.getLogger("vela").addHandler(logging.NullHandler())

from . import errors  # first: the C core raises these
from . import telemetry
from .cache import Cache, destroy
from .errors import (
    BackendUnavailable,
    BridgeUnavailable,
    CacheClosed,
    CacheFull,
    LayoutMismatch,
    LockTimeout,
    OptionError,
    PartialWrite,
    SegmentCorrupt,
    UntrustedValue,
    ValueTooLarge,
    VelaError,
)

__all__ = [
    "Cache",
    "destroy",
    "telemetry",
    "VelaError",
    "CacheFull",
    "ValueTooLarge",
    "LayoutMismatch",
    "BackendUnavailable",
    "BridgeUnavailable",
    "OptionError",
    "CacheClosed",
    "LockTimeout",
    "SegmentCorrupt",
    "PartialWrite",
    "UntrustedValue",
    "__version__",
]
