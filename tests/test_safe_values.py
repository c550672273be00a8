"""Safe values: a signed serializer refuses what was not written with its key (by real
processes without it, with another key, or altering a value), before unpickling it;
compression above a threshold with zlib, zstd and lz4; on the shared table and Redis."""
import os
import pickle
import sys
import uuid

import pytest

import vela
from apps import readme
from conftest import run_in_child
from redis_server import RedisServer
from vela import serializers
from vela.serializers import compressed, signed

KEY = b"k" * 16 + b"-the-real-key"
OTHER_KEY = b"o" * 16 + b"-another-key"


class _Exploit:
    """A pickle that runs code when loaded: it creates the file named ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _signed_cache(name, **extra):
    return vela.Cache(name, capacity="4MiB", serializer=signed(key=KEY, **extra))


# ---- writers without the key, in their own processes --------------------------------------


def _write(name, serializer, key, value):
    cache = vela.Cache(name, serializer=serializer)
    try:
        cache.put(key, value)
    finally:
        cache.close()
    return os.getpid()


class _Tamper:
    """A writer that signs with the right key, then flips one bit of the payload."""

    def __init__(self):
        self._signed = signed(key=KEY)

    def dumps(self, obj):
        data = bytearray(self._signed.dumps(obj))
        data[-1] ^= 1
        return bytes(data)

    loads = staticmethod(pickle.loads)


def test_values_not_signed_with_the_key_are_refused_and_never_unpickled(cache_name, tmp_path):
    reader = _signed_cache(cache_name)
    marker = tmp_path / "exploited"
    try:
        writers = {
            "plain": ("pickle", "refused: it was written by the plain pickle serializer"),
            "json": ("json", "refused: it was written by the plain json serializer"),
            "unsigned": (compressed(compress_over=0), "refused: it is not signed"),
            "other-key": (signed(key=OTHER_KEY), "refused: its signature does not match this cache's key"),
            "tampered": (_Tamper(), "refused: its signature does not match this cache's key"),
        }
        for key, (serializer, _) in writers.items():
            value = [1, 2] if serializer == "json" else _Exploit(str(marker))
            assert run_in_child(_write, cache_name, serializer, key, value) != os.getpid()
        for key, (_, message) in writers.items():
            with pytest.raises(vela.UntrustedValue, match=message) as info:
                reader.get(key)
            assert "delete the key" in str(info.value)
            assert isinstance(info.value, ValueError)
        assert not marker.exists()  # nothing was unpickled
        # what a process with the key writes is read, also with other compression settings
        run_in_child(_write, cache_name, signed(key=KEY, compress_over=10, compression="lz4"), "good",
                     {"rows": list(range(100))})
        assert reader.get("good") == {"rows": list(range(100))}
        # raw values (bytes, str, int) are stored without a serializer: not signed
        run_in_child(_write, cache_name, "pickle", "raw", b"bytes")
        assert reader.get("raw") == b"bytes"
        # the refused key can be deleted and written again
        assert reader.delete("plain") is True
        reader.put("plain", {"ok": True})
        assert reader.get("plain") == {"ok": True}
    finally:
        reader.close()


def test_a_signed_value_read_without_the_key(cache_name):
    writer = _signed_cache(cache_name, compress_over=0)
    plain = vela.Cache(cache_name)
    unsigned = vela.Cache(cache_name, serializer=compressed())
    try:
        writer.put("v", {"a": 1})
        with pytest.raises(TypeError, match="stored by a serializer .* this handle does not have"):
            plain.get("v")
        assert unsigned.get("v") == {"a": 1}  # an unsigned envelope reader trusts every writer
        plain.put("p", {"b": 2})
        assert unsigned.get("p") == {"b": 2}  # ... and reads the plain codecs too
    finally:
        writer.close()
        plain.close()
        unsigned.close()


def test_inner_serializers_inside_the_envelope(cache_name):
    for inner in ("json", "msgpack", "pickle"):
        cache = vela.Cache(cache_name, serializer=signed(key=KEY, inner=inner))
        try:
            cache.put(inner, {"n": [1, 2, "x"]})
            assert cache.get(inner) == {"n": [1, 2, "x"]}
        finally:
            cache.close()
    envelope = signed(key=KEY, inner="json")
    assert envelope.dumps({"a": 1}).endswith(b'{"a":1}')


# ---- compression -----------------------------------------------------------------------------


@pytest.mark.parametrize("compression, method", [("zlib", 1), ("zstd", 2), ("lz4", 3)])
def test_compression_above_the_threshold(cache_name, compression, method):
    serializer = compressed(compress_over=1000, compression=compression)
    small, big = "a" * 500, {"text": "a" * (1 << 20)}
    assert serializer.dumps(small)[3] == 0  # under the threshold: as it is
    packed = serializer.dumps(big)
    assert packed[3] == method and len(packed) < 20_000
    assert serializer.loads(packed) == big
    noise = os.urandom(5000)
    assert serializer.dumps(noise)[3] == 0  # incompressible: stored as it is
    # a value four times max_entry_size fits once compressed
    cache = vela.Cache(cache_name, capacity="16MiB", max_entry_size="256KiB", serializer=serializer)
    plain = vela.Cache(cache_name)
    try:
        cache.put("big", big)
        assert cache.get("big") == big
        with pytest.raises(vela.ValueTooLarge):
            plain.put("big", big)
        # every reader decompresses whatever method the writer used
        other = "zlib" if compression != "zlib" else "lz4"
        assert vela.Cache(cache_name, serializer=compressed(compression=other)).get("big") == big
    finally:
        cache.close()
        plain.close()


def test_signed_and_compressed_together(cache_name):
    serializer = signed(key=KEY, compress_over=100, compression="zstd")
    data = serializer.dumps({"text": "b" * 10_000})
    assert data[:3] == b"VE1" and data[3] == 0x80 | 2 and len(data) < 200
    assert serializer.loads(data) == {"text": "b" * 10_000}


# ---- options --------------------------------------------------------------------------------


def test_key_sources(tmp_path, monkeypatch):
    key_file = tmp_path / "cache.key"
    key_file.write_bytes(KEY + b"\n")
    monkeypatch.setenv("APP_CACHE_KEY", KEY.decode())
    by_file, by_env, by_value = signed(str(key_file)), signed(key_env="APP_CACHE_KEY"), signed(key=KEY.decode())
    value = {"same": "key"}
    assert by_env.loads(by_file.dumps(value)) == by_value.loads(by_env.dumps(value)) == value


def test_bad_options_say_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    short = tmp_path / "short.key"
    short.write_bytes(b"tooshort\n")
    cases = [
        (lambda: signed(), "exactly one of key=, key_file=, key_env="),
        (lambda: signed(key=KEY, key_env="X"), r"exactly one of .* \(got key, key_env\)"),
        (lambda: signed(str(tmp_path / "absent.key")), r"absent.key'\): cannot read it \(No such file"),
        (lambda: signed(key_env="NO_SUCH_KEY"), "the environment variable is not set"),
        (lambda: signed(str(short)), r"holds 8 bytes, at least 16 are needed \(make one"),
        (lambda: signed(key=12345678901234567), "must be bytes or str, not int"),
        (lambda: compressed(compress_over=-1), "compress_over must be a number of bytes"),
        (lambda: compressed(compression="brotli"), "compression must be one of zlib, zstd, lz4"),
        (lambda: signed(key=KEY, inner="yaml"), "inner serializer must be one of"),
    ]
    for make, message in cases:
        with pytest.raises(vela.OptionError, match=message):
            make()


def test_a_missing_compression_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard fails
    with pytest.raises(ImportError, match=r"compression='zstd' needs the Python package zstandard.*"
                                          r"pip install zstandard"):
        compressed(compression="zstd")
    monkeypatch.setitem(sys.modules, "lz4", None)
    with pytest.raises(ImportError, match="pip install lz4"):
        signed(key=KEY, compress_over=0, compression="lz4")


def test_garbage_is_refused_not_crashed_on():
    serializer = signed(key=KEY)
    for data in (b"", b"VE", b"VE1", b"XYZ\x80" + b"\0" * 40, b"VE1\x80short"):
        with pytest.raises(vela.UntrustedValue):
            serializer.loads(data)


# ---- Redis -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


def test_on_redis_a_writer_without_the_key_is_refused(redis_server):
    name = f"sv{uuid.uuid4().hex[:8]}"
    opts = dict(backend="redis", backend_opts={"url": redis_server.url})
    reader = vela.Cache(name, serializer=signed(key=KEY, compress_over=64), **opts)
    try:
        run_in_child(lambda: vela.Cache(name, **opts).put("k", {"forged": True}))
        run_in_child(lambda: vela.Cache(name, serializer=signed(key=OTHER_KEY), **opts).put("o", [1]))
        with pytest.raises(vela.UntrustedValue, match="plain pickle serializer"):
            reader.get("k")
        with pytest.raises(vela.UntrustedValue, match="does not match this cache's key"):
            reader.get("o")
        reader.put("mine", {"rows": "x" * 1000})
        assert run_in_child(lambda: vela.Cache(name, serializer=signed(key=KEY), **opts).get("mine")) \
            == {"rows": "x" * 1000}
    finally:
        reader.close()
        vela.destroy(name, backend="redis", backend_opts={"url": redis_server.url})


# ---- the README ---------------------------------------------------------------------------------


def test_readme_safe_values_section_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = f"readme{uuid.uuid4().hex[:10]}"
    (code,) = readme.python_blocks("Safe values: signed and compressed")
    try:
        readme.run_snippet(code.replace('"shop"', repr(name)), {"__name__": "readme_safe"})
    finally:
        vela.destroy(name)
    assert serializers.MIN_KEY_BYTES == 16


def test_changing_the_key_with_previous_keys(cache_name):
    old_writer = vela.Cache(cache_name, serializer=signed(key=OTHER_KEY))
    rolled = vela.Cache(cache_name, serializer=signed(key=KEY, previous_keys=[OTHER_KEY]))
    new_only = vela.Cache(cache_name, serializer=signed(key=KEY))
    try:
        old_writer.put("old", {"v": 1})
        assert rolled.get("old") == {"v": 1}  # still accepted during the roll-out
        rolled.put("new", {"v": 2})           # ... but signed with the new key
        assert new_only.get("new") == {"v": 2}
        with pytest.raises(vela.UntrustedValue, match="does not match"):
            new_only.get("old")               # the old key dropped: refused
        with pytest.raises(vela.UntrustedValue, match="does not match"):
            old_writer.get("new")
    finally:
        for handle in (old_writer, rolled, new_only):
            handle.close()
    with pytest.raises(vela.OptionError, match="previous key #1 holds 5 bytes"):
        signed(key=KEY, previous_keys=["short"])
    with pytest.raises(vela.OptionError, match="takes a list of keys, not one key"):
        signed(key=KEY, previous_keys=OTHER_KEY)
