from fedhead.config import config_reference
from tests.conftest import ROOT


def test_readme_config_reference_is_current():
    assert config_reference() in (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = "bash scripts/install.sh && .venv/bin/python -m pytest -q"
    assert command in readme
    assert command in (ROOT / ".ci/run").read_text()
