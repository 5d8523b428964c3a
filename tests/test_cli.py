"""The CLI on the tiny BERT: `fedhead heads` and `fedhead run` with overrides and resume."""

import json

from typer.testing import CliRunner

from fedhead.cli import app
from tests.conftest import write_tiny_toml


def _write_config(tmp_path, model_dir):
    return write_tiny_toml(tmp_path / "tiny.toml", model_dir)


def test_heads_command_writes_heat_map_and_scores(tmp_path, tiny_bert_dir):
    config = _write_config(tmp_path, tiny_bert_dir)
    result = CliRunner().invoke(app, ["heads", str(config), "--out", str(tmp_path / "h.png"), "--samples", "16"])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "h.json").read_text())
    assert len(scores["scores"]) == 2 and len(scores["scores"][0]) == 4 and scores["samples"] == 16
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_run_with_overrides_then_resume(tmp_path, tiny_bert_dir):
    config = _write_config(tmp_path, tiny_bert_dir)
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path), "--name", "r", "--sparsity", "0.5",
                                 "--set", "federated.selection=loss_gap", "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["round"] == 2 and metrics[-1]["selection_reason"] == "loss gap + exploration"
    assert all(len(c["kept_heads"]) == 4 for c in metrics[-1]["clients"])
    again = runner.invoke(app, ["run", "--resume", str(tmp_path / "r"), "--quiet"])
    assert again.exit_code == 0, again.output  # nothing left to do: it finishes at once
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 3
    longer = runner.invoke(app, ["run", "--resume", str(tmp_path / "r"), "--rounds", "3", "--quiet"])
    assert longer.exit_code == 0, longer.output  # extends the finished run by one round
    assert json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])["round"] == 3
    assert json.loads((tmp_path / "r" / "config.json").read_text())["federated"]["rounds"] == 3
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["rounds"] == 3
    mixed = runner.invoke(app, ["run", "--resume", str(tmp_path / "r"), "--seed", "1", "--quiet"])
    assert mixed.exit_code != 0 and "only --rounds" in mixed.output


def test_run_without_a_terminal_logs_one_line_a_round(tmp_path, tiny_bert_dir):
    import subprocess
    import sys

    config = _write_config(tmp_path, tiny_bert_dir)
    # no --quiet: with its output going to a pipe (no terminal) the run still writes one line a round
    done = subprocess.run([sys.executable, "-m", "fedhead.cli", "run", str(config), "--out", str(tmp_path)],
                          capture_output=True, text=True, check=True)
    rounds = [line for line in done.stderr.splitlines() if " round " in f" {line.split(' ', 2)[-1]}"]
    assert any("round 1/2" in r and "min left" in r and "up " in r for r in rounds), done.stderr
    assert any("round 2/2" in r and "accuracy" in r for r in rounds), done.stderr
