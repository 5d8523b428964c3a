from fedhead.config import config_reference
from tests.conftest import ROOT, load_bench


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


def test_preset_memory_table_measures_the_presets_as_they_are():
    """docs/results/preset_memory.json was measured on each preset's current model, batch, length and head and
    LoRA options (a preset changed since fails here: re-run bench/preset_memory.py --presets P --json ...), and
    docs/usage.md shows those records."""
    import json

    from fedhead.config import load_config

    preset_memory = load_bench("preset_memory")
    records = json.loads((ROOT / "docs" / "results" / "preset_memory.json").read_text())
    assert [r["preset"] for r in records] == preset_memory.OFFLINE
    usage = (ROOT / "docs" / "usage.md").read_text()
    assert preset_memory.HEADER in usage
    for record in records:
        cfg = load_config(ROOT / "configs" / f"{record['preset']}.toml")
        measured = (record["model"], record["batch_size"], record["max_length"])  # mode, sparsity: in heads
        assert measured == (cfg.model.name, cfg.federated.batch_size, cfg.model.max_length), record["preset"]
        for section, options in (("heads", cfg.heads), ("lora", cfg.lora)):  # options added since: not judged
            now = options.model_dump(mode="json")
            changed = {k: (v, now[k]) for k, v in record[section].items() if k in now and now[k] != v}
            assert not changed, f"{record['preset']}: {section} options (measured, now) {changed}"
        assert preset_memory.table_row(record) in usage, record["preset"]
