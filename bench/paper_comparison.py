"""The paper's comparison on MultiNLI with MiniLM, reproduced by one command, then `fedhead report`.

Runs, with the same seed, clients and rounds: dense FedAvg LoRA (the baseline), random pruning at 90%,
confidence pruning at 50/70/90% with FedAvg aggregation, the full method (confidence pruning + head-weighted
aggregation + loss-gap selection) at 50/70/90%, and the full method at 90% with `lora.freeze_a`.

    python bench/paper_comparison.py            # full: configs/paper_base.toml (about 80 min on 2 cores)
    python bench/paper_comparison.py --quick    # smoke run: 3 rounds, 300 eval pairs (under 10 min)
    python bench/paper_comparison.py --seeds 0 1 2   # repeat, then mean and spread per method

Why this size (full mode): 20 Dirichlet clients (alpha 1.0) over the 9,999 train pairs, 4 clients a round,
8 local steps of batch 32, 30 rounds, sequences cut at 64 tokens (MultiNLI pairs average about 40) and 1,000
validation_matched pairs evaluated every 2 rounds (runs are compared on the mean of their last 5 evaluations:
with 4 label-skewed clients a round one evaluation swings by several points). A round takes about 20 s dense and
15 s at 90% sparsity here, so a dense run takes about 12 minutes and the nine runs fit in about 80 minutes on 2
cores. Finished runs are skipped, stopped ones resumed. Results: bench/results/paper[/seed<k>]/, with the report
in .../report/.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from common import ROOT, run_rows

from fedhead.report import write_report

BASE = ROOT / "configs" / "paper_base.toml"
FULL = {"federated.aggregation": "head_weighted", "federated.selection": "loss_gap"}
ROWS: list[tuple[str, dict[str, Any]]] = [
    ("dense", {}),
    ("random-0.9", {"heads.sparsity": 0.9, "heads.importance": "random"}),
    *[(f"confidence-{s}", {"heads.sparsity": s}) for s in (0.5, 0.7, 0.9)],
    *[(f"full-{s}", {"heads.sparsity": s, **FULL}) for s in (0.5, 0.7, 0.9)],  # names shared with the sweep
    ("full-0.9-freeze_a", {"heads.sparsity": 0.9, **FULL, "lora.freeze_a": True}),
]
QUICK = {"federated.rounds": 3, "federated.eval_every": 3, "data.eval_size": 300}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Smoke run (3 rounds, 300 eval pairs).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or ROOT / "bench" / "results" / ("paper_quick" if args.quick else "paper")
    seed_rows = []
    for seed in args.seeds:
        seed_out = out if len(args.seeds) == 1 else out / f"seed{seed}"
        dirs = run_rows(BASE, ROWS, seed_out, {**(QUICK if args.quick else {}), "seed": seed})
        table = write_report(dirs, seed_out / "report")
        print(table.read_text())
        seed_rows.append(json.loads((seed_out / "report" / "summary.json").read_text())["rows"])
    if len(args.seeds) > 1:
        text = spread_table(seed_rows, args.seeds)
        (out / "seeds.md").write_text(text)
        print(text)


def spread_table(seed_rows: list[list[dict[str, Any]]], seeds: list[int]) -> str:
    """Mean and standard deviation over seeds of the accuracy (mean of a run's last evaluations) and its drop
    vs dense, per run name."""
    lines = [f"Seeds: {seeds}\n", "| run | accuracy, mean of last 5 evals (mean +- sd over seeds) "
             "| drop vs dense, points (mean +- sd) |", "|---|---|---|"]
    for i, row in enumerate(seed_rows[0]):
        finals = [rows[i]["tail_mean"] for rows in seed_rows]
        drops = [rows[i].get("drop_points", 0.0) for rows in seed_rows]
        lines.append(f"| {row['run']} | {statistics.mean(finals):.3f} +- {statistics.stdev(finals):.3f} | "
                     f"{statistics.mean(drops):+.1f} +- {statistics.stdev(drops):.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
