"""Vela's exceptions: one root, each also a subclass of the builtin it means."""

__all__ = [
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
]


class VelaError(Exception):
    """Root of every error Vela raises on purpose."""


class CacheFull(VelaError):
    """No room for the entry, and the eviction policy may not evict live entries."""


class ValueTooLarge(VelaError, ValueError):
    """The entry (key + value + tags) is bigger than the cache's max_entry_size."""


class LayoutMismatch(VelaError):
    """The segment exists with other layout options, or another format version."""


class BackendUnavailable(VelaError):
    """The backend (Redis, the disk) cannot be reached."""


class BridgeUnavailable(VelaError):
    """The host's vela-bridge does not answer."""


class OptionError(VelaError, ValueError, TypeError):
    """An option is unknown or has a bad value; the message names it."""


class CacheClosed(VelaError, ValueError):
    """The cache handle was closed."""


class LockTimeout(VelaError, TimeoutError):
    """A lock was not acquired in time: a stripe lock stayed held past the lock timeout
    (its holder is stopped?), or ``cache.lock(...)`` was not free within its timeout."""


class SegmentCorrupt(VelaError):
    """The segment is damaged beyond repair; destroy and recreate the cache."""


class PartialWrite(VelaError):
    """A batch spanning several owners (or Redis) was stored in part: ``stored`` and
    ``failed`` are the sets of keys that were and were not written; ``__cause__`` is
    the first failure."""

    def __init__(self, message: str, stored=(), failed=()):
        super().__init__(message)
        self.stored = set(stored)
        self.failed = set(failed)


class UntrustedValue(VelaError, ValueError):
    """A cache with a signed serializer read a value that is not signed with its key
    (written without the key, with another key, or altered): refused, never unpickled."""
