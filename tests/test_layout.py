"""The layout of the package: one public Cache over stores, no import cycle.

The import graph is read from the sources (every ``import`` and ``from ... import``,
at module level or inside a function: a lazy import is still a dependency), so a
cycle fails here before it fails at import time in some order of imports. That
every public method of ``vela.Cache`` has a case in the contract suite is checked
there (tests/test_contract.py, ``test_every_public_method_has_a_contract_case``).
"""
import ast
import inspect
import pathlib

import pytest

import vela
from conftest import new_name
from vela.stores.base import Store

PACKAGE = pathlib.Path(vela.__file__).parent


def _module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules():
    """{module: source}, the C extension (vela._native) by its stub."""
    return {_module_name(p): p for p in list(PACKAGE.rglob("*.py")) + list(PACKAGE.rglob("*.pyi"))}


def _resolve(module, path, node):
    """The vela modules an import statement of ``module`` names."""
    modules = _modules()
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = package[:len(package) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        if sub in modules:
            found.append(sub)  # "from package import submodule"
        elif target in modules:
            found.append(target)
    return found


def _runtime_nodes(tree):
    """The nodes of a module that run: not the bodies of ``if TYPE_CHECKING:`` (imports
    made for annotations only, which never load at run time)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return [n for n in ast.walk(tree) if id(n) not in skipped]


def import_graph():
    """{module: set of the vela modules it imports when it runs}."""
    graph = {}
    for module, path in _modules().items():
        edges = set()
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(m for m in _resolve(module, path, node) if m != module)
        graph[module] = edges
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state = {}  # module -> "open" while on the path, "done" after

    def visit(module, path):
        state[module] = "open"
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    # (the check above can fail: a graph with a cycle is reported with its path)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_is_read_from_the_sources():
    graph = import_graph()
    assert "vela.stores" in graph["vela.cache"]
    assert "vela.stores.replicated" in graph["vela.bridge.node"]
    assert "vela.segments.table" in graph["vela.segments"]


def test_the_bridge_never_opens_the_public_cache():
    """The sidecar opens tables through vela.segments.open_table, not vela.Cache."""
    graph = import_graph()
    for module, edges in graph.items():
        if module.startswith("vela.bridge"):
            assert "vela.cache" not in edges and "vela" not in edges, module


def test_one_file_per_store_and_per_segment_backend():
    stores = {p.stem for p in (PACKAGE / "stores").glob("*.py")}
    assert {"base", "local", "replicated", "partitioned", "redis", "near"} <= stores
    segments = {p.stem for p in (PACKAGE / "segments").glob("*.py")}
    assert {"shm", "file", "table"} <= segments
    for old in ("partitioned.py", "redis_cache.py", "near.py", "backends", "bridge/client.py"):
        assert not (PACKAGE / old).exists(), old


def test_cache_is_one_class():
    """No subclass, no __new__ that picks one: the store is an attribute."""
    assert vela.Cache.__new__ is object.__new__
    assert vela.Cache.__subclasses__() == []


_PROTOCOL = [name for name, _ in inspect.getmembers(Store) if not name.startswith("_")]


@pytest.mark.parametrize("topology", ["local", "replicated"])
def test_a_store_on_the_host_table_has_every_method_of_the_interface(topology):
    name = new_name()
    cache = vela.Cache(name, capacity="2MiB", topology=topology)
    try:
        missing = [n for n in _PROTOCOL if not hasattr(cache._store, n)]
        assert missing == [], missing
    finally:
        cache.destroy()


@pytest.mark.parametrize("module, cls", [("partitioned", "PartitionedStore"), ("redis", "RedisStore")])
def test_a_remote_store_has_every_method_of_the_interface(module, cls):
    import importlib

    store = getattr(importlib.import_module(f"vela.stores.{module}"), cls)
    # (table is an attribute of an instance, set when it opens its host table)
    missing = [n for n in _PROTOCOL if n != "table" and not hasattr(store, n)]
    assert missing == [], missing
    assert store.remote is True


def test_the_near_cache_is_a_store_wrapping_the_redis_store():
    from redis_server import RedisServer
    from vela.stores.near import NearStore
    from vela.stores.redis import RedisStore

    with RedisServer() as server:
        cache = vela.Cache(new_name(), backend="redis", backend_opts={"url": server.url}, near_cache=True,
                           capacity="2MiB", sweep_interval=None)
        try:
            assert isinstance(cache._store, NearStore) and isinstance(cache._store.inner, RedisStore)
            missing = [n for n in _PROTOCOL if not hasattr(cache._store, n)]
            assert missing == [], missing
        finally:
            cache.destroy()
