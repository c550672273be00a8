"""Optional dependencies: the local cache needs only posix-ipc and xxhash; every
other feature names the extra that brings what it needs when that is missing."""

import importlib
from types import ModuleType

__all__ = ["need"]

# import name -> (distribution, extra)
_PROVIDERS = {
    "zmq": ("pyzmq", "bridge"),
    "msgpack": ("msgpack", "bridge"),
    "tomli": ("tomli", "bridge"),
    "redis": ("redis", "redis"),
    "psutil": ("psutil", "inspect"),
    "opentelemetry.trace": ("opentelemetry-api", "otel"),
}


def need(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise an ImportError that says which
    extra to install (``pip install 'vela[bridge]'``)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        dist, extra = _PROVIDERS[module]
        raise ImportError(f"{feature} needs the Python package {dist}, which is not installed: "
                          f"pip install 'vela[{extra}]'", name=module) from exc
