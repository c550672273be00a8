"""memoize: sync and async functions, methods, stable keys from any arguments, typed,
prefix/version, key/invalidate with the function's arguments, unless, ttl/tags, and
stampede protection across real processes; the same on every kind of store."""
import asyncio
import dataclasses
import datetime
import decimal
import enum
import fractions
import math
import os
import subprocess
import sys
import textwrap
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vela
from vela.memoize import canonical, digest
from apps import readme
from conftest import FORK, run_children
from stores import store_fixtures

BARRIER_TIMEOUT = 30


def _bump(counter):
    with counter.get_lock():
        counter.value += 1


# ---- the canonical form -------------------------------------------------------------------


class Color(enum.Enum):
    RED = 1
    BLUE = 2


@dataclasses.dataclass
class Point:
    x: float
    y: float
    label: str = dataclasses.field(default="", compare=False)


class Account:
    def __init__(self, number):
        self.number = number

    def __vela_key__(self):
        return ("account", self.number)


def test_values_that_compare_equal_encode_alike():
    same = [
        (1, 1.0, True, fractions.Fraction(1), decimal.Decimal("1.00"), complex(1, 0)),
        (0.5, fractions.Fraction(1, 2), decimal.Decimal("0.5")),
        ({"a": 1, "b": [1, 2]}, {"b": [1, 2], "a": 1}),
        ({3, 1, 2}, frozenset([2, 3, 1])),
        (b"raw", bytearray(b"raw"), memoryview(b"raw")),
        (Point(1, 2, "first"), Point(1.0, 2.0, "second")),  # label takes no part in ==
        (datetime.datetime(2024, 1, 1, 12, tzinfo=datetime.timezone.utc),
         datetime.datetime(2024, 1, 1, 14, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))),
    ]
    for group in same:
        assert all(a == b for a in group for b in group), group  # the premise: they are equal
        assert len({canonical(v) for v in group}) == 1, group
    different = [None, 0, 1, 1.5, -1, "1", b"1", (1,), [1], {1}, {1: None}, Color.RED, Color.BLUE,
                 Point(1, 3), float("nan"), float("inf"), datetime.date(2024, 1, 1),
                 datetime.timedelta(seconds=1), uuid.UUID(int=1), Account(1), Account(2), ("", ""), ("",),
                 ("a", "b"), ("ab",), ["a", ["b"]], [["a"], "b"], int, str]
    encodings = [canonical(v) for v in different]
    assert len(set(encodings)) == len(different)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(), st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0]),
                     st.floats(allow_nan=False), st.text(max_size=3), st.binary(max_size=3),
                     st.fractions(max_denominator=4), st.decimals(allow_nan=False, places=2))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple),
    st.dictionaries(st.one_of(st.integers(-3, 3), st.text(max_size=2)), inner, max_size=3),
    st.frozensets(st.one_of(st.integers(-3, 3), st.text(max_size=2), st.sampled_from([1.0, 0.5])), max_size=3)),
    max_leaves=8)


@settings(max_examples=400, deadline=None)
@given(_values, _values)
def test_equal_exactly_when_the_encodings_are(a, b):
    assert (a == b) == (canonical(a) == canonical(b)), (a, b)
    assert canonical(a) == canonical(a)


def _reexpress(value):
    """An equal value written otherwise: numbers as other number types, dicts in
    another order, bytes as bytearray."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return fractions.Fraction(value) if value % 2 else decimal.Decimal(value)
    if isinstance(value, (float, decimal.Decimal)):
        return fractions.Fraction(value) if math.isfinite(value) else float(value)
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, list):
        return [_reexpress(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_reexpress(v) for v in value)
    if isinstance(value, dict):
        return {k: _reexpress(v) for k, v in reversed(list(value.items()))}
    return value


@settings(max_examples=300, deadline=None)
@given(_values)
def test_a_value_written_otherwise_has_the_same_encoding(value):
    other = _reexpress(value)
    assert other == value  # the premise
    assert canonical(other) == canonical(value)


def test_typed_tells_equal_values_of_other_types_apart():
    assert canonical(1) == canonical(1.0) == canonical(True)
    assert len({canonical(1, typed=True), canonical(1.0, typed=True), canonical(True, typed=True)}) == 3
    # at every level
    assert canonical((1, {"a": 1}), typed=True) != canonical((1, {"a": 1.0}), typed=True)
    assert canonical((1, {"a": 1}), typed=True) == canonical((1, {"a": 1}), typed=True)


def test_an_unsupported_argument_is_refused_with_the_fixes_named():
    class Opaque:
        pass

    with pytest.raises(TypeError) as info:
        canonical([1, Opaque()])
    message = str(info.value)
    assert "test_memoize" in message and "Opaque" in message
    assert "__vela_key__" in message and "ignore=" in message and "key=" in message
    loop = []
    loop.append(loop)
    with pytest.raises(TypeError, match="contains itself"):
        canonical(loop)


_DIGEST_SCRIPT = textwrap.dedent("""
    import datetime, decimal, sys
    from vela.memoize import digest
    value = {"names": {"ann", "bob", "cy", "dee", "eve"}, "n": (1, 2.5, None, decimal.Decimal("3.25")),
             frozenset({"x", "y", "z"}): b"bytes", "when": datetime.date(2024, 5, 1)}
    sys.stdout.write(digest(value))
""")


def test_the_digest_is_the_same_in_every_process_whatever_its_hash_seed():
    # str hashes (and so set and dict orders) differ with PYTHONHASHSEED: the key must not.
    seen = set()
    for seed in ("1", "2", "3", "random"):
        run = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], capture_output=True, text=True,
                             timeout=60, env=dict(os.environ, PYTHONHASHSEED=seed))
        assert run.returncode == 0, run.stderr
        seen.add(run.stdout)
    assert len(seen) == 1
    value = {"names": {"ann", "bob", "cy", "dee", "eve"}, "n": (1, 2.5, None, decimal.Decimal("3.25")),
             frozenset({"x", "y", "z"}): b"bytes", "when": datetime.date(2024, 5, 1)}
    assert seen == {digest(value)}
    assert len(digest(value)) == 32


def test_the_encoding_is_pinned():
    # Hosts of a cluster run their own Python versions and roll upgrades one by one: a
    # change of the encoding changes every key, so it must be deliberate (change this
    # digest with it, and say so in the CHANGELOG).
    assert digest({"a": [1, 2.5, None]}) == "ba662e088458a3c73fb2768a2a140b8b"


# ---- functions ------------------------------------------------------------------------------


def test_any_arguments_bound_to_the_signature(cache):
    calls = []

    @cache.memoize(ttl=60, tags=["memo"])
    def area(shape, scale=1.0, *extra, unit=None, **options):
        calls.append((shape, scale, extra, unit, options))
        return len(calls)

    first = area(Point(1, 2), 2.0, unit=None, where={"a": 1, "b": 2})
    assert area(Point(1.0, 2.0), scale=2, where={"b": 2, "a": 1}) == first  # same call, written otherwise
    assert area(Point(1, 2), 2, unit=None, where={"a": 1, "b": 2}) == first
    assert len(calls) == 1
    assert area(Point(1, 2)) == 2            # scale defaults to 1.0: another call
    assert area(Point(1, 2), 1.0) == 2       # ... the same as giving the default
    assert area(Point(1, 2), 1.0, "x") == 3  # *extra counts
    assert area(None, float("nan")) == 4
    assert area(None, float("nan")) == 4
    assert len(calls) == 4
    key = area.key(Point(1, 2), 2.0, where={"a": 1, "b": 2})
    assert key == area.cache_key(Point(1, 2), 2.0, where={"a": 1, "b": 2})
    assert key[0] == f"{__name__}.test_any_arguments_bound_to_the_signature.<locals>.area"
    assert cache.get(key) == first
    assert 59.0 < cache.ttl(key) <= 60.0
    assert cache.invalidate_tag("memo") == 4


def test_key_and_invalidate_take_the_functions_arguments(cache):
    runs = []

    @cache.memoize()
    def load(user_id, verbose=False):
        runs.append(user_id)
        return {"id": user_id, "n": len(runs)}

    assert load(7) == {"id": 7, "n": 1}
    assert load(7, verbose=False) == {"id": 7, "n": 1}
    assert load.key(7) == load.key(user_id=7, verbose=False)
    assert load.invalidate(user_id=7) is True
    assert load.invalidate(7) is False
    assert load(7) == {"id": 7, "n": 2}
    with pytest.raises(TypeError, match="user_id"):  # as the function itself would say
        load.key()
    assert load.__name__ == "load" and load.__wrapped__(8) == {"id": 8, "n": 3}


def test_typed_prefix_and_version(cache):
    runs = []

    def make(version, typed=False):
        @cache.memoize(prefix="pricing", version=version, typed=typed)
        def price(amount):
            runs.append((version, typed, amount))
            return amount * 2
        return price

    v1 = make(1)
    assert [v1(1), v1(1.0), v1(True)] == [2, 2, 2]
    assert runs == [(1, False, 1)]
    assert v1.key(1)[:2] == ("pricing", 1)
    v2 = make(2)  # the code changed: a new version computes anew
    assert v2(1) == 2 and runs[-1] == (2, False, 1)
    assert v1(1) == 2 and len(runs) == 2  # the old version's result is still there, untouched
    typed = make(1, typed=True)
    assert [typed(1), typed(1.0), typed(1)] == [2, 2.0, 2]
    assert type(typed(1.0)) is float
    assert runs[2:] == [(1, True, 1), (1, True, 1.0)]


def test_unless_returns_the_result_without_storing_it(cache):
    runs = []

    @cache.memoize(unless=lambda result: result is None)
    def find(name):
        runs.append(name)
        return {"ann": 1}.get(name)

    assert find("bob") is None and find("bob") is None
    assert runs == ["bob", "bob"]  # not stored: computed each time
    assert find.key("bob") not in cache
    assert find("ann") == 1 and find("ann") == 1
    assert runs == ["bob", "bob", "ann"]
    assert cache.get(find.key("ann")) == 1
    assert cache.stats()["fetches"] == 1  # only the stored result counts as a fetch


def test_bad_options_are_refused_naming_them(cache):
    with pytest.raises(vela.OptionError, match=r"has no parameter 'usr'.*its parameters: user"):
        @cache.memoize(ignore=("usr",))
        def f(user):
            return user
    with pytest.raises(vela.OptionError, match="key= builds the whole key"):
        cache.memoize(key=lambda x: x, version=2)
    with pytest.raises(vela.OptionError, match="ignore must be a collection"):
        cache.memoize(ignore="self")
    with pytest.raises(vela.OptionError, match="version must be an int or a str"):
        cache.memoize(version=1.5)

    runs = []

    @cache.memoize()
    def g(thing):
        runs.append(thing)

    with pytest.raises(TypeError, match="object"):
        g(object())
    assert runs == [] and len(cache) == 0  # refused before calling and before storing


# ---- async ------------------------------------------------------------------------------------


def test_async_functions(cache):
    runs = []

    @cache.memoize(ttl=30, unless=lambda result: result < 0)
    async def score(user, *, bonus=0):
        await asyncio.sleep(0.01)
        runs.append(user)
        return len(user) + bonus

    async def main():
        return [await score("ann"), await score("ann", bonus=0), await score("bo", bonus=-5),
                await score("bo", bonus=-5), await score(user="ann")]

    assert asyncio.iscoroutinefunction(score)
    assert asyncio.run(main()) == [3, 3, -3, -3, 3]
    assert runs == ["ann", "bo", "bo"]
    assert cache.get(score.key("ann")) == 3
    assert score.invalidate("ann") is True


def _await_memoized(fn, barrier, arg):
    barrier.wait(BARRIER_TIMEOUT)
    return asyncio.run(fn(arg))


def test_async_callers_in_many_processes_compute_once(cache):
    runs = FORK.Value("i", 0)

    @cache.memoize(ttl=60)
    async def slow(n):
        _bump(runs)
        await asyncio.sleep(0.3)
        return {"n": n, "pid": os.getpid()}

    barrier = FORK.Barrier(4)
    results = run_children(_await_memoized, [(slow, barrier, 5) for _ in range(4)], timeout=60)
    assert runs.value == 1
    assert len({r["pid"] for r in results}) == 1 and results[0]["n"] == 5
    assert asyncio.run(slow(5)) == results[0]


# ---- methods ---------------------------------------------------------------------------------


def test_methods_leave_self_out_and_take_it_in_key_and_invalidate(cache):
    runs = []

    class Repo:
        def __init__(self, dsn):
            self.dsn = dsn

        @cache.memoize(ttl=60)
        def find(self, item_id):
            runs.append((self.dsn, item_id))
            return f"item {item_id}"

        @classmethod
        @cache.memoize()
        def kinds(cls, n):
            runs.append((cls.__name__, n))
            return n * 10

        @cache.memoize()  # above @classmethod works too
        @classmethod
        def default(cls, n):
            runs.append(("default", n))
            return -n

        @staticmethod
        @cache.memoize()
        def parse(text):
            runs.append(("parse", text))
            return text.upper()

    repo, other = Repo("db1"), Repo("db2")
    assert repo.find(42) == "item 42" and other.find(42) == "item 42"
    assert runs == [("db1", 42)]  # self is not in the key: every instance shares the result
    assert Repo.find.key(repo, 42) == Repo.find.key(other, 42) == Repo.find.key(None, item_id=42)
    assert Repo.find.invalidate(repo, 42) is True
    assert other.find(42) == "item 42" and runs[-1] == ("db2", 42)
    assert [Repo.kinds(2), repo.kinds(2), Repo.default(3), repo.default(3), Repo.parse("a"), repo.parse("a")] \
        == [20, 20, -3, -3, "A", "A"]
    assert runs[2:] == [("Repo", 2), ("default", 3), ("parse", "a")]
    assert Repo.kinds.invalidate(Repo, 2) is True
    assert Repo.parse.invalidate("a") is True


def test_ignore_replaces_the_default(cache):
    runs = []

    class Tenant:
        def __init__(self, tenant_id):
            self.tenant_id = tenant_id

        def __vela_key__(self):
            return self.tenant_id

        @cache.memoize(ignore=())  # one result per tenant: self is part of the key
        def quota(self):
            runs.append(self.tenant_id)
            return self.tenant_id * 100

    def fetch(db, user_id):
        runs.append(("fetch", user_id))
        return {"user": user_id}

    a, b = Tenant(1), Tenant(2)
    assert [a.quota(), b.quota(), Tenant(1).quota()] == [100, 200, 100]
    assert runs == [1, 2]
    fetch_cached = cache.memoize(ignore=("db",))(fetch)
    assert fetch_cached(object(), 5) == fetch_cached(object(), 5) == {"user": 5}
    assert runs[2:] == [("fetch", 5)]


# ---- the same on every store ---------------------------------------------------------------

STORES = ("shm-local", "file-local", "shm-replicated", "shm-partitioned", "redis")


redis_server, store = store_fixtures(STORES)[:2]  # (one store per kind for the module: its tests share it)


def _catalog_functions(cache, tag):
    @cache.memoize(ttl=60, tags=[tag])
    def price(sku, qty=1.0):
        return {"sku": sku, "total": 9.5 * qty, "pid": os.getpid()}

    @cache.memoize(tags=[tag], unless=lambda r: r is None)
    async def stock(sku):
        await asyncio.sleep(0.01)
        return None if sku.startswith("gone") else {"sku": sku, "pid": os.getpid()}

    return price, stock


def _on_other_host(cache, tag):
    price, stock = _catalog_functions(cache, tag)
    return price("A-1", 2), asyncio.run(stock("A-1")), asyncio.run(stock("gone-1"))


def test_memoize_on_every_store(store, monkeypatch):
    monkeypatch.setenv("VELA_NAMESPACE", store.namespaces["A"])
    c = store.cache
    c.flush()
    tag = f"memo{uuid.uuid4().hex[:6]}"
    price, stock = _catalog_functions(c, tag)
    me = os.getpid()
    assert price("A-1", 2) == {"sku": "A-1", "total": 19.0, "pid": me}
    assert price("A-1", qty=2.0) == {"sku": "A-1", "total": 19.0, "pid": me}  # the same call
    assert asyncio.run(stock("A-1")) == {"sku": "A-1", "pid": me}
    assert asyncio.run(stock("gone-1")) is None
    assert c.get(stock.key("gone-1"), "absent") == "absent"
    assert 55 < c.ttl(price.key("A-1", 2)) <= 60

    # another host: where the store spans hosts, the keys are the same bytes there and
    # it reads host A's results; a local cache is the host's own
    other_price, other_stock, other_gone = store.on_host_b(_on_other_host, tag)
    writer = me if store.spans_hosts else other_price["pid"]
    assert other_price == {"sku": "A-1", "total": 19.0, "pid": writer}
    assert other_stock["pid"] == writer and other_gone is None
    if not store.spans_hosts:
        assert writer != me

    assert price.invalidate("A-1", 2.0) is True
    assert price.invalidate("A-1", 2.0) is False
    assert price("A-1", 2)["pid"] == me
    assert c.invalidate_tag(tag) == 2  # price and stock of A-1 (None was never stored)


# ---- the README ---------------------------------------------------------------------------------


def test_readme_memoize_section_runs_as_written():
    name = f"readme{uuid.uuid4().hex[:10]}"
    (code,) = readme.python_blocks("Memoize")
    try:
        readme.run_snippet(code.replace('"shop"', repr(name)), {"__name__": "readme_memoize"})
    finally:
        vela.destroy(name)
