"""The package's modules import each other one way: no import cycles anywhere in
`vllm_fleet`, and the relay's modules in the order DESIGN.md gives (wire/request ->
control -> console -> upstream -> exchange -> client -> server; `state`, `admission` and
`linger` import no relay module).

Read from the source with `ast` (every import statement, those under `if TYPE_CHECKING:`
and inside functions too: a cycle hidden from the interpreter is still a cycle in the
design). A package's own `__init__` re-exporting its modules is not counted as an import
of the package by its modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import vllm_fleet

PACKAGE = Path(vllm_fleet.__file__).parent
RELAY = "vllm_fleet.gateway.relay"
# Each relay module may import only the relay modules before it.
RELAY_ORDER = (
    "state", "admission", "linger", "wire", "request", "control", "console", "upstream",
    "exchange", "client", "server",
)  # fmt: skip
# What the connections share, the pacing, and the lingering close.
RELAY_LEAVES = ("state", "admission", "linger")


def module_files() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (`from a import b` counts as the
    module a.b when there is one, else as a)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names if alias.name in files)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}: relative import"
                base = node.module or ""
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in files:
                        imported.add(full)
                    elif base in files:
                        imported.add(base)
        imported.discard(name)
        graph[name] = imported
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, as the path of one walk around it."""
    found: list[list[str]] = []
    done: set[str] = set()

    def walk(name: str, path: list[str]) -> None:
        if name in path:
            found.append([*path[path.index(name) :], name])
            return
        if name in done:
            return
        for imported in sorted(graph[name]):
            walk(imported, [*path, name])
        done.add(name)

    for name in sorted(graph):
        walk(name, [])
    return found


def test_the_graph_sees_the_imports_it_should() -> None:
    graph = import_graph()
    assert f"{RELAY}.exchange" in graph[f"{RELAY}.client"]
    assert "vllm_fleet.config.models" in graph["vllm_fleet.config.checks"]
    assert "vllm_fleet.config" in graph["vllm_fleet.plan"]  # the package, by its re-exports
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_module_of_the_package_is_in_an_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_relay_modules_import_only_those_before_them() -> None:
    graph = import_graph()
    relay = {f"{RELAY}.{name}" for name in RELAY_ORDER}
    assert {name for name in graph if name.startswith(f"{RELAY}.")} == relay, "new module?"
    for index, name in enumerate(RELAY_ORDER):
        allowed = {f"{RELAY}.{before}" for before in RELAY_ORDER[:index]}
        if name in RELAY_LEAVES:
            allowed = set()
        imported = graph[f"{RELAY}.{name}"] & relay
        assert imported <= allowed, f"relay/{name}.py imports {sorted(imported - allowed)}"
