"""Shared by the benchmarks: run named variants of a base config, skipping finished ones, resuming the rest."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedhead.config import load_config
from fedhead.runners.local import run_simulation

ROOT = Path(__file__).resolve().parents[1]


def run_rows(base: Path, rows: list[tuple[str, dict[str, Any]]], out: Path,
             extra: dict[str, Any] | None = None) -> list[Path]:
    """Run each (name, overrides) row of `base` into `out/name`; a row with summary.json is not run again.

    Writes `row.json` (the row's overrides) beside each run and returns the run directories in row order.
    """
    out.mkdir(parents=True, exist_ok=True)
    dirs = []
    for name, overrides in rows:
        run_dir = out / name
        dirs.append(run_dir)
        if (run_dir / "summary.json").exists():
            continue
        cfg = load_config(base, {**overrides, **(extra or {}), "run_name": name, "out": str(out)})
        start = time.perf_counter()
        summary = run_simulation(cfg, run_dir, resume=(run_dir / "checkpoint.safetensors").exists())
        (run_dir / "row.json").write_text(json.dumps(overrides))
        print(f"{name}: final {summary['metric']} {summary['final_score']:.3f} in {time.perf_counter() - start:.0f} s",
              flush=True)
    return dirs
