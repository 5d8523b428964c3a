"""The paper's four task types, each federated densely and with the full method at 90% head sparsity.

    python bench/tasks.py                       # every task; results in bench/results/tasks/<task>/
    python bench/tasks.py --tasks e2e_nlg xsum  # a subset
    python bench/tasks.py --tasks e2e_nlg --extra full-0.9-train_sparse full-0.5   # more rows beside the two

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


# Extra rows (--extra): the full method with one option changed, to see where a task loses its accuracy.
EXTRA: dict[str, dict[str, Any]] = {
    "full-0.5": {"heads.sparsity": 0.5},
    "full-0.9-train_sparse": {"heads.sparsity": 0.9, "heads.mode": "train_sparse"},
    "full-0.9-mixed-c0.5": {"heads.sparsity": 0.9, "heads.mode": "mixed", "heads.compute_sparsity": 0.5},
    "full-0.9-sample": {"heads.sparsity": 0.9, "heads.selection": "sample"},
}


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
    parser.add_argument("--extra", nargs="+", choices=sorted(EXTRA), default=[],
                        help="rows beyond dense and full-0.9, run for every task asked")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tasks")
    args = parser.parse_args()
    lines = ["| task | run | sparsity | final metrics | mean of last evals (headline) | drop vs dense, points "
             "| upload MB | train TFLOPs | minutes |", "|" + "---|" * 9]
    full = full_method()
    rows = [("dense", {}), ("full-0.9", {**full, "heads.sparsity": 0.9})]
    rows += [(name, {**full, **EXTRA[name]}) for name in args.extra]
    for task in args.tasks:
        run_rows(ROOT / "configs" / TASKS[task], rows, args.out / task)
    for task in TASKS:  # every task measured so far, in this folder, so a subset run keeps the others' lines
        runs = [args.out / task / name for name in ("dense", "full-0.9", *EXTRA)
                if (args.out / task / name / "summary.json").exists()]
        if runs:
            write_report(runs, args.out / task / "report")
            lines += summary_line(task, json.loads((args.out / task / "report" / "summary.json").read_text()))
    text = "\n".join(lines) + "\n"
    (args.out / "tasks.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
