"""The package's import graph: no cycle (function-level and TYPE_CHECKING imports
count too), every import going down the layer table of ``docs/design.md`` (read from
the document itself, so that the two cannot drift), and no product module importing a
tool of the checkout (``lab``, ``benchmarks``) or the tests."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

PACKAGE = Path(__file__).resolve().parent.parent / "policer"
DESIGN = PACKAGE.parent / "docs" / "design.md"
TOOLS = ("lab", "benchmarks", "tests", "conftest", "support")
#: what a layer's "knows nothing of" names -> the imports that would know it
KNOWS = {"Redis": ("redis", "hiredis"), "YAML": ("yaml",),
         "the key layout": ("policer.store.keys.Keys",)}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, wherever the import statement sits."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # submodules by name
    return out


def graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # importing a.b.c runs a/__init__ and a.b/__init__ first, except the
            # packages the importer sits in: those are being initialised already
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate not in modules or candidate == name:
                    continue
                if name.startswith(candidate + ".") and candidate != imported:
                    continue
                targets.add(candidate)
        edges[name] = targets
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state and (found := visit(m)) is not None:
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)) is not None:
            return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    edges = graph()
    assert len(edges) > 20
    cycle = _cycle(edges)
    assert cycle is None, " -> ".join(cycle or [])


def test_a_package_parent_counts_as_imported() -> None:
    """(the checker itself: ``from policer.store.base import x`` runs policer.store)"""
    assert "policer.store" in graph()["policer.engine"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_product_module_imports_a_tool() -> None:
    for path in PACKAGE.rglob("*.py"):
        bad = sorted(i for i in _imports(path) if i.split(".")[0] in TOOLS)
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"


def test_decision_and_metrics_know_nothing_of_the_engine() -> None:
    edges = graph()
    assert not {m for m in edges["policer.decision"] if m.startswith("policer")}
    assert "policer.engine" not in edges["policer.metrics"]


def test_tests_import_helpers_from_tests_support_never_from_a_conftest() -> None:
    """conftest.py files hold fixtures; what a test imports lives in tests/support."""
    tests = PACKAGE.parent / "tests"
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if "conftest" in n.split(".")]
            assert not bad, f"{path.relative_to(tests.parent)} imports {bad}"


class Layer(NamedTuple):
    name: str
    modules: tuple[str, ...]  # paths as the table names them: policer/x.py, policer/x/
    knows_nothing_of: str


def layers() -> list[Layer]:
    """The layer table of docs/design.md ("## Layers"), top layer first."""
    section = DESIGN.read_text().split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    header, body = rows[0], [r for r in rows[1:] if not set("".join(r)) <= {"-", " "}]
    out = []
    for cells in body:
        row = dict(zip(header, cells, strict=True))
        out.append(Layer(row["layer"], tuple(re.findall(r"`(policer/[^`]*)`", row["modules"])),
                         row["knows nothing of"]))
    return out


def _covers(path: str, module: str) -> bool:
    """The table's ``path`` names ``module`` (a package path names its whole tree)."""
    if path.endswith("/"):
        package = path.rstrip("/").replace("/", ".")
        return module == package or module.startswith(package + ".")
    name = path.removesuffix(".py").replace("/", ".")
    return module == (name.removesuffix(".__init__"))


def layer_of(table: list[Layer]) -> dict[str, int]:
    """Every module of the package -> the index of its layer (0: the top)."""
    out: dict[str, int] = {}
    for module in graph():
        found = [i for i, layer in enumerate(table) for p in layer.modules if _covers(p, module)]
        assert len(found) == 1, (f"{module} is in {len(found)} rows of the layer table of "
                                 "docs/design.md: give it exactly one")
        out[module] = found[0]
    return out


def test_the_layer_table_names_every_module_once_and_only_modules_that_exist() -> None:
    table = layers()
    assert [layer.name for layer in table][:2] == ["entry points", "engine"]
    layer_of(table)  # asserts: every module in exactly one row
    for layer in table:
        for path in layer.modules:
            assert (PACKAGE.parent / path).exists(), f"docs/design.md names {path}: not there"


def test_imports_go_down_the_layers_of_the_design() -> None:
    table = layers()
    where = layer_of(table)
    bad = [f"{a} ({table[where[a]].name}) imports {b} ({table[where[b]].name})"
           for a, targets in sorted(graph().items()) for b in sorted(targets)
           if where[b] < where[a]]
    assert not bad, "\n".join(bad)


def test_what_a_layer_knows_nothing_of_it_does_not_import() -> None:
    table = layers()
    where = layer_of(table)
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    checked = set()
    bad = []
    for module, i in sorted(where.items()):
        for word, names in KNOWS.items():
            if word not in table[i].knows_nothing_of:
                continue
            checked.add(word)
            for imported in _imports(modules[module]):
                if any(imported == n or imported.startswith(n + ".") for n in names):
                    bad.append(f"{module} ({table[i].name}) knows nothing of {word}, "
                               f"yet imports {imported}")
    assert checked == set(KNOWS)
    assert not bad, "\n".join(bad)


def test_the_layer_checker_itself() -> None:
    assert _covers("policer/store/", "policer.store.keys")
    assert _covers("policer/store/", "policer.store")
    assert not _covers("policer/store/", "policer.storage")
    assert _covers("policer/__init__.py", "policer")
    assert _covers("policer/cli.py", "policer.cli")
    assert not _covers("policer/cli.py", "policer.client")
def test_the_decision_service_reaches_the_store_through_its_public_api() -> None:
    """policer.serve's modules (issue 17): the store through its contract
    (``policer.store``, ``base``, ``keys``, the admit pipeline), never a store's
    implementation or a Redis client of their own."""
    edges = graph()
    serve = sorted(m for m in edges if m == "policer.serve" or m.startswith("policer.serve."))
    assert len(serve) >= 8
    inside = {"policer.store.redis_store", "policer.store.memory_store",
              "policer.store.connect"}
    for m in serve:
        assert not edges[m] & inside, f"{m} imports {sorted(edges[m] & inside)}"
        path = PACKAGE.parent.joinpath(*m.split(".")).with_suffix(".py")
        if not path.exists():
            path = path.with_suffix("") / "__init__.py"
        clients = sorted(i for i in _imports(path) if i.split(".")[0] in ("redis", "hiredis"))
        assert not clients, f"{m} imports {clients}"


def test_importing_the_decision_service_leaves_prometheus_client_alone() -> None:
    """``policer serve --workers N`` sets PROMETHEUS_MULTIPROC_DIR after importing
    policer.serve and before prometheus-client is first imported."""
    code = ("import sys, policer.serve; "
            "sys.exit('prometheus_client' in sys.modules or 'policer.engine' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent,
                          timeout=60).returncode == 0
