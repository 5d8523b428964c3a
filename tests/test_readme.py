from fedhead.config import config_reference
from tests.conftest import ROOT


def test_config_reference_is_current():
    assert config_reference() in (ROOT / "docs" / "configuration.md").read_text()


def test_readme_fits_and_every_link_resolves():
    """The README stays short, and every relative link in the README and docs/ points at a file of the
    repository (no ../shared paths a user does not have)."""
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path = (page.parent / target).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{page.name}: broken link {target}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = "bash scripts/install.sh && .venv/bin/python -m pytest -q"
    assert command in readme
    assert command in (ROOT / ".ci/run").read_text()
