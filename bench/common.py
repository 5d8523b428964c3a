"""Shared by the benchmarks: run named variants of a base config, skipping finished ones, resuming the rest."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import datasets

from fedhead.config import load_config
from fedhead.data.tasks import load_task_data
from fedhead.runners.local import run_simulation
from fedhead.trained import TrainedRun, load_trained

ROOT = Path(__file__).resolve().parents[1]


def extend_run(source: Path, target: Path) -> None:
    """Start `target` as a copy of the finished run `source` (checkpoint, metrics, partition and config), so
    that resuming it with more rounds runs only the extra ones. The resumed run refuses a config that differs
    in more than the rounds, and ends with the same metrics as a run started with those rounds
    (tests/test_runner.py::test_extending_a_finished_run_equals_the_longer_run)."""
    target.mkdir(parents=True)
    for name in ("config.json", "checkpoint.safetensors", "checkpoint.prev.safetensors", "metrics.jsonl",
                 "partition.json"):
        if (source / name).exists():
            shutil.copy2(source / name, target / name)


def run_rows(base: Path, rows: list[tuple[str, dict[str, Any]]], out: Path,
             extra: dict[str, Any] | None = None, extend_from: Path | None = None) -> list[Path]:
    """Run each (name, overrides) row of `base` into `out/name`; a row with summary.json is not run again.

    With `extend_from`, a row not started yet in `out` but finished there with fewer rounds starts from that
    run's last checkpoint. Writes `row.json` (the row's overrides) beside each run and returns the run
    directories in row order.
    """
    out.mkdir(parents=True, exist_ok=True)
    dirs = []
    for name, overrides in rows:
        run_dir = out / name
        dirs.append(run_dir)
        if (run_dir / "summary.json").exists():
            continue
        cfg = load_config(base, {**overrides, **(extra or {}), "run_name": name, "out": str(out)})
        if extend_from is not None and not run_dir.exists() and (extend_from / name / "summary.json").exists():
            extend_run(extend_from / name, run_dir)
        start = time.perf_counter()
        summary = run_simulation(cfg, run_dir, resume=(run_dir / "checkpoint.safetensors").exists())
        (run_dir / "row.json").write_text(json.dumps(overrides))
        print(f"{name}: final {summary['metric']} {summary['final_score']:.3f} in {time.perf_counter() - start:.0f} s",
              flush=True)
    return dirs



def load_finished_run(run_dir: Path, eval_size: int | None,
                      tail_average: bool = False) -> tuple[TrainedRun, datasets.Dataset]:
    """A run's global model after its last checkpoint (`fedhead.trained.load_trained`; with `tail_average`, its
    tail-averaged model) and `eval_size` pairs of its evaluation file (None: all of them)."""
    run = load_trained(run_dir, tail_average=tail_average)
    cfg = run.cfg.model_copy(update={"data": run.cfg.data.model_copy(update={"eval_size": eval_size})})
    return run, load_task_data(cfg, run.lm.tokenizer).eval
