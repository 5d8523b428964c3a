"""The layer contract, checked on every test run (CI included): a module imports only from its own or lower layers.

Every module of `src/fedhead` has a layer (DESIGN.md, "The shape of the code"), lowest first:

    leaves (config, seeds, metrics) < data, models < heads < federated < run loop < runners
        < evaluate / export / report < cli < the package root (`fedhead/__init__.py`, which re-exports)

and the *transitive* import closure of each module stays in its own or lower layers, so, for instance, nothing the
algorithm core (data, models, heads, federated) imports, directly or through another module, reaches a driver.
Besides: nothing below the runners imports `flwr` (the algorithm is pure functions; drivers move bytes), and
no two modules import each other, directly or around a loop.

Every import counts, function-level and `TYPE_CHECKING` ones included (parsed with `ast`, nothing is executed).
Known violations the code still has are listed in KNOWN_VIOLATIONS with the reason and the work that removes
them; the test prints them, fails on any other, and fails on an entry that no longer occurs (so the list shrinks
with the code).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fedhead"

# Lowest first; a module belongs to the layer of the longest prefix that names it (a package names its modules).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("leaves", ("fedhead.config", "fedhead.seeds", "fedhead.metrics")),
    ("data, models", ("fedhead.data", "fedhead.models")),
    ("heads", ("fedhead.heads",)),
    ("federated", ("fedhead.federated",)),
    # the run loop: the engine-neutral round loop every driver shares (run context, drive_rounds, summary), the run
    # directory (its files and checkpoint format), its metrics file and the model a run trained
    ("run loop", ("fedhead.loop", "fedhead.run_dir", "fedhead.run_metrics", "fedhead.trained")),
    ("runners", ("fedhead.runners",)),
    ("evaluate, export, report", ("fedhead.evaluation", "fedhead.export", "fedhead.report", "fedhead.heads_report",
                                  "fedhead.tracking")),
    ("cli", ("fedhead.cli",)),
    ("package root", ("fedhead",)),
)
FLOWER_FREE_BELOW = "runners"  # no module in a layer below this one imports flwr

# (importer, imported): imports that break the layers today, each with the reason it is still there.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """Index in LAYERS of `module`'s layer: the longest prefix (a whole dotted part) that names it."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or (module.startswith(prefix + ".") and prefix != "fedhead")) and \
                    len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise KeyError(f"{module} has no layer: add it to LAYERS in tests/test_layers.py")
    return best


def raw_imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute imports; `from pkg import sub` counts `pkg.sub` when sub is a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
    return names


@cache
def fedhead_imports(module: str) -> frozenset[str]:
    """The fedhead modules `module` imports directly, the known violations left out."""
    return frozenset(n for n in raw_imports(MODULES[module])
                     if n in MODULES and n != module and (module, n) not in KNOWN_VIOLATIONS)


@cache
def closure(module: str) -> frozenset[str]:
    """Every fedhead module `module` imports, directly or through others (iterative depth-first search)."""
    seen: set[str] = set()
    stack = list(fedhead_imports(module))
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(fedhead_imports(current))
    return frozenset(seen)


def test_every_module_has_a_layer():
    unplaced = []
    for module in MODULES:
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"modules without a layer (add them to LAYERS): {unplaced}"


def test_known_violations_still_occur():
    """The allow-list is printed on every run and shrinks with the code: an entry the code no longer has fails."""
    print("\nKnown layer violations (tests/test_layers.py, KNOWN_VIOLATIONS):")
    for (importer, imported), reason in KNOWN_VIOLATIONS.items():
        print(f"  {importer} ({LAYERS[layer_of(importer)][0]}) imports {imported} "
              f"({LAYERS[layer_of(imported)][0]}): {reason}")
        assert imported in raw_imports(MODULES[importer]), \
            f"{importer} no longer imports {imported}: remove the entry from KNOWN_VIOLATIONS"
        assert layer_of(imported) > layer_of(importer), \
            f"{importer} -> {imported} is no violation: remove the entry from KNOWN_VIOLATIONS"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_stay_in_own_or_lower_layers(module):
    own = layer_of(module)  # raises, naming the module, when it has no layer
    above = sorted(f"{m} ({LAYERS[layer_of(m)][0]})" for m in closure(module) if layer_of(m) > own)
    assert not above, f"{module} ({LAYERS[own][0]}) imports, directly or through others, {above}"


def below(layer: str) -> list[str]:
    """The modules in layers below `layer` (those without a layer fail test_every_module_has_a_layer)."""
    bound = [name for name, _ in LAYERS].index(layer)
    placed = []
    for module in MODULES:
        try:
            placed.append((layer_of(module), module))
        except KeyError:
            continue
    return sorted(m for layer, m in placed if layer < bound)


@pytest.mark.parametrize("module", below(FLOWER_FREE_BELOW))
def test_below_the_runners_nothing_imports_flower(module):
    reached = {module, *closure(module)}
    flower = sorted(m for m in reached if any(n.split(".")[0] == "flwr" for n in raw_imports(MODULES[m])))
    assert not flower, f"{module} reaches flwr through {flower}"


def test_no_import_cycle():
    cycles = sorted(m for m in MODULES if m in closure(m))
    assert not cycles, f"import cycle through {cycles}"
