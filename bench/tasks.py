"""The paper's four task types, each federated densely and with the full method at 90% head sparsity.

    python bench/tasks.py                       # every task; results in bench/results/tasks/<task>/
    python bench/tasks.py --tasks e2e_nlg xsum  # a subset

Tasks and their presets: MultiNLI (configs/quickstart.toml, MiniLM), 20 Newsgroups (configs/newsgroups.toml,
MiniLM), E2E NLG (configs/e2e_nlg.toml, SmolLM2-135M-Instruct) and XSum (configs/xsum.toml, SmolLM2). The full
method's options (heads and aggregation / selection) are read from configs/fedhead_full.toml, so this benchmark
always measures the shipped defaults. Each task writes a `fedhead report` (table, curves) into
bench/results/tasks/<task>/report/, and the summary of all tasks, with wall times, goes to
bench/results/tasks/tasks.md. Finished runs are skipped, stopped ones resumed.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

from common import ROOT, run_rows

from fedhead.report import write_report

TASKS = {
    "mnli": "quickstart.toml",
    "newsgroups": "newsgroups.toml",
    "e2e_nlg": "e2e_nlg.toml",
    "xsum": "xsum.toml",
}


def full_method() -> dict[str, Any]:
    """Dotted overrides of the full method, as configured in configs/fedhead_full.toml."""
    full = tomllib.loads((ROOT / "configs" / "fedhead_full.toml").read_text())
    overrides = {f"heads.{k}": v for k, v in full.get("heads", {}).items()}
    fed = full.get("federated", {})
    overrides.update({f"federated.{k}": fed[k] for k in ("aggregation", "aggregation_weights", "selection",
                                                         "exploration") if k in fed})
    return overrides


def summary_line(task: str, report: dict[str, Any]) -> list[str]:
    lines = []
    for row in report["rows"]:
        finals = " / ".join(f"{k} {v:.3g}" for k, v in row["final_metrics"].items())
        drop = row.get("drop_points")
        lines.append(f"| {task} | {row['run']} | {row['sparsity']:g} | {finals} | {row['tail_mean']:.3g} | "
                     f"{'-' if drop is None else f'{drop:+.1f}'} | {row['bytes_up'] / 1e6:.1f} | "
                     f"{row['train_flops'] / 1e12:.1f} | {row['seconds'] / 60:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tasks")
    args = parser.parse_args()
    lines = ["| task | run | sparsity | final metrics | mean of last evals (headline) | drop vs dense, points "
             "| upload MB | train TFLOPs | minutes |", "|" + "---|" * 9]
    for task in args.tasks:
        base = ROOT / "configs" / TASKS[task]
        dirs = run_rows(base, [("dense", {}), ("full-0.9", {**full_method(), "heads.sparsity": 0.9})], args.out / task)
        write_report(dirs, args.out / task / "report")
        lines += summary_line(task, json.loads((args.out / task / "report" / "summary.json").read_text()))
    text = "\n".join(lines) + "\n"
    (args.out / "tasks.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
