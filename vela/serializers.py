"""Serializers for values that are not bytes, str or int.

A serializer is anything with ``dumps(obj) -> bytes`` and ``loads(bytes) -> obj``.
Each stored value remembers which codec wrote it, so a handle reads values
written by handles with other built-in serializers.
"""

import json
import pickle

from . import _native
from .errors import OptionError


class _Pickle:
    name = "pickle"
    codec = _native.CODEC_PICKLE

    @staticmethod
    def dumps(obj):
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    loads = staticmethod(pickle.loads)


class _Json:
    name = "json"
    codec = _native.CODEC_JSON
    _encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def dumps(cls, obj):
        return cls._encoder.encode(obj).encode()

    loads = staticmethod(json.loads)


def _msgpack():
    try:
        import msgpack
    except ImportError:
        return None

    class _Msgpack:
        name = "msgpack"
        codec = _native.CODEC_MSGPACK
        dumps = staticmethod(lambda obj: msgpack.packb(obj, use_bin_type=True))
        loads = staticmethod(lambda data: msgpack.unpackb(data, raw=False))

    return _Msgpack


def resolve(serializer):
    """(dumps, codec, loaders) for the serializer option."""
    builtin = {"pickle": _Pickle, "json": _Json}
    mp = _msgpack()
    if mp is not None:
        builtin["msgpack"] = mp
    loaders = {s.codec: s.loads for s in builtin.values()}
    if isinstance(serializer, str):
        if serializer not in builtin:
            hint = " (pip install 'vela[msgpack]')" if serializer == "msgpack" else ""
            raise OptionError(f"serializer must be one of {', '.join(sorted(builtin))} or an object "
                              f"with dumps/loads, not {serializer!r}{hint}")
        chosen = builtin[serializer]
        return chosen.dumps, chosen.codec, loaders
    if callable(getattr(serializer, "dumps", None)) and callable(getattr(serializer, "loads", None)):
        loaders[_native.CODEC_CUSTOM] = serializer.loads
        return serializer.dumps, _native.CODEC_CUSTOM, loaders
    raise OptionError(f"serializer must be a name or an object with dumps and loads, not {serializer!r}")
