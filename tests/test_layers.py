"""The layer contract, checked on every test run (CI included): the core never reaches up into the drivers.

- the core (`fedhead.federated`, `fedhead.heads`, `fedhead.models`, `fedhead.data`) never imports
  `fedhead.runners`, `fedhead.cli` or `flwr` (the algorithm is pure functions; drivers move bytes);
- `fedhead.heads` and `fedhead.models` never import `fedhead.federated` (heads and models know nothing of
  rounds);
- no import cycle between the modules of `fedhead.data`.

Every import counts, function-level ones included (parsed with `ast`, nothing is executed).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedhead"
CORE = ("federated", "heads", "models", "data")


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py"))


@pytest.mark.parametrize("package", CORE)
def test_core_never_imports_drivers_or_flower(package):
    for path in modules(package):
        bad = {n for n in imports_of(path) if n.split(".")[0] == "flwr" or n.startswith(("fedhead.runners",
                                                                                          "fedhead.cli"))}
        assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"


@pytest.mark.parametrize("package", ["heads", "models"])
def test_heads_and_models_never_import_federated(package):
    for path in modules(package):
        bad = {n for n in imports_of(path) if n.startswith("fedhead.federated")}
        assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"


def test_no_import_cycle_in_data():
    graph = {p.stem: {n.rsplit(".", 1)[-1] for n in imports_of(p) if n.startswith("fedhead.data.")}
             for p in modules("data")}

    def reaches(start: str, target: str, seen: frozenset = frozenset()) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph.get(start, ()))

    cycles = [m for m in graph if reaches(m, m)]
    assert not cycles, f"import cycle through {cycles}"
