"""The Flask-Caching backend: Flask-Caching's backend contract (cachelib's BaseCache:
what every backend returns for set, add, get_many, delete_many, inc/dec, has, timeouts),
and real Flask apps in several processes sharing cached views and memoized functions."""
import datetime
import logging
import os
import time
import uuid

import pytest
from flask import Flask
from flask_caching import Cache as FlaskCache

import vela
from conftest import run_in_child
from vela.contrib.flask import VelaCache


@pytest.fixture
def name():
    name = f"fl{uuid.uuid4().hex[:10]}"
    yield name
    vela.destroy(name)


def make_app(name, **config):
    app = Flask(f"app{uuid.uuid4().hex[:6]}")
    app.config.update(CACHE_TYPE="vela.contrib.flask.VelaCache", CACHE_VELA_NAME=name,
                      CACHE_VELA_OPTIONS={"capacity": "8MiB"}, CACHE_DEFAULT_TIMEOUT=300, **config)
    return app, FlaskCache(app)


@pytest.fixture
def backend(name):
    app, cache = make_app(name)
    with app.app_context():
        yield cache.cache


# ---- the backend contract -----------------------------------------------------------------


def test_the_backend_is_made_from_cache_type(backend, name):
    assert isinstance(backend, VelaCache)
    assert backend.vela_cache.name == name
    assert backend.key_prefix == "flask_cache_" and backend.default_timeout == 300


def test_set_get_add_and_many(backend):
    for i in range(3):
        assert backend.set(str(i), i * i) is True
    assert [backend.get(str(i)) for i in range(3)] == [0, 1, 4]
    assert backend.set("foo", ["bar"]) is True and backend.get("foo") == ["bar"]
    assert backend.set("raw", b"bytes") is True and backend.get("raw") == b"bytes"
    assert backend.set("t", True) and backend.set("f", False)
    assert backend.get("t") is True and backend.get("f") is False
    assert backend.get("absent") is None
    assert backend.get_many("foo", "absent", "1") == [["bar"], None, 1]
    assert backend.get_dict("foo", "1") == {"foo": ["bar"], "1": 1}
    assert backend.set_many({"a": "x", "b": ["y"]}) == ["a", "b"]
    assert backend.get_many("a", "b") == ["x", ["y"]]
    assert backend.add("new", "first") is True
    assert backend.add("new", "second") is False
    assert backend.get("new") == "first"
    # the keys carry the prefix in the Vela cache
    assert backend.vela_cache.get("flask_cache_new") == "first"


def test_delete_has_clear_inc_dec(backend):
    assert backend.has("k") is False
    backend.set("k", "v")
    assert backend.has("k") is True
    assert backend.delete("k") is True and backend.delete("k") is False
    assert backend.has("k") is False
    backend.set_many({"x": 1, "y": 2})
    assert backend.delete_many("x", "y", "never") == ["x", "y", "never"]  # absent afterwards: deleted
    assert backend.get_many("x", "y") == [None, None]
    assert backend.inc("n") == 1 and backend.inc("n", 5) == 6 and backend.dec("n", 2) == 4
    assert backend.get("n") == 4
    backend.set("s", 1)
    assert backend.inc("s") == backend.get("s") == 2
    assert backend.dec("s") == backend.get("s") == 1
    assert backend.clear() is True
    assert backend.get("s") is None and len(backend.vela_cache) == 0


def test_timeouts(backend):
    vc = backend.vela_cache
    backend.set("default", 1)
    assert 295 < vc.ttl("flask_cache_default") <= 300
    backend.set("forever", 1, timeout=0)
    assert vc.ttl("flask_cache_forever") is None
    backend.set("td", 1, timeout=datetime.timedelta(minutes=2))
    assert 115 < vc.ttl("flask_cache_td") <= 120
    backend.set("gone", "old")
    assert backend.set("gone", "new", timeout=-1) is True  # expires at once
    assert backend.get("gone") is None
    assert backend.add("never", 1, timeout=-1) is False and backend.has("never") is False
    backend.set("short", "v", timeout=1)
    assert backend.get("short") == "v"
    time.sleep(1.3)
    assert backend.get("short") is None and backend.get("forever") == 1


def test_a_value_too_large_is_not_stored_and_said(backend, caplog):
    big = os.urandom(1 << 20)  # max_entry_size of 8 MiB is 128 KiB
    with caplog.at_level(logging.WARNING, logger="vela.contrib.flask"):
        assert backend.set("big", big) is False
    assert backend.get("big") is None
    assert "did not store big" in caplog.text and "max_entry_size" in caplog.text


def test_configuration_mistakes_are_named():
    app = Flask("bad")
    app.config.update(CACHE_TYPE="vela.contrib.flask.VelaCache")
    with pytest.raises(vela.OptionError, match="needs CACHE_VELA_NAME"):
        FlaskCache(app)
    app.config.update(CACHE_VELA_NAME="x", CACHE_VELA_OPTIONS=["capacity"])
    with pytest.raises(vela.OptionError, match="CACHE_VELA_OPTIONS must be a dict"):
        FlaskCache(app)
    app.config.update(CACHE_VELA_OPTIONS={"capcity": "8MiB"})
    with pytest.raises(vela.OptionError, match="unknown option: capcity"):
        FlaskCache(app)


# ---- real apps in several processes --------------------------------------------------------


def _serve(name, paths):
    """A worker process: its own app and Flask-Caching object, a few requests."""
    app, cache = make_app(name)

    @app.route("/report/<int:n>")
    @cache.cached(timeout=60)
    def report(n):
        return {"n": n, "rendered by": os.getpid()}

    @cache.memoize(timeout=60)
    def price(sku):
        return {"sku": sku, "computed by": os.getpid()}

    @app.route("/price/<sku>")
    def price_view(sku):
        return price(sku)

    @app.route("/forget/<sku>")
    def forget(sku):
        cache.delete_memoized(price, sku)
        return "ok"

    client = app.test_client()
    return [client.get(path).get_json(silent=True) for path in paths]


def test_worker_processes_share_cached_views_and_memoized_functions(name):
    first = run_in_child(_serve, name, ["/report/1", "/price/A-1"])
    renderer, computer = first[0]["rendered by"], first[1]["computed by"]
    assert first == [{"n": 1, "rendered by": renderer}, {"sku": "A-1", "computed by": computer}]
    assert renderer != os.getpid()
    # other workers get the first one's page and result
    second = run_in_child(_serve, name, ["/report/1", "/price/A-1", "/report/2"])
    assert second[:2] == first
    assert second[2]["rendered by"] not in (renderer, None)
    # one worker invalidates the memoized result; the next computes it anew
    run_in_child(_serve, name, ["/forget/A-1"])
    third = run_in_child(_serve, name, ["/price/A-1", "/report/1"])
    assert third[0]["computed by"] != computer and third[1] == first[0]


def test_readme_example_runs_as_written(name):
    from apps import readme

    code = readme.python_blocks("Flask, dogpile.cache and FastAPI")[0]
    readme.run_snippet(code.replace('"shop"', repr(name)), {"__name__": "readme_flask"})
