"""Serializers for values that are not bytes, str or int.

A serializer is anything with ``dumps(obj) -> bytes`` and ``loads(bytes) -> obj``.
Each stored value remembers which codec wrote it, so a handle reads values
written by handles with other built-in serializers.

:func:`signed` and :func:`compressed` wrap one of them in an envelope: an
HMAC-SHA256 under a key only the cache's trusted processes hold, and compression
above a size threshold. A handle whose serializer is signed reads nothing else: a
value of another codec or with a bad MAC raises :class:`vela.UntrustedValue`
before anything is decompressed or unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn, Optional, Union

from . import _native, stamp
from .errors import OptionError, UntrustedValue

__all__ = ["signed", "compressed", "Envelope"]


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


def _builtin():
    """{name: serializer} of the built-in serializers available here."""
    builtin = {"pickle": _Pickle, "json": _Json}
    mp = _msgpack()
    if mp is not None:
        builtin["msgpack"] = mp
    return builtin


def resolve(serializer):
    """(dumps, codec, loaders) for the serializer option; they also write and read the
    stamped values of get_or_fetch's stale_ttl/early/stale_if_error (vela.stamp)."""
    dumps, codec, loaders = _resolve(serializer)
    return stamp.stamping(dumps), codec, {c: stamp.unstamping(loads) for c, loads in loaders.items()}


def _resolve(serializer):
    builtin = _builtin()
    loaders = {s.codec: s.loads for s in builtin.values()}
    if isinstance(serializer, str):
        if serializer not in builtin:
            hint = " (pip install 'vela[msgpack]')" if serializer == "msgpack" else ""
            raise OptionError(f"serializer must be one of {', '.join(sorted(builtin))} or an object "
                              f"with dumps/loads, not {serializer!r}{hint}")
        chosen = builtin[serializer]
        return chosen.dumps, chosen.codec, loaders
    if callable(getattr(serializer, "dumps", None)) and callable(getattr(serializer, "loads", None)):
        if getattr(serializer, "exclusive", False):
            # A signed serializer reads its own envelopes only: a value another codec
            # wrote carries no MAC, so whoever wrote it need not have held the key.
            loaders = {codec: _refuse(name) for name, codec in _CODECS.items()}
        loaders[_native.CODEC_CUSTOM] = serializer.loads
        return serializer.dumps, _native.CODEC_CUSTOM, loaders
    raise OptionError(f"serializer must be a name or an object with dumps and loads, not {serializer!r}")


# Every codec that goes through a serializer, also when its package is absent here.
_CODECS = {"pickle": _native.CODEC_PICKLE, "json": _native.CODEC_JSON, "msgpack": _native.CODEC_MSGPACK}


def _refuse(codec_name):
    def loads(_data):
        _untrusted(f"it was written by the plain {codec_name} serializer, not signed with this cache's key")
    return loads


def _untrusted(why: str) -> NoReturn:
    raise UntrustedValue(f"value refused: {why}; delete the key, or check the key given to "
                         f"vela.serializers.signed in every process")


# ---- the envelope: compression and signature ------------------------------------------

_MAGIC = b"VE1"
_SIGNED = 0x80                    # flag bit: a MAC follows the header
_MAC_SIZE = 32                    # HMAC-SHA256
_MAC_CONTEXT = b"vela-value\0"   # the MAC is of this, then the header, then the payload
MIN_KEY_BYTES = 16


class _Zlib:
    name, method = "zlib", 1
    compress = staticmethod(lambda data: zlib.compress(data, 6))
    decompress = staticmethod(zlib.decompress)


def _zstd():
    import zstandard

    class _Zstd:
        name, method = "zstd", 2
        compress = staticmethod(zstandard.ZstdCompressor(level=3).compress)
        # max_output_size: frames written without their size (streamed) still decode
        decompress = staticmethod(lambda data: zstandard.ZstdDecompressor().decompress(
            data, max_output_size=1 << 31))

    return _Zstd


def _lz4():
    import lz4.frame  # type: ignore[import-untyped]

    class _Lz4:
        name, method = "lz4", 3
        compress = staticmethod(lz4.frame.compress)
        decompress = staticmethod(lz4.frame.decompress)

    return _Lz4


# compression name -> (loader of its codec class, the package that brings it)
_COMPRESSORS = {"zlib": (lambda: _Zlib, None), "zstd": (_zstd, "zstandard"), "lz4": (_lz4, "lz4")}
_METHOD_NAMES = {1: "zlib", 2: "zstd", 3: "lz4"}


def _compressor(name):
    """The codec class of compression ``name``; ImportError naming the package when absent."""
    load, package = _COMPRESSORS[name]
    try:
        return load()
    except ImportError as exc:
        raise ImportError(f"compression={name!r} needs the Python package {package}, which is not "
                          f"installed: pip install {package}", name=package) from exc


class Envelope:
    """A serializer that wraps ``inner``'s bytes: compressed above ``compress_over``
    bytes, and signed when it has a key. Made by :func:`signed` and :func:`compressed`.

    Layout: ``VE1``, a flags byte (compression method in the low bits, 0x80 when
    signed), the 32-byte HMAC-SHA256 of the header and payload when signed, the payload.
    """

    def __init__(self, inner: Any = "pickle", key: Optional[bytes] = None, compress_over: Optional[int] = None,
                 compression: str = "zlib", previous_keys: Sequence[bytes] = ()) -> None:
        builtin = _builtin()
        if isinstance(inner, str):
            if inner not in builtin:
                raise OptionError(f"inner serializer must be one of {', '.join(sorted(builtin))} or an object "
                                  f"with dumps/loads, not {inner!r}")
            inner = builtin[inner]
        elif not (callable(getattr(inner, "dumps", None)) and callable(getattr(inner, "loads", None))):
            raise OptionError(f"inner serializer must be a name or an object with dumps and loads, not {inner!r}")
        if compress_over is not None and (isinstance(compress_over, bool) or not isinstance(compress_over, int)
                                          or compress_over < 0):
            raise OptionError(f"compress_over must be a number of bytes >= 0 or None, not {compress_over!r}")
        if compression not in _COMPRESSORS:
            raise OptionError(f"compression must be one of {', '.join(_COMPRESSORS)}, not {compression!r}")
        self._inner = inner
        self._key = key
        # the key that signs, then the ones still accepted while a new key rolls out
        self._verifying = [key, *previous_keys] if key is not None else []
        self.exclusive = key is not None  # read by resolve(): refuse the other codecs
        self.compress_over = compress_over
        self._compressor = _compressor(compression) if compress_over is not None else None
        self.name = ("signed" if key is not None else "compressed") + f"({getattr(inner, 'name', 'custom')})"

    def _mac(self, key: bytes, header: bytes, payload: bytes) -> bytes:
        mac = hmac.new(key, _MAC_CONTEXT, hashlib.sha256)
        mac.update(header)
        mac.update(payload)
        return mac.digest()

    def dumps(self, obj: Any) -> bytes:
        payload = self._inner.dumps(obj)
        flags = 0
        if self._compressor is not None and self.compress_over is not None and len(payload) > self.compress_over:
            packed = self._compressor.compress(payload)
            if len(packed) < len(payload):  # incompressible data stays as it is
                payload, flags = packed, self._compressor.method
        if self._key is None:
            return _MAGIC + bytes([flags]) + payload
        header = _MAGIC + bytes([flags | _SIGNED])
        return header + self._mac(self._key, header, payload) + payload

    def loads(self, data: bytes) -> Any:
        data = bytes(data)
        if data[:3] != _MAGIC or len(data) < 4:
            _untrusted("it is not in Vela's envelope format")
        flags = data[3]
        if flags & _SIGNED:
            mac, payload = data[4:4 + _MAC_SIZE], data[4 + _MAC_SIZE:]
            if self._verifying and not any(hmac.compare_digest(mac, self._mac(key, data[:4], payload))
                                           for key in self._verifying):
                _untrusted("its signature does not match this cache's key (written with "
                                       "another key, or altered)")
        else:
            payload = data[4:]
            if self._key is not None:
                _untrusted("it is not signed (written by a process without the key)")
        method = flags & 0x7F
        if method:
            name = _METHOD_NAMES.get(method)
            if name is None:
                raise ValueError(f"the value was compressed with an unknown method ({method})")
            payload = _compressor(name).decompress(payload)
        return self._inner.loads(payload)


def _read_key(key: Union[bytes, str, None], key_file: Optional[str], key_env: Optional[str]) -> bytes:
    given = [name for name, v in (("key", key), ("key_file", key_file), ("key_env", key_env)) if v is not None]
    if len(given) != 1:
        raise OptionError("signed() takes exactly one of key=, key_file=, key_env="
                          + (f" (got {', '.join(given)})" if given else ""))
    if key_file is not None:
        try:
            with open(key_file, "rb") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise OptionError(f"signed(key_file={key_file!r}): cannot read it ({exc.strerror})") from None
        source = f"key_file {key_file}"
    elif key_env is not None:
        text = os.environ.get(key_env)
        if text is None:
            raise OptionError(f"signed(key_env={key_env!r}): the environment variable is not set")
        secret, source = text.strip().encode(), f"key_env {key_env}"
    elif isinstance(key, (bytes, str)):
        secret, source = (key.encode() if isinstance(key, str) else key), "key"
    else:
        raise OptionError(f"signed(key=...) must be bytes or str, not {type(key).__name__}")
    return _long_enough(secret, source)


def _long_enough(secret: bytes, source: str) -> bytes:
    if len(secret) < MIN_KEY_BYTES:
        raise OptionError(f"signed(): the {source} holds {len(secret)} bytes, at least {MIN_KEY_BYTES} are "
                          f"needed (make one: python -c 'import secrets; print(secrets.token_hex(32))')")
    return secret


def signed(key_file: Optional[str] = None, *, key_env: Optional[str] = None, key: Union[bytes, str, None] = None,
           inner: Any = "pickle", compress_over: Optional[int] = None, compression: str = "zlib",
           previous_keys: Iterable[Union[bytes, str]] = ()) -> Envelope:
    """A serializer whose values carry an HMAC-SHA256 under a secret key: a value written
    without the key (another serializer, an unsigned envelope) or with another key is
    refused when read (``vela.UntrustedValue``), before it is unpickled.

    ``vela.Cache(name, serializer=vela.serializers.signed(key_file="/etc/app/cache.key"))``

    :param key_file: a file holding the key (at least 16 bytes; surrounding whitespace is dropped).
    :param key_env: the name of an environment variable holding the key.
    :param key: the key itself (bytes or str).
    :param inner: the serializer inside: "pickle", "json", "msgpack" or an object with dumps/loads.
    :param compress_over: compress payloads longer than this many bytes (None: never).
    :param compression: "zlib" (always there), "zstd" (``pip install zstandard``) or "lz4" (``pip install lz4``).
    :param previous_keys: keys whose values are still accepted (never used to sign): to change
        the key without refusing what is cached, give every process the new key with the old
        one here, then, once the old values are gone, drop it.
    :raises vela.OptionError: not exactly one key source, a key shorter than 16 bytes, an unreadable file.
    :raises ImportError: the compression's package is not installed.
    """
    if isinstance(previous_keys, (bytes, str)):
        raise OptionError("signed(previous_keys=...) takes a list of keys, not one key")
    previous = [_long_enough(k.encode() if isinstance(k, str) else bytes(k), f"previous key #{i + 1}")
                for i, k in enumerate(previous_keys)]
    return Envelope(inner, _read_key(key, key_file, key_env), compress_over, compression, previous)


def compressed(compress_over: int = 4096, compression: str = "zlib", inner: Any = "pickle") -> Envelope:
    """A serializer that compresses payloads longer than ``compress_over`` bytes
    (unsigned: it reads values of every codec, as the plain serializers do).

    :param compression: "zlib" (always there), "zstd" (``pip install zstandard``) or "lz4" (``pip install lz4``).
    """
    return Envelope(inner, None, compress_over, compression)

