"""The dogpile.cache backend: dogpile's own backend and mutex test suites (shipped in
dogpile.testing) against the "vela" entry point, and regions in real processes: one
regeneration among every process, values shared, a mutex freed when its holder dies."""
import os
import signal
import time
import uuid

import pytest
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE
from dogpile.testing.fixtures import _GenericBackendTestSuite, _GenericMutexTestSuite

import vela
from conftest import FORK, Child, run_children
from vela.contrib.dogpile import VelaBackend

NAME = f"dp{uuid.uuid4().hex[:10]}"
ARGUMENTS = {"name": NAME, "options": {"capacity": "8MiB"}}


@pytest.fixture(scope="module", autouse=True)
def _destroy_the_cache():
    yield
    vela.destroy(NAME)


class TestDogpileBackendSuite(_GenericBackendTestSuite):
    backend = "vela"  # loaded through the entry point
    config_args = {"arguments": ARGUMENTS}


class TestDogpileMutexSuite(_GenericMutexTestSuite):
    backend = "vela"
    config_args = {"arguments": ARGUMENTS}


def test_the_entry_point_names_the_backend():
    from dogpile.cache.region import _backend_loader

    assert _backend_loader.load("vela") is VelaBackend


def test_values_are_stored_as_dogpiles_bytes_with_vela_ttl():
    name = f"dp{uuid.uuid4().hex[:10]}"
    region = make_region().configure("vela", expiration_time=60,
                                     arguments={"name": name, "expiration_time": 120})
    try:
        region.set("k", {"a": [1, 2]})
        assert region.get("k") == {"a": [1, 2]}
        cache = region.backend.cache
        raw = cache.get("k")
        assert isinstance(raw, bytes)  # dogpile's serialized form, stored as it is
        assert 115 < cache.ttl("k") <= 120
        region.set_multi({"m1": 1, "m2": "two"})
        assert region.get_multi(["m1", "m2", "absent"]) == [1, "two", NO_VALUE]
        region.delete_multi(["m1", "m2"])
        assert region.get_multi(["m1", "m2"]) == [NO_VALUE, NO_VALUE]
        cache.put("foreign", {"not": "dogpile's bytes"})  # a value someone else put there
        assert region.get("foreign") is NO_VALUE
    finally:
        vela.destroy(name)


def test_bad_arguments_are_named():
    with pytest.raises(vela.OptionError, match="need 'name'"):
        VelaBackend({})
    with pytest.raises(vela.OptionError, match="'cache' must be a vela.Cache"):
        VelaBackend({"cache": "shop"})


# ---- processes ---------------------------------------------------------------------------------


def _regenerate_in_process(name, runs, barrier):
    region = make_region().configure("vela", expiration_time=300, arguments={"name": name})

    def create():
        with runs.get_lock():
            runs.value += 1
        time.sleep(0.3)
        return {"made by": os.getpid()}

    barrier.wait(30)
    return region.get_or_create("report", create)


def test_one_regeneration_among_processes():
    name = f"dp{uuid.uuid4().hex[:10]}"
    runs = FORK.Value("i", 0)
    barrier = FORK.Barrier(4)
    try:
        results = run_children(_regenerate_in_process, [(name, runs, barrier) for _ in range(4)], timeout=60)
        assert runs.value == 1
        assert len({r["made by"] for r in results}) == 1
    finally:
        vela.destroy(name)


def _hold_mutex_forever(name, ready):
    backend = VelaBackend({"name": name})
    assert backend.get_mutex("report").acquire()
    ready.set()
    time.sleep(600)


def test_a_mutex_whose_holder_is_killed_is_free_at_once():
    name = f"dp{uuid.uuid4().hex[:10]}"
    ready = FORK.Event()
    holder = Child(_hold_mutex_forever, name, ready)
    try:
        assert ready.wait(30)
        backend = VelaBackend({"name": name, "lock_ttl": 600})
        mutex = backend.get_mutex("report")
        assert mutex.locked() and mutex.acquire(False) is False
        os.kill(holder.pid, signal.SIGKILL)
        holder.proc.join(10)
        assert mutex.acquire(False) is True  # lock_ttl is 600 s: freed by the holder's death
        mutex.release()
        assert not mutex.locked()
    finally:
        holder.close()
        vela.destroy(name)


def test_readme_example_runs_as_written():
    from apps import readme

    name = f"dp{uuid.uuid4().hex[:10]}"
    code = readme.python_blocks("Flask, dogpile.cache and FastAPI")[1]
    try:
        readme.run_snippet(code.replace('"shop"', repr(name)), {"__name__": "readme_dogpile"})
    finally:
        vela.destroy(name)
