"""Parsing and validation of Cache options. Every error names the option."""

import math
import re

from . import _native
from .errors import OptionError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")

# The eviction_policy option's values and the C core's codes for them.
EVICTION_POLICIES = {"lru": _native.EVICT_LRU, "lfu": _native.EVICT_LFU, "ttl_only": _native.EVICT_TTL_ONLY}


def parse_size(option, value):
    """Bytes from an int or a string such as "64MiB", "1.5GB", "512k"."""
    if isinstance(value, bool):
        raise OptionError(f"{option} must be a number of bytes or a string like '64MiB', not {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise OptionError(f"{option} must be positive, not {value}")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m and m.group(2).lower() in _UNITS:
            n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
            if n > 0:
                return n
    raise OptionError(f"{option} must be a number of bytes or a string like '64MiB', not {value!r}")


MIN_CAPACITY = 1 << 20
MAX_CAPACITY = 32 << 30


def capacity(value):
    n = parse_size("capacity", value)
    if not MIN_CAPACITY <= n <= MAX_CAPACITY:
        raise OptionError(f"capacity must be from 1 MiB to 32 GiB, not {value!r} ({n} bytes)")
    return n


def check_name(name):
    if not isinstance(name, str) or not NAME.match(name):
        raise OptionError(
            f"cache name {name!r} is not valid: use 1 to 200 letters, digits, '_', '-' or '.', "
            "not starting with '.' or '-'"
        )
    return name


def seconds(option, value, allow_none=True, allow_inf=True):
    """A duration in seconds: positive, finite (or inf when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{option} must be a number of seconds, not {value!r}")
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        raise OptionError(f"{option} must be a positive number of seconds, not {value!r}")
    return float(value)


def topology_opts(topology, opts, allowed):
    """``topology_opts`` as a dict, refused if it names an option ``topology`` does not take."""
    opts = dict(opts or {})
    unknown = set(opts) - set(allowed)
    if unknown:
        raise OptionError(f"topology_opts: unknown option(s) {', '.join(sorted(unknown))} for the "
                          f"{topology} topology (it takes {', '.join(sorted(allowed))})")
    return opts


def topology_timeout(opts, option, default=3.0):
    """The bound of a wait for the bridges, ``opts[option]``: positive seconds, under an hour."""
    value = opts.get(option, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 3600:
        raise OptionError(f"topology_opts[{option!r}] must be positive seconds, not {value!r}")
    return float(value)


def ttl_ns(ttl, default_ttl):
    """Nanoseconds for the table (0 = never) from a ttl argument.

    None means the cache's default_ttl; math.inf means never, whatever the default.
    """
    if ttl is None:
        ttl = default_ttl
        if ttl is None:
            return 0
    elif isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or math.isnan(ttl) or ttl <= 0:
        raise ValueError(f"ttl must be a positive number of seconds or math.inf, not {ttl!r}")
    if math.isinf(ttl):
        return 0
    return max(1, int(ttl * 1e9))


def positive_int(option, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise OptionError(f"{option} must be a positive integer, not {value!r}")
    return value


# Decoded values a process keeps with ``local_objects=True``.
LOCAL_OBJECTS_DEFAULT = 4096


def local_objects(value):
    """How many decoded values a handle keeps (``local_objects=``): 0 for False or 0."""
    if value is False or (type(value) is int and value == 0):
        return 0
    if value is True:
        return LOCAL_OBJECTS_DEFAULT
    return positive_int("local_objects", value)


def stripes(value):
    value = positive_int("stripes", value)
    if value & (value - 1) or value > 4096:
        raise OptionError(f"stripes must be a power of two from 1 to 4096, not {value}")
    return value


def eviction_policy(value):
    if not isinstance(value, str) or value not in EVICTION_POLICIES:
        raise OptionError(f"eviction_policy must be one of {', '.join(EVICTION_POLICIES)}, not {value!r}")
    return EVICTION_POLICIES[value]


def tags(tags):
    """The distinct tags of an entry, checked as every store checks them: an iterable of
    str (not one str), each 1 to 255 bytes of UTF-8, at most MAX_TAGS distinct
    (duplicates count once). Raises TypeError or ValueError naming the problem."""
    if not tags:
        return ()
    if isinstance(tags, (str, bytes)):
        raise TypeError("tags must be an iterable of str, not a single str")
    try:
        items = list(tags)
    except TypeError:
        raise TypeError("tags must be an iterable of str") from None
    out = {}
    for tag in items:
        if not isinstance(tag, str):
            raise TypeError(f"tags must be str, not {type(tag).__name__}")
        size = len(tag.encode("utf-8"))
        if not 0 < size <= 255:
            raise ValueError(f"a tag must be 1 to 255 bytes of UTF-8, not {size}")
        out[tag] = None
        if len(out) > _native.MAX_TAGS:
            raise ValueError(f"an entry may carry at most {_native.MAX_TAGS} tags")
    return tuple(out)


def tag(tag):
    """One tag (invalidate_tag's), checked as ``tags`` checks each."""
    if not isinstance(tag, str):
        raise TypeError(f"a tag must be str, not {type(tag).__name__}")
    return tags((tag,))[0]
