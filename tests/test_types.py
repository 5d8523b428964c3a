"""The type checker over src/ (issue 36 item 8): `mypy` with pyproject.toml's [tool.mypy] finds no error.

mypy runs in a subprocess with its cache in the checkout's `.mypy_cache` (git-ignored): a cold run takes about 70 s
on the project's 2-core machine, a warm one a few seconds. Skipped where mypy is not installed (it is in the test
extras, so CI runs it).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                                reason="mypy is not installed (pip install -e '.[test]' installs it)")


def mypy_errors(output: str) -> list[str]:
    """The `path:line: error: ...` lines of mypy's output (notes and the summary left out)."""
    return [line for line in output.splitlines() if ": error:" in line]


@pytest.mark.slow
def test_mypy_finds_no_error_in_src():
    # Execute
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(ROOT / ".mypy_cache"), "src"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    # Assert
    errors = mypy_errors(done.stdout)
    if done.returncode != 0 or errors:
        pytest.fail(f"mypy src: {len(errors)} error(s), exit {done.returncode}\n"
                    + "\n".join(errors or [done.stdout, done.stderr]), pytrace=False)
