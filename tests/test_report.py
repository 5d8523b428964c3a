"""`fedhead report` on real (tiny) runs: table values follow from the metrics, plots are written."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedhead.cli import app
from fedhead.report import Run, curve_bands
from fedhead.run_metrics import TAIL
from fedhead.runners.local import run_simulation
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def two_runs(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    dense = tiny_config(tiny_bert_dir, out, run_name="dense")
    pruned = tiny_config(tiny_bert_dir, out, run_name="pruned", heads={"sparsity": 0.5})
    run_simulation(dense, out / "dense")
    run_simulation(pruned, out / "pruned")
    run_simulation(pruned.model_copy(update={"seed": 1, "run_name": "pruned-seed1"}), out / "pruned-seed1")
    return out


def test_report_table_and_plots(two_runs, tmp_path):
    result = CliRunner().invoke(app, ["report", str(two_runs / "dense"), str(two_runs / "pruned"),
                                      "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["baseline"] == "dense"
    dense_row, pruned_row = summary["rows"]
    dense_metrics = [json.loads(x) for x in (two_runs / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert dense_row["bytes_up"] == sum(m.get("bytes_up", 0) for m in dense_metrics)
    assert dense_row["upload_advantage"] == 1.0 and dense_row["drop_points"] == 0.0
    assert pruned_row["upload_advantage"] > 1.0 and pruned_row["flops_reduction"] > 1.0
    # heads actually pruned, from the clients' kept heads (tiny BERT: 4 heads a block, half kept)
    assert dense_row["heads_pruned"] == 0.0 and pruned_row["heads_pruned"] == pytest.approx(0.5)
    assert dense_row["to_target"] is not None  # the baseline reaches its own final minus 2 points
    for name in ["accuracy_vs_round.png", "accuracy_vs_bytes_up.png", "accuracy_vs_train_flops.png",
                 "heads_pruned.png", "table.md"]:
        assert (tmp_path / "rep" / name).is_file(), name
    assert not (tmp_path / "rep" / "heads_dense.png").exists()
    assert "not reached" in result.output or "| dense |" in result.output


def test_report_rejects_a_non_run(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "not a run directory" in result.output


def test_runs_that_differ_by_seed_share_one_band(two_runs):
    """Rules out a band drawn per run (three lines for two configurations) or a band whose mean or edges are
    not those of the seeds' curves."""
    runs = [Run.load(two_runs / name) for name in ("dense", "pruned", "pruned-seed1")]
    dense, pruned = curve_bands(runs, "round")
    assert (dense.label, dense.runs, pruned.label, pruned.runs) == ("dense", 1, "pruned", 2)
    (_, a), (_, b) = runs[1].curve("round"), runs[2].curve("round")
    assert not np.array_equal(a, b)  # the seed changed the curve
    assert np.allclose(pruned.mean, (a + b) / 2) and np.array_equal(pruned.low, np.minimum(a, b))
    assert np.array_equal(pruned.high, np.maximum(a, b)) and np.array_equal(dense.mean, runs[0].curve("round")[1])


def test_default_target_is_the_baselines_tail_mean_minus_2_points_and_short_means_are_marked(two_runs, tmp_path):
    """Rules out `--help` promising "baseline final - 2 points" while the code takes the tail mean, and a
    "mean of last 5 evals" over fewer evaluations that says nothing (the tiny runs have 2)."""
    # Prepare
    dense = [json.loads(x) for x in (two_runs / "dense" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [m["accuracy"] for m in dense if m["round"] > 0 and "accuracy" in m]
    assert 0 < len(evaluated) < TAIL
    # Execute
    result = CliRunner().invoke(app, ["report", str(two_runs / "dense"), str(two_runs / "pruned"),
                                      "--out", str(tmp_path / "rep")])
    helped = CliRunner().invoke(app, ["report", "--help"], env={"COLUMNS": "200"})
    # Assert
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["target"] == pytest.approx(np.mean(evaluated) - 0.02)
    assert [r["tail_evaluations"] for r in summary["rows"]] == [len(evaluated)] * 2
    n = len(evaluated)
    assert f"Mean of last {TAIL} evals: over fewer where a run has fewer (dense {n}, pruned {n})." in result.output
    help_text = " ".join(helped.output.replace("│", " ").split())
    assert f"mean of its last {TAIL} evaluations, or of all when it has fewer, minus 2 points" in help_text
    assert "final - 2" not in help_text
