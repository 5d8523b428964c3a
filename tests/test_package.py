"""The package root: `fedhead.__version__`, the public names of `fedhead.__all__`, and a light `import fedhead`."""

from __future__ import annotations

import importlib
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import fedhead

SRC = Path(__file__).resolve().parents[1] / "src"


def _python(code: str) -> str:
    """stdout of `code` in a fresh interpreter that imports this checkout's fedhead."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                          env={"PYTHONPATH": str(SRC), "PATH": ""})
    return done.stdout.strip()


def test_version_is_the_installed_distributions():
    # Execute
    printed = _python("import fedhead; print(fedhead.__version__)")
    # Assert
    assert printed == version("fedhead") == fedhead.__version__


def test_every_public_name_is_its_home_modules_object():
    """Rules out a name in __all__ that does not resolve, or resolves to something else than the object its home
    module defines (a stale alias)."""
    assert sorted(fedhead.__all__) == sorted(["__version__", *fedhead._HOMES])
    for name in fedhead.__all__:
        value = getattr(fedhead, name)
        if name == "__version__":
            continue
        home = importlib.import_module(fedhead._HOMES[name])
        assert value is getattr(home, name), name
        assert name in dir(fedhead)


def test_import_fedhead_loads_no_framework():
    """`import fedhead` (and a config-only name) must not pull in torch, transformers or Flower: a CLI `--help`,
    a config check and every Flower process would pay for it."""
    # Execute
    loaded = _python("import sys, fedhead; fedhead.load_config(None); "
                     "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'flwr'}))")
    # Assert
    assert loaded == "[]"
