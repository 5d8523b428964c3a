"""The frontier table's statistics (bench/frontier.py): paired drops against dense of the same seed, their t
interval, and cost ratios, computed from committed per-run records alone."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import tomli_w

from tests.conftest import MNLI_EVAL, MNLI_TRAIN, load_bench


@pytest.fixture(scope="module")
def frontier():
    return load_bench("frontier")


def _record(folder: Path, row: str, seed: int, accuracy: float, flops: int, up: int) -> None:
    record = {"row": row, "seed": seed, "overrides": {} if row == "dense" else {"heads.sparsity": 0.9},
              "full_eval": {"accuracy": accuracy}, "heads_pruned": 0.0 if row == "dense" else 0.83,
              "train_flops": flops, "bytes_up": up, "bytes_down": 100}
    (folder / f"{row}.seed{seed}.json").write_text(json.dumps(record))


def test_drops_are_paired_by_seed_with_a_t_interval(frontier, tmp_path):
    # dense varies a lot between seeds, the row follows it 3, 5 and 4 points below: the pairing removes the
    # seed-to-seed spread (an unpaired comparison would have sd ~10 points)
    for seed, (dense, row) in enumerate([(0.60, 0.57), (0.40, 0.35), (0.50, 0.46)]):
        _record(tmp_path, "dense", seed, dense, 1000, 900)
        _record(tmp_path, "sparse-0.9", seed, row, 800, 100)
    _record(tmp_path, "sparse-0.9", 7, 0.1, 1, 1)  # a seed dense lacks is not paired, so not counted
    rows = {r["row"]: r for r in frontier.frontier_rows(tmp_path, tmp_path / "no_costs.json")}
    row = rows["sparse-0.9"]
    assert row["seeds"] == [0, 1, 2]
    assert row["drop"] == pytest.approx(4.0)
    assert row["drop_sd"] == pytest.approx(1.0)
    half = 4.302653 * 1.0 / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert (row["drop_low"], row["drop_high"]) == (pytest.approx(4.0 - half, abs=1e-4),
                                                   pytest.approx(4.0 + half, abs=1e-4))
    assert row["flops_saved"] == pytest.approx(1.25)
    assert row["upload_saved"] == pytest.approx(9.0)
    assert row["memory_saved"] is None  # no controlled cost measurement given
    assert rows["dense"]["drop"] == 0.0
    table = frontier.table(tmp_path, tmp_path / "no_costs.json")
    assert "| sparse-0.9 |" in table and "+4.0 ± 1.0" in table


def test_time_and_memory_ratios_come_from_the_controlled_measurement(frontier, tmp_path):
    _record(tmp_path, "dense", 0, 0.6, 1000, 900)
    _record(tmp_path, "sparse-0.9", 0, 0.5, 1000, 100)
    costs = tmp_path.parent / f"{tmp_path.name}-costs.json"  # beside the records, not among them
    costs.write_text(json.dumps({"rows": {
        "dense": {"client_round_seconds_median": 20.0, "client_step_seconds_median": 2.0, "peak_memory_bytes": 300},
        "sparse-0.9": {"client_round_seconds_median": 25.0, "client_step_seconds_median": 1.6,
                       "peak_memory_bytes": 100}}}))
    row = next(r for r in frontier.frontier_rows(tmp_path, costs) if r["row"] == "sparse-0.9")
    assert row["round_time_saved"] == pytest.approx(0.8)  # slower: scoring the heads costs the client time
    assert row["step_time_saved"] == pytest.approx(1.25)
    assert row["memory_saved"] == pytest.approx(3.0)
    assert math.isnan(row["drop_sd"])  # one seed: no interval


def test_convergence_reports_dense_on_the_way_to_its_last_round(frontier, tmp_path):
    assert "no dense run" in frontier.convergence(tmp_path)
    for seed, (r45, r60) in enumerate([(0.60, 0.61), (0.50, 0.52)]):
        _record(tmp_path, "dense", seed, r60, 1000, 900)
        record = json.loads((tmp_path / f"dense.seed{seed}.json").read_text())
        record["full_eval_accuracy_by_round"] = {"30": 0.4, "45": r45, "60": r60}  # as JSON stores it
        (tmp_path / f"dense.seed{seed}.json").write_text(json.dumps(record))
    text = frontier.convergence(tmp_path)
    assert "seed 1 (last-round model): round 30 0.4000, round 45 0.5000, round 60 0.5200" in text
    assert "from round 45 to 60: +1.5 points" in text
    record = json.loads((tmp_path / "dense.seed1.json").read_text())
    record["full_eval_tail_average_by_round"] = {"45": 0.55, "60": 0.56}  # the steadier models, when measured
    (tmp_path / "dense.seed1.json").write_text(json.dumps(record))
    assert "seed 1 (mean of the last rounds): round 45 0.5500, round 60 0.5600" in frontier.convergence(tmp_path)


def test_the_tail_average_is_scored_only_when_every_paired_run_has_one(frontier, tmp_path):
    for seed in (0, 1):
        _record(tmp_path, "dense", seed, 0.60, 1000, 900)
        _record(tmp_path, "sparse-0.9", seed, 0.50, 1000, 100)
    for path in tmp_path.glob("*.json"):
        record = json.loads(path.read_text())
        tail = record["full_eval"]["accuracy"] + (0.02 if record["row"] == "dense" else 0.05)
        record["full_eval_tail_average"], record["tail_average_rounds"] = {"accuracy": tail}, 5
        path.write_text(json.dumps(record))
    row = next(r for r in frontier.frontier_rows(tmp_path, tmp_path / "none") if r["row"] == "sparse-0.9")
    assert row["model"] == "mean of last 5 rounds" and row["drop"] == pytest.approx(7.0)
    record = json.loads((tmp_path / "sparse-0.9.seed1.json").read_text())
    record["full_eval_tail_average"] = None  # one run without it: every pair falls back to the last round
    (tmp_path / "sparse-0.9.seed1.json").write_text(json.dumps(record))
    row = next(r for r in frontier.frontier_rows(tmp_path, tmp_path / "none") if r["row"] == "sparse-0.9")
    assert row["model"] == "last round" and row["drop"] == pytest.approx(10.0)


def test_learning_speed_is_averaged_over_the_clients_of_each_block_of_rounds(frontier):
    def client(before: float, after: float, train: float) -> dict:
        return {"loss_before": before, "loss_after": after, "train_loss": train}

    metrics = [{"round": 0, "accuracy": 0.3},  # the evaluation before training has no clients
               {"round": 1, "clients": [client(1.0, 0.6, 0.9), client(1.0, 0.8, 0.7)]},
               {"round": 2, "clients": [client(0.9, 0.6, 0.5)]},
               {"round": 3, "clients": [client(0.8, 0.8, 0.4)]},
               {"round": 4, "clients": [client(9.0, 0.0, 9.0)]}]  # beyond the run's rounds: ignored
    blocks = frontier.learning_by_rounds(metrics, rounds=3, width=2)
    assert [b["rounds"] for b in blocks] == ["1-2", "3-3"]
    assert blocks[0]["local_loss_gain"] == pytest.approx((0.4 + 0.2 + 0.3) / 3)
    assert blocks[0]["train_loss"] == pytest.approx((0.9 + 0.7 + 0.5) / 3)
    assert blocks[1]["local_loss_gain"] == pytest.approx(0.0) and blocks[1]["train_loss"] == pytest.approx(0.4)


def test_a_screen_table_shows_each_rows_own_tail_average_beside_the_paired_last_round(frontier, tmp_path):
    _record(tmp_path, "dense", 0, 0.60, 1000, 900)  # dense's screen recorded no tail average
    _record(tmp_path, "sparse-0.9", 0, 0.50, 1000, 100)
    record = json.loads((tmp_path / "sparse-0.9.seed0.json").read_text())
    record["full_eval_tail_average"] = {"accuracy": 0.55}
    (tmp_path / "sparse-0.9.seed0.json").write_text(json.dumps(record))
    row = next(r for r in frontier.frontier_rows(tmp_path, tmp_path / "none.json") if r["row"] == "sparse-0.9")
    assert (row["model"], row["drop"], row["tail_accuracy"]) == ("last round", pytest.approx(10.0), 0.55)
    lines = frontier.table(tmp_path, tmp_path / "none.json", tail_column=True).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == 16
    assert "| 0.5000 | 0.5500 | +10.0 |" in next(line for line in lines if "| sparse-0.9 |" in line)
    assert "| 0.6000 | - | +0.0 |" in next(line for line in lines if "| dense |" in line)


def test_measuring_costs_of_new_rows_keeps_the_old_rows_on_the_new_batchs_scale(frontier):
    def batch(rows: dict[str, float], memory: int = 100, client: int = 0) -> dict:
        return {"protocol": {"client": client, "repeats": 3},
                "rows": {r: {"client_round_seconds_median": t, "client_step_seconds_median": t / 10,
                             "peak_memory_bytes": memory} for r, t in rows.items()}}

    old = batch({"dense": 20.0, "remove-0.9": 10.0})
    merged = frontier.merge_costs(old, batch({"dense": 30.0, "sb-0.9": 25.0}))  # a slower machine this time
    assert set(merged["rows"]) == {"dense", "remove-0.9", "sb-0.9"}
    # remove-0.9 saved 2x in its batch and still does against the new batch's dense
    assert merged["rows"]["remove-0.9"]["client_round_seconds_median"] == pytest.approx(15.0)
    assert merged["rows"]["remove-0.9"]["client_step_seconds_median"] == pytest.approx(1.5)
    assert merged["rows"]["dense"]["client_round_seconds_median"] == 30.0
    assert merged["batches"] == 2
    replaced = frontier.merge_costs(old, batch({"dense": 30.0}, client=3))  # another client: not comparable
    assert set(replaced["rows"]) == {"dense"}



def test_one_cost_measurement_serves_the_frontier_and_the_budget(frontier, tiny_bert_dir, tmp_path, monkeypatch):
    # Prepare: the frontier's base config on the tiny BERT (a client round of 2 local steps at batch 8)
    base = tmp_path / "tiny_base.toml"
    base.write_text(tomli_w.dumps({
        "model": {"name": tiny_bert_dir, "max_length": 64},
        "data": {"train": str(MNLI_TRAIN), "eval": str(MNLI_EVAL), "train_size": 240, "eval_size": 64},
        "partition": {"method": "dirichlet", "alpha": 1.0, "num_clients": 6},
        "federated": {"clients_per_round": 3, "local_steps": 2, "batch_size": 8},
        "heads": {"samples": 8}}))
    monkeypatch.setattr(sys.modules["frontier_costs"], "BASE", base)
    budget = load_bench("budget")

    # Execute
    measured = frontier.measure_costs(["dense", "remove-0.9"], repeats=1, threads=1, long_tokens=128)
    kept = frontier.frontier_costs(measured)

    # Assert: `budget.py costs` and `frontier.py costs` measure with the same function
    assert budget.measure_costs is frontier.measure_costs
    assert measured["protocol"]["client"] == 0 and measured["protocol"]["round"] == 1
    dense, remove = measured["rows"]["dense"], measured["rows"]["remove-0.9"]
    assert list(measured["rows"]) == ["dense", "remove-0.9"] and dense["steps"] == remove["steps"] == 2
    assert remove["train_flops"] < dense["train_flops"] and remove["bytes_up"] < dense["bytes_up"]
    assert dense["peak_memory_bytes_128"] > dense["peak_memory_bytes"] > remove["peak_memory_bytes"]
    assert dense["client_round_seconds_median"] > 0 and dense["attention"] == "eager"
    # the frontier's file keeps its three columns, as before the budget shared the measurement
    assert kept["protocol"] == measured["protocol"]
    assert kept["rows"]["remove-0.9"] == {key: remove[key] for key in
                                          ("client_round_seconds_median", "client_step_seconds_median",
                                           "peak_memory_bytes")}

def test_the_readme_copy_keeps_only_the_protocol_rows(frontier, tmp_path):
    for row in ("dense", "sparse-0.9", "dense-freeze_a"):
        _record(tmp_path, row, 0, 0.5, 1000, 100)
    assert "dense-freeze_a" not in frontier.PROTOCOL_ROWS
    short = frontier.table(tmp_path, tmp_path / "no_costs.json", only=frontier.PROTOCOL_ROWS)
    full = frontier.table(tmp_path, tmp_path / "no_costs.json")
    assert "| sparse-0.9 |" in short and "| dense-freeze_a |" not in short
    assert "| dense-freeze_a |" in full
    assert set(frontier.PROTOCOL_ROWS) <= set(frontier.ROWS)


def test_the_warm_start_table_pairs_full_set_scores_from_dense_sources_only(frontier, tmp_path):
    warm_start = load_bench("warm_start")

    def record(name: str, row: str, seed: int, full: float | None) -> None:
        r = {"row": row, "seed": seed, "pairs": 2000, "start_accuracy": 0.6}
        if full is not None:
            r["full_eval_tail_average"] = {"accuracy": full}
        (tmp_path / name).write_text(json.dumps(r))

    for seed, (dense, row) in enumerate([(0.60, 0.59), (0.58, 0.55), (0.62, 0.60)]):
        record(f"dense.seed{seed}.json", "dense", seed, dense)
        record(f"pruned.seed{seed}.json", "pruned", seed, row)
    record("dense.seed3.json", "dense", 3, 0.6)
    record("pruned.from-other.seed3.json", "pruned", 3, 0.1)  # another source's run: not paired with dense's
    record("late.seed0.json", "late", 0, None)  # no full-set score yet: left out
    sources = tmp_path / "frontier"  # the source runs' own records: their scores are the start column
    sources.mkdir()
    for seed, start in enumerate([0.59, 0.57, 0.62, 0.6]):
        _record(sources, "dense", seed, 0.0, 1000, 900)
        source = json.loads((sources / f"dense.seed{seed}.json").read_text())
        source["full_eval_tail_average"] = {"accuracy": start}
        (sources / f"dense.seed{seed}.json").write_text(json.dumps(source))
    text = warm_start.table(tmp_path, sources)
    (line,) = [x for x in text.splitlines() if x.startswith("| `pruned`")]
    half = 4.302653 * 1.0 / math.sqrt(3)
    assert "| 0, 1, 2 | 0.5933 | 0.5800 |" in line and "2.0 (1.0, 3.0, 2.0) | 1.0 |" in line
    assert f"[{2 - half:+.1f}, {2 + half:+.1f}]" in line
    assert "late" not in text


def test_status_names_the_missing_runs_and_the_progress_of_unfinished_ones(frontier, tmp_path):
    results, runs = tmp_path / "records", tmp_path / "runs"
    results.mkdir()
    for seed in (0, 1, 2):
        _record(results, "dense", seed, 0.6, 1000, 900)
    _record(results, "sparse-0.9", 0, 0.55, 1000, 100)
    unfinished = runs / "seed1" / "sparse-0.9"  # 3 of 60 rounds done, 60 s + 2 s, 70 + 2, 64 + 2 a round
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text(json.dumps({"federated": {"rounds": 60}}))
    (unfinished / "metrics.jsonl").write_text("".join(
        json.dumps({"round": r, "seconds_clients": c, "seconds_aggregate": 2.0}) + "\n"
        for r, c in [(0, 0.0), (1, 60.0), (2, 70.0), (3, 64.0)]))
    recorded = runs / "seed0" / "dense"  # has its record: not listed
    recorded.mkdir(parents=True)
    (recorded / "config.json").write_text(json.dumps({"federated": {"rounds": 60}}))
    (recorded / "metrics.jsonl").write_text(json.dumps({"round": 60, "seconds_clients": 1.0}) + "\n")
    text = frontier.status(results, runs)
    assert "| dense | 0, 1, 2 | - |" in text and "| sparse-0.9 | 0 | 1, 2 |" in text
    assert "| remove-0.9 | - | 0, 1, 2 |" in text
    assert "sparse-0.9@1: round 3/60, 66 s a round, about 63 min of rounds left" in text
    assert "dense@0" not in text


def test_contrasts_pair_a_mechanism_with_its_baseline_by_seed(frontier, tmp_path):
    for seed, (rolling, top_k) in enumerate([(0.58, 0.55), (0.50, 0.49), (0.56, 0.56)]):
        for row, acc in (("sparse-rolling-0.9", rolling), ("sparse-0.9", top_k)):
            _record(tmp_path, row, seed, acc, 1000, 100)
            record = json.loads((tmp_path / f"{row}.seed{seed}.json").read_text())
            record["full_eval_tail_average"] = {"accuracy": acc}
            (tmp_path / f"{row}.seed{seed}.json").write_text(json.dumps(record))
    _record(tmp_path, "sparse-rolling-0.9", 3, 0.9, 1000, 100)  # no baseline seed 3: not paired
    text = frontier.contrasts(tmp_path)
    half = 4.302653 * math.sqrt(((3 - 4 / 3) ** 2 + (1 - 4 / 3) ** 2 + (4 / 3) ** 2) / 2) / math.sqrt(3)
    assert "paired by seed (0, 1, 2): +1.3 points (3.0, 1.0, 0.0;" in text
    assert f"95% [{4 / 3 - half:+.1f}, {4 / 3 + half:+.1f}]" in text


def test_a_finished_runs_checkpoint_is_read_for_its_record(frontier, tiny_bert_dir, tmp_path):
    """Rules out the record step reading the checkpoint in a layout it no longer has: a finished run with a tail
    average (and a trained A) reports it, one without says so. Broke once: dense-steps6 seed 1 finished 60 rounds
    and crashed in has_tail_average before its record."""
    # Prepare: two tiny runs, with and without a tail average
    from fedhead.runners.local import run_simulation
    from tests.conftest import tiny_config

    averaged = tiny_config(tiny_bert_dir, tmp_path, federated={"rounds": 2, "tail_average_rounds": 2})
    plain = tiny_config(tiny_bert_dir, tmp_path)
    # Execute
    run_simulation(averaged, tmp_path / "averaged")
    run_simulation(plain, tmp_path / "plain")
    # Assert
    assert frontier.has_tail_average(tmp_path / "averaged") and not frontier.has_tail_average(tmp_path / "plain")
    norm = frontier.lora_a_row_norm(tmp_path / "averaged")
    assert norm is not None and 0.1 < norm < 5.0
