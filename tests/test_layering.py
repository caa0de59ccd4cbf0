"""Import boundaries of DESIGN §2 / STYLE §4.1, checked on the source (AST, not runtime).

Imports only point down::

    kiteq.proto -> kiteq.core -> {kiteq.store, kiteq.binding, kiteq.ops.metrics}
                -> kiteq.handler -> {kiteq.broker, kiteq.ops.http}

``kiteq.client`` may import only core, proto and binding; ``kiteq.admin`` (kiteq-admin) only
core and proto, and of third-party code only grpc and protobuf (``CLIENT_ONLY_THIRD_PARTY``). Generated ``*_pb2`` modules are
imported only by the edge modules in ``PB2_IMPORTERS``. Every import counts, including
those under ``if TYPE_CHECKING:`` and inside functions.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

# Edge modules allowed to import generated protobuf code (*_pb2, *_pb2_grpc).
PB2_IMPORTERS: Final = frozenset(
    {
        "kiteq.broker.server",  # registers the servicers with the gRPC server
        "kiteq.broker.service",
        "kiteq.broker.wire",
        "kiteq.broker.admin_service",
        "kiteq.admin.cli",
        "kiteq.admin.render",
        "kiteq.client._wire",
        "kiteq.client._channel",
    }
)

# What the client-only install (``pip install kiteq``) provides besides the standard library;
# the components in CLIENT_ONLY_COMPONENTS import no other third-party module.
CLIENT_ONLY_THIRD_PARTY: Final = frozenset({"grpc", "google"})
CLIENT_ONLY_COMPONENTS: Final = frozenset({"kiteq.admin", "kiteq.core"})

# component -> the components it may import (besides itself).
_BASE: Final = frozenset({"kiteq.proto", "kiteq.core"})
_MIDDLE: Final = frozenset({"kiteq.store", "kiteq.binding", "kiteq.ops.metrics", "kiteq.ops"})
ALLOWED: Final[dict[str, frozenset[str]]] = {
    "kiteq.proto": frozenset(),
    "kiteq.core": frozenset({"kiteq.proto"}),
    "kiteq.store": _BASE,
    "kiteq.binding": _BASE,
    "kiteq.ops": frozenset({"kiteq.core"}),  # the package's __init__ only
    "kiteq.ops.metrics": frozenset({"kiteq.core", "kiteq.ops"}),
    # the dashboard generator (a dev tool): nothing of the broker
    "kiteq.ops.dashboard": frozenset({"kiteq.ops"}),
    "kiteq.handler": _BASE | _MIDDLE,
    # the console's data seam and page; the broker implements it, ops.http serves it
    "kiteq.ops.console": frozenset({"kiteq.core", "kiteq.ops"}),
    # /healthz and /readyz answers from a broker's report
    "kiteq.ops.health": frozenset({"kiteq.ops"}),
    # one aiohttp application on a port: what the ops port and the HTTP publish API share
    "kiteq.ops.http_site": frozenset({"kiteq.ops"}),
    "kiteq.ops.http": frozenset(
        {
            "kiteq.core",
            "kiteq.ops",
            "kiteq.ops.metrics",
            "kiteq.ops.console",
            "kiteq.ops.health",
            "kiteq.ops.http_site",
        }
    ),
    "kiteq.broker": _BASE
    | _MIDDLE
    | {
        "kiteq.handler",
        "kiteq.ops.http",
        "kiteq.ops.http_site",
        "kiteq.ops.console",
        "kiteq.ops.health",
    },
    "kiteq.client": frozenset({"kiteq.core", "kiteq.proto", "kiteq.binding"}),
    # kiteq-admin: a gRPC client that runs from the client-only install
    "kiteq.admin": frozenset({"kiteq.core", "kiteq.proto"}),
    # load generator: drives clients, starts brokers as processes (never imports them)
    "kiteq.bench": frozenset({"kiteq.core", "kiteq.client"}),
    "kiteq.__main__": frozenset({"kiteq.broker"}),  # python -m kiteq
}
_PACKAGE_ONLY: Final = frozenset({"kiteq.ops"})  # components that are a bare __init__

REPO: Final = Path(__file__).resolve().parent.parent
# Source roots: each holds a kiteq/ namespace portion.
SOURCE_ROOTS: Final = (".", "binding", "store", "handler", "client", "ops", "proto")
# The only module allowed directly in a namespace directory: an entry point, never imported
# by users, so PEP 561 (py.typed) does not concern it.
NAMESPACE_MODULES: Final = frozenset({"kiteq/__main__.py"})


def component_of(module: str) -> str | None:
    """The layering component of *module* (longest matching prefix), or None."""
    best: str | None = None
    for name in ALLOWED:
        if (module == name or module.startswith(name + ".")) and (
            best is None or len(name) > len(best)
        ):
            best = name
    if best in _PACKAGE_ONLY and module != best:
        return None  # a module nobody has placed in the layering yet
    return best


def is_generated(module: str) -> bool:
    return any(part.endswith(("_pb2", "_pb2_grpc")) for part in module.split("."))


def imported_modules(source: str, module: str, *, is_package: bool = False) -> Iterator[str]:
    """Every absolute module name *source* (the text of *module*) imports.

    ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (``c`` may be a submodule).
    """
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source, filename=module)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: -(node.level - 1)]
                base = ".".join(base_parts)
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            yield target
            yield from (f"{target}.{alias.name}" for alias in node.names if alias.name != "*")


def violations(module: str, imports: Iterator[str] | list[str]) -> list[str]:
    """Layering problems of *module* importing *imports* (empty when it is clean)."""
    own = component_of(module)
    if own is None:
        return [f"{module}: not in the layering table of tests/test_layering.py"]
    problems: list[str] = []
    for target in imports:
        if not target.startswith("kiteq."):
            continue
        if is_generated(target) and module not in PB2_IMPORTERS and own != "kiteq.proto":
            problems.append(f"{module} imports generated {target} (only PB2_IMPORTERS may)")
            continue
        other = component_of(target)
        if other is None or other == own:
            continue
        if other not in ALLOWED[own]:
            problems.append(f"{module} ({own}) imports {target} ({other}): not allowed")
    return sorted(set(problems))


def source_files() -> Iterator[tuple[Path, str, bool]]:
    """(path, module name, is package) of every hand-written module under the source roots."""
    for root_name in SOURCE_ROOTS:
        root = REPO / root_name
        for path in sorted((root / "kiteq").rglob("*.py")):
            if is_generated(path.stem):
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            yield path, ".".join(parts), is_package


# --- the checker, on planted sources ----------------------------------------------------


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("kiteq.store.mysql", "from kiteq.handler import dispatch\n"),
        ("kiteq.store.mysql", "import kiteq.binding.model\n"),
        ("kiteq.store.mysql", "from ..handler import dispatch\n"),
        ("kiteq.binding.zk", "from kiteq.store.base import MessageStore\n"),
        ("kiteq.core.config", "from kiteq.ops.metrics import BrokerMetrics\n"),
        ("kiteq.core.message", "from kiteq.proto.v1 import common_pb2\n"),
        ("kiteq.handler.intake", "from kiteq.proto.v1.broker_pb2 import PublishRequest\n"),
        ("kiteq.handler.intake", "from kiteq.broker import server\n"),
        ("kiteq.handler.intake", "from kiteq.ops.http import OpsServer\n"),
        ("kiteq.ops.metrics", "from kiteq.store import base\n"),
        ("kiteq.ops.metrics", "from kiteq.ops.http import OpsServer\n"),
        ("kiteq.ops.http", "from kiteq.handler.dispatch import Dispatcher\n"),
        ("kiteq.ops.http", "from kiteq.broker.server import Broker\n"),
        ("kiteq.client._producer", "from kiteq.store.memory import MemoryStore\n"),
        ("kiteq.client._producer", "from kiteq.handler import intake\n"),
        ("kiteq.client._producer", "from kiteq.proto.v1 import broker_pb2\n"),
        ("kiteq.client._producer", "from kiteq.ops import metrics\n"),
        ("kiteq.broker.server", "from kiteq.client import Producer\n"),
        ("kiteq.broker.stats", "from kiteq.proto.v1 import broker_pb2_grpc\n"),
        ("kiteq.proto.v1", "from kiteq.core import message\n"),
        ("kiteq.store.rocksdb", "def f():\n    from kiteq.handler import recover\n"),
        ("kiteq.store.rocksdb", "if TYPE_CHECKING:\n    from kiteq.broker.server import X\n"),
    ],
)
def test_checker_flags_planted_violation(module: str, source: str) -> None:
    assert violations(module, list(imported_modules(source, module)))


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("kiteq.core.config", "from kiteq.core.errors import ConfigError\nimport tomllib\n"),
        ("kiteq.store.mysql", "from kiteq.core.message import Message\nfrom . import base\n"),
        ("kiteq.handler.intake", "from kiteq.store.base import MessageStore\n"),
        ("kiteq.handler.intake", "from kiteq.binding.model import Binding\n"),
        ("kiteq.handler.intake", "from kiteq.ops.metrics import BrokerMetrics\n"),
        ("kiteq.ops.http", "from kiteq.ops.metrics import BrokerMetrics\n"),
        ("kiteq.ops.metrics", "from kiteq.core.limits import is_name\n"),
        ("kiteq.broker.server", "from kiteq.ops.http import OpsServer\nimport kiteq.handler\n"),
        ("kiteq.broker.service", "from kiteq.proto.v1 import broker_pb2, broker_pb2_grpc\n"),
        ("kiteq.client._channel", "from kiteq.proto.v1 import broker_pb2\n"),
        ("kiteq.client._producer", "from kiteq.binding.model import Binding\nimport grpc\n"),
        ("kiteq.proto.v1", "from kiteq.proto.v1 import common_pb2\n"),
    ],
)
def test_checker_accepts_allowed_imports(module: str, source: str) -> None:
    assert violations(module, list(imported_modules(source, module))) == []


def test_checker_resolves_relative_imports() -> None:
    found = set(imported_modules("from ..core import errors\n", "kiteq.store.mysql"))
    assert found == {"kiteq.core", "kiteq.core.errors"}
    found = set(imported_modules("from . import base\n", "kiteq.store", is_package=True))
    assert found == {"kiteq.store", "kiteq.store.base"}


def test_checker_requires_every_module_to_be_placed() -> None:
    assert violations("kiteq.ops.admin", []) == [
        "kiteq.ops.admin: not in the layering table of tests/test_layering.py"
    ]
    assert violations("kiteq.newthing", []) != []


# --- the real tree ----------------------------------------------------------------------


def test_sources_are_found() -> None:
    modules = {module for _, module, _ in source_files()}
    assert {"kiteq.core.config", "kiteq.ops.metrics", "kiteq.ops.http"} <= modules
    assert not any(is_generated(module) for module in modules)


def test_imports_point_down() -> None:
    problems: list[str] = []
    for path, module, is_package in source_files():
        source = path.read_text(encoding="utf-8")
        try:
            imports = list(imported_modules(source, module, is_package=is_package))
        except SyntaxError as exc:
            problems.append(f"{module}: cannot parse ({exc.msg}, line {exc.lineno})")
            continue
        problems += violations(module, imports)
    assert not problems, "layering violations:\n" + "\n".join(problems)


def test_client_only_components_import_no_server_extra() -> None:
    # kiteq-admin and the core run without the server extra (rocksdict, sqlalchemy, ...)
    problems: list[str] = []
    for path, module, is_package in source_files():
        if component_of(module) not in CLIENT_ONLY_COMPONENTS:
            continue
        source = path.read_text(encoding="utf-8")
        for target in imported_modules(source, module, is_package=is_package):
            top = target.partition(".")[0]
            if top in sys.stdlib_module_names or top in CLIENT_ONLY_THIRD_PARTY or top == "kiteq":
                continue
            problems.append(f"{module} imports {target}: not in the client-only install")
    assert not problems, "\n".join(sorted(set(problems)))


def test_namespace_directories_hold_no_modules() -> None:
    # kiteq/ is a PEP 420 namespace assembled from the source roots: no __init__.py, no module.
    offenders = [
        str(path.relative_to(REPO))
        for root in SOURCE_ROOTS
        for path in (REPO / root / "kiteq").glob("*.py")
        if str(path.relative_to(REPO)) not in NAMESPACE_MODULES
    ]
    assert not offenders, f"modules in a namespace directory: {offenders}"


def test_every_package_has_init_and_py_typed() -> None:
    # PEP 561: the marker sits in each top-level package of the namespace; subpackages inherit.
    packages = [
        path
        for root in SOURCE_ROOTS
        for path in (REPO / root / "kiteq").iterdir()
        if path.is_dir() and not path.name.startswith("__")
    ]
    assert {p.name for p in packages} >= {"core", "broker", "binding", "store", "handler"}
    missing = [
        str((package / marker).relative_to(REPO))
        for package in packages
        for marker in ("__init__.py", "py.typed")
        if not (package / marker).is_file()
    ]
    assert not missing, f"missing package markers: {missing}"


# --- circles, private modules, foreign libraries -----------------------------------------

# third-party library -> the edge modules that may import it (a pattern of module names):
# every other module goes through them and sees only KiteQError subclasses
FOREIGN_EDGES: Final[dict[str, re.Pattern[str]]] = {
    "kazoo": re.compile(r"kiteq\.binding\.(zk|_zk)\w*|kiteq\.client\._zk\w*"),
    "sqlalchemy": re.compile(r"kiteq\.store\.(mysql|_mysql)\w*"),
    "pymysql": re.compile(r"kiteq\.store\.(mysql|_mysql)\w*|kiteq\.bench\._mysql"),
    "rocksdict": re.compile(r"kiteq\.store\.(rocksdb|_rocksdb)\w*"),
    # the HTTP servers: their shared site, the ops port and the HTTP publish API (the
    # request parsing of kiteq.broker.http_request and the answers of http_answers stay
    # library-free), and the webhook groups' client (DESIGN §9: one library)
    "aiohttp": re.compile(
        r"kiteq\.ops\.http(_site)?|kiteq\.broker\.http_publish|kiteq\.broker\.webhook_http"
    ),
}


def private_violations(module: str, imports: Iterator[str] | list[str]) -> list[str]:
    """Imports by *module* of a ``_private`` module or name of another kiteq package."""
    problems = []
    for target in imports:
        parts = target.split(".")
        if parts[0] != "kiteq" or len(parts) < 3:
            continue
        owner = ".".join(parts[:2])  # kiteq.<package>
        private = any(p.startswith("_") and not p.startswith("__") for p in parts[2:])
        if private and not module.startswith(owner + ".") and module != owner:
            problems.append(f"{module} imports {target}, private to {owner}")
    return sorted(set(problems))


def foreign_violations(module: str, imports: Iterator[str] | list[str]) -> list[str]:
    """Imports by *module* of a foreign library that only its edge modules may use."""
    problems = []
    for target in imports:
        top = target.partition(".")[0]
        edges = FOREIGN_EDGES.get(top)
        if edges is not None and not edges.fullmatch(module):
            problems.append(f"{module} imports {top}: only {edges.pattern} may")
    return sorted(set(problems))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of *graph* (module -> modules it imports): Tarjan's SCCs > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the source modules it imports (names that are not modules dropped)."""
    sources = list(source_files())
    modules = {module for _, module, _ in sources}
    graph: dict[str, set[str]] = {}
    for path, module, is_package in sources:
        source = path.read_text(encoding="utf-8")
        targets = set(imported_modules(source, module, is_package=is_package))
        # a submodule importing its own package's __init__ is how Python runs it: no edge
        graph[module] = {
            t for t in targets if t in modules and t != module and not module.startswith(t + ".")
        }
    return graph


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("kiteq.handler.takeover", "from kiteq.binding._zk_nodes import Nodes\n"),
        ("kiteq.broker.server", "import kiteq.store._mysql_rows\n"),
        ("kiteq.handler.takeover", "from kazoo.exceptions import KazooException\n"),
        ("kiteq.broker.server", "import sqlalchemy\n"),
        ("kiteq.handler.recover", "def f():\n    import rocksdict\n"),
        ("kiteq.broker.http_request", "from aiohttp import web\n"),
        ("kiteq.broker.service", "import aiohttp\n"),
        ("kiteq.handler.webhook", "import aiohttp\n"),
        ("kiteq.broker.server", "from aiohttp import web\n"),
    ],
)
def test_checker_flags_private_and_foreign_imports(module: str, source: str) -> None:
    imports = list(imported_modules(source, module))
    assert private_violations(module, imports) + foreign_violations(module, imports)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("kiteq.binding.zk", "from kiteq.binding._zk_nodes import Nodes\nimport kazoo\n"),
        ("kiteq.store.mysql", "from kiteq.store._mysql_rows import X\nimport sqlalchemy\n"),
        ("kiteq.store.rocksdb", "from rocksdict import Rdict\n"),
        ("kiteq.broker.http_publish", "from aiohttp import web\n"),
        ("kiteq.ops.http", "from aiohttp import web\n"),
    ],
)
def test_checker_accepts_own_private_and_edge_imports(module: str, source: str) -> None:
    imports = list(imported_modules(source, module))
    assert private_violations(module, imports) + foreign_violations(module, imports) == []


def test_circle_finder() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles() -> None:
    found = circles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_private_imports_across_packages_and_foreign_libraries_only_at_their_edges() -> None:
    problems: list[str] = []
    for path, module, is_package in source_files():
        source = path.read_text(encoding="utf-8")
        imports = list(imported_modules(source, module, is_package=is_package))
        problems += private_violations(module, imports) + foreign_violations(module, imports)
    assert not problems, "\n".join(problems)
