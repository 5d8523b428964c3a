"""Running the frontier (bench/frontier.py run / screen): each row and seed trained (or resumed, or extended to
more rounds) in bench/results/frontier/seed<S>/<row>/, its final models scored on every evaluation pair, and its
record written; `status` says what the protocol still needs and how far the unfinished runs are."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import load_finished_run
from frontier_protocol import BASE, CONVERGENCE_ROUNDS, PROTOCOL, PROTOCOL_ROWS, RESULTS, ROWS, RUNS
from frontier_records import load_records, make_record, record_path

from fedhead.config import load_config
from fedhead.federated.evaluation import evaluate
from fedhead.run_dir import RunDir
from fedhead.runners.local import run_simulation


def full_eval(run_dir: Path, tail_average: bool = False) -> dict[str, float]:
    """The run's final global model (its last checkpoint; with `tail_average`, the mean of its last rounds'
    global models) scored on every pair of the evaluation file."""
    run, pairs = load_finished_run(run_dir, None, tail_average)
    start = time.perf_counter()
    result = evaluate(run.lm.model, pairs, run.lm.tokenizer, run.cfg.federated.eval_batch_size)
    return {**result, "pairs": len(pairs), "round": run.round, "seconds": time.perf_counter() - start}


def has_tail_average(run_dir: Path) -> bool:
    """Whether the run's last checkpoint holds a complete tail average."""
    checkpoint = RunDir(run_dir).load_checkpoint()
    return checkpoint is not None and checkpoint.tail_averaged_state() is not None


def run_one(row: str, seed: int, protocol: dict[str, Any], out: Path) -> Path:
    """Run (or resume, or extend to more rounds) one row with one seed in `out/row`; returns its folder.

    A run finished with fewer rounds is extended: its metrics then equal those of a run started with the
    larger number (tests/test_runner.py::test_extending_a_finished_run_equals_the_longer_run), so a row screened
    at 30 rounds becomes its 60-round run without repeating the first 30.
    """
    run_dir = out / row
    rounds = protocol["federated.rounds"]
    if (run_dir / "summary.json").exists() and RunDir(run_dir).read_json("summary.json")["rounds"] == rounds:
        return run_dir
    cfg = load_config(BASE, {**ROWS[row], **protocol, "seed": seed, "run_name": row, "out": str(out)})
    for stop in CONVERGENCE_ROUNDS.get(row, ()):  # the convergence check: dense on the full set before the end
        done = max((m.get("round", 0) for m in RunDir(run_dir).metrics()), default=0)
        if stop >= rounds or done > stop or (run_dir / f"full_eval.r{stop}.json").exists():
            continue
        if done < stop:  # a run of `stop` rounds (its own tail average), extended afterwards like any finished run
            short = load_config(BASE, {**ROWS[row], **protocol, "federated.rounds": stop, "seed": seed,
                                       "run_name": row, "out": str(out)})
            run_simulation(short, run_dir, resume=(run_dir / "checkpoint.safetensors").exists())
        RunDir(run_dir).write_json(f"full_eval.r{stop}.json", full_eval(run_dir))
        if has_tail_average(run_dir):
            RunDir(run_dir).write_json(f"full_eval.r{stop}.tail_average.json", full_eval(run_dir, tail_average=True))
    start = time.perf_counter()
    summary = run_simulation(cfg, run_dir, resume=(run_dir / "checkpoint.safetensors").exists())
    (run_dir / "row.json").write_text(json.dumps(ROWS[row]))
    print(f"{row} seed {seed}: {rounds} rounds, last 1,000-pair accuracy {summary['final_score']:.3f} in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return run_dir


def run(rows: list[str], seeds: list[int], threads: int, rounds: int | None, runs: Path, results: Path,
        eval_every: int | None = None) -> None:
    protocol = {**PROTOCOL, "threads": threads}
    if rounds is not None:
        protocol["federated.rounds"] = rounds
    if eval_every is not None:
        protocol["federated.eval_every"] = eval_every
    results.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for row in rows:
            if record_path(row, seed, results).exists():
                continue
            run_dir = run_one(row, seed, protocol, runs / f"seed{seed}")
            name = f"full_eval.r{protocol['federated.rounds']}.json"
            if not (run_dir / name).exists():
                result = full_eval(run_dir)
                RunDir(run_dir).write_json(name, result)
                print(f"{row} seed {seed}: full-set accuracy {result['accuracy']:.4f} on {result['pairs']} pairs",
                      flush=True)
            tail = f"full_eval.r{protocol['federated.rounds']}.tail_average.json"
            if not (run_dir / tail).exists() and has_tail_average(run_dir):
                result = full_eval(run_dir, tail_average=True)
                RunDir(run_dir).write_json(tail, result)
                print(f"{row} seed {seed}: tail average, full-set accuracy {result['accuracy']:.4f}", flush=True)
            record = make_record(row, ROWS[row], run_dir, name)
            record_path(row, seed, results).write_text(json.dumps(record, indent=1) + "\n")


def status(results: Path = RESULTS, runs: Path = RUNS, seeds: tuple[int, ...] = (0, 1, 2),
           rows: Sequence[str] = PROTOCOL_ROWS) -> str:
    """What the protocol still needs: each of `rows`' recorded seeds and missing ones, and every run folder
    without a record with its progress (rounds done of its total, the median seconds a round took over its last
    5 rounds, from metrics.jsonl, and the rounds' time left at that pace, full-set scoring not included)."""
    records = load_records(results)
    lines = ["| protocol row | seeds recorded | missing |", "|---|---|---|"]
    for row in rows:
        done = sorted(records.get(row, {}))
        missing = [s for s in seeds if s not in done]
        lines.append(f"| {row} | {', '.join(map(str, done)) or '-'} | {', '.join(map(str, missing)) or '-'} |")
    progress = []
    for metrics_file in sorted(runs.glob("seed*/*/metrics.jsonl")):
        run_dir = metrics_file.parent
        row, seed = run_dir.name, int(run_dir.parent.name.removeprefix("seed"))
        if row in records and seed in records[row]:
            continue
        rounds = [m for m in RunDir(run_dir).metrics() if m.get("round", 0) > 0]
        total = json.loads((run_dir / "config.json").read_text())["federated"]["rounds"]
        done = rounds[-1]["round"] if rounds else 0
        pace = float(np.median([sum(v for k, v in m.items() if k.startswith("seconds_")) for m in rounds[-5:]])
                     ) if rounds else float("nan")
        progress.append(f"{row}@{seed}: round {done}/{total}, " + (
            f"{pace:.0f} s a round, about {(total - done) * pace / 60:.0f} min of rounds left" if done < total
            else "rounds done, no record yet (full-set scoring, or a record kept elsewhere: screens)"))
    return "\n".join(lines + ["", *(progress or ["no run in progress"])])
