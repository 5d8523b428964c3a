import pytest
from typer.testing import CliRunner

from fedhead.cli import app
from fedhead.config import Config, ConfigError, config_reference, load_config


def test_defaults_are_valid():
    cfg = Config()
    assert cfg.model.name == "minilm"
    assert cfg.heads.sparsity_of(3) == 0.0


def test_overrides_and_toml(tmp_path):
    # Prepare
    path = tmp_path / "exp.toml"
    path.write_text('[federated]\nrounds = 3\n[heads]\ntiers = [0.0, 0.9]\n')
    # Execute
    cfg = load_config(path, {"seed": 7, "federated.clients_per_round": 2})
    # Assert
    assert (cfg.federated.rounds, cfg.seed, cfg.run_name) == (3, 7, "exp")
    assert [cfg.heads.sparsity_of(c) for c in range(3)] == [0.0, 0.9, 0.0]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[federated]\nrounds = 0\n", "federated.rounds"),
        ("[lora]\nrnk = 4\n", "lora.rnk: unknown option"),
        ("[heads]\nsparsity = 1.0\n", "heads.sparsity"),
        ("[heads]\ntiers = [0.5, 1.5]\n", "tiers"),
        ("[partition]\nnum_clients = 2\n[federated]\nclients_per_round = 5\n", "exceeds"),
        ("[model]\npooling = 'max'\n", "model.pooling"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_config_names_the_field(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        load_config(path)


def test_cli_user_errors_are_one_clear_message(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["run", str(tmp_path / "none.toml")])
    assert missing.exit_code == 2
    assert "config file not found" in missing.output
    assert "Traceback" not in missing.output
    (tmp_path / "bad.toml").write_text("[federated]\nrounds = -2\n")
    bad = runner.invoke(app, ["run", str(tmp_path / "bad.toml")])
    assert bad.exit_code == 2 and "federated.rounds" in bad.output


def test_cli_label_field_absent(tmp_path):
    (tmp_path / "c.toml").write_text('[data]\nlabel_field = "gold"\n')
    result = CliRunner().invoke(app, ["run", str(tmp_path / "c.toml"), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "field 'gold' not found" in result.output


def test_config_reference_lists_every_option():
    table = config_reference()
    for dotted in ["heads.sparsity", "lora.freeze_a", "federated.selection", "partition.alpha", "seed"]:
        assert f"`{dotted}`" in table


def test_extends_merges_sections(tmp_path):
    (tmp_path / "base.toml").write_text('seed = 3\n[federated]\nrounds = 9\nbatch_size = 4\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[federated]\nrounds = 2\n')
    cfg = load_config(tmp_path / "child.toml")
    assert (cfg.seed, cfg.federated.rounds, cfg.federated.batch_size, cfg.run_name) == (3, 2, 4, "child")
    (tmp_path / "loop.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "loop.toml")


@pytest.mark.parametrize("preset", ["quickstart", "dense_fedavg", "random_pruning", "confidence_pruning",
                                    "fedhead_full", "paper_base", "newsgroups"])
def test_presets_are_valid(preset):
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / f"{preset}.toml", {"heads.sparsity": 0.7})
    assert cfg.heads.sparsity == 0.7 and cfg.run_name == preset


def test_reference_gives_each_option_its_values():
    from fedhead.config import config_reference

    rows = {line.split(" | ")[0].strip("| `"): line.split(" | ")[2] for line in config_reference().splitlines()[2:]}
    assert rows["heads.sparsity"] == "number in [0, 1)"
    assert rows["heads.coverage_pool"] == "number in (0, 1]"
    assert rows["heads.schedule"] == "'importance' / 'rolling' / 'coverage'"
    assert rows["federated.local_steps"] == "integer >= 1, or none"
    assert rows["federated.tail_average_rounds"] == "integer >= 0"
    assert rows["lora.freeze_a"] == "true / false"
    assert rows["heads.eval_pruned"] == "number in (0, 1), or none"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[privacy]\nenabled = true\n[federated]\naggregation = 'trimmed_mean'\n", "federated.aggregation"),
        ("[privacy]\nenabled = true\n[federated]\naggregation = 'head_weighted'\n", "federated.aggregation"),
        ("[heads]\nmin_heads_per_block = 1\n", "heads.min_heads_per_block"),
        ("[heads]\nmin_heads_per_block = 1\nscope = 'per_block'\n", "heads.min_heads_per_block"),
        ("[federated]\npower_of_choice_samples = 8\n", "federated.power_of_choice_samples"),
        ("[federated]\nselection = 'loss_gap'\npower_of_choice_d = 6\n", "federated.power_of_choice_d"),
    ],
)
def test_an_option_that_does_not_apply_is_refused_in_one_line(tmp_path, text, fragment):
    """Rules out an option silently ignored or overridden: DP's own aggregation replacing another one, a floor
    per block under the per-block scope (which keeps the same count in every block anyway), power-of-choice's
    sizes under another selection. The refusal is one line naming the option."""
    # Prepare
    path = tmp_path / "bad.toml"
    path.write_text(text)
    # Execute
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    # Assert
    reason = str(refused.value).removeprefix("invalid config:\n  ")
    assert "\n" not in reason and fragment in reason and "does not apply" in reason, reason


@pytest.mark.parametrize(
    "text",
    [
        "[privacy]\nenabled = true\n[federated]\naggregation = 'fedavg'\n",
        "[heads]\nmin_heads_per_block = 1\nscope = 'global'\nsparsity = 0.5\n",
        "[federated]\nselection = 'power_of_choice'\npower_of_choice_samples = 8\npower_of_choice_d = 6\n",
    ],
)
def test_the_option_that_applies_is_kept(tmp_path, text):
    path = tmp_path / "good.toml"
    path.write_text(text)
    load_config(path)
