"""The house's floor plan, enforced: every module imports only from its own floor, the floors below it,
and the shared ground floor; no two modules import each other in a circle.

Floors, in the order the data flows:
data → models → training → inference → monitoring → recheck → export, registry → serving, batch →
audit, tuning, pipeline → demo → cli → __main__. Shared by all: errors, cpu, imaging, card, utils, reporting,
cliargs.
Rooms on one floor do not import each other's floor-mates across rooms (serving and batch stand side
by side, as do audit, tuning and pipeline), except within the same room.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "binsight"
GROUND = {"errors", "cpu", "imaging", "card", "utils", "reporting", "cliargs", "__init__"}
FLOORS: list[set[str]] = [
    {"data"},
    {"models"},
    {"training"},
    {"inference"},
    {"monitoring"},
    {"recheck"},
    {"export", "registry"},
    {"serving", "batch"},
    {"audit", "tuning", "pipeline"},
    {"demo"},
    {"cli"},
    {"__main__"},
]


def room_of(module: str) -> str:
    """`binsight.serving.app` -> `serving`; `binsight.demo` -> `demo`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def floor_of(room: str) -> int:
    if room in GROUND:
        return -1
    for number, rooms in enumerate(FLOORS):
        if room in rooms:
            return number
    raise AssertionError(f"room {room!r} is on no floor: add it to FLOORS")


def imports_of(path: Path, module: str) -> set[str]:
    """The binsight modules a file imports (absolute and relative), at any depth, TYPE_CHECKING too."""
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("binsight")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("binsight"):
                found.add(target)
                # `from package import module` imports the module too.
                found |= {f"{target}.{alias.name}" for alias in node.names}
    return found


def module_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules it imports (a name imported from a module counts as that module)."""
    raw = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        raw[module] = imports_of(path, module)

    def as_module(target: str) -> str:
        while target not in raw and "." in target:
            target = target.rsplit(".", 1)[0]
        return target

    return {module: {as_module(t) for t in targets} - {module} for module, targets in raw.items()}


def back_edges(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in graph.items():
        room = room_of(module)
        for target in targets:
            other = room_of(target)
            if other == room or floor_of(other) == -1:
                continue
            if floor_of(other) > floor_of(room):
                problems.append(f"{module} imports {target}: floor {floor_of(other)} above {floor_of(room)}")
            elif floor_of(other) == floor_of(room) and floor_of(room) >= 0:
                problems.append(f"{module} imports {target}: {other} and {room} share a floor")
    ground_up = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        if floor_of(room_of(m)) == -1
        for t in targets
        if floor_of(room_of(t)) != -1
    ]
    return problems + [f"ground floor reaches up: {p}" for p in ground_up]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Module-level import circles (Tarjan's strongly connected components of two or more)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_from_a_higher_floor_or_a_neighbour() -> None:
    assert back_edges(module_graph()) == []


def test_no_import_circles() -> None:
    assert cycles(module_graph()) == []


def test_the_check_catches_a_planted_back_edge(tmp_path: Path) -> None:
    package = tmp_path / "binsight"
    for room in ("data", "serving", "utils"):
        (package / room).mkdir(parents=True)
        (package / room / "__init__.py").write_text("")
    (package / "data" / "index.py").write_text("from binsight.serving.app import create_app\n")
    (package / "serving" / "app.py").write_text("from ..data import index\n")
    (package / "utils" / "io.py").write_text("import binsight.data.index\n")
    graph = module_graph(package)
    problems = back_edges(graph)
    assert any("binsight.data.index imports binsight.serving.app" in p for p in problems)
    assert any("ground floor reaches up" in p for p in problems)
    assert cycles(graph) == [["binsight.data.index", "binsight.serving.app"]]


def test_every_benchmark_imports_against_the_current_package() -> None:
    """Benchmarks are outside mypy's files and run only by hand: a renamed import breaks them silently
    (bench_serve once imported a type that had moved), so each one is at least imported here."""
    benchmarks = PACKAGE.parents[1] / "benchmarks"
    names = sorted(p.stem for p in benchmarks.glob("*.py"))
    assert len(names) >= 10
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run(
        [sys.executable, "-c", script, *names],
        cwd=benchmarks,
        env={**os.environ, "PYTHONPATH": str(benchmarks)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
