"""A federation of mixed devices, the setting sub-model FL exists for (HeteroFL, FedRolex and FjORD measure it
this way): the frontier's 20 clients and partition, 5 capable (clients c with c % 4 == 0) and 15 weak. A weak
device has half the memory and half the time of a capable one: its peak training memory at most 1/2 of dense's
and its training FLOPs a round at most 1/2 of dense's (`bench/budget.py costs` measures the weak tier's rows
`weak-*` against dense).

Rows (60 rounds, 3 seeds, all 9,815 pairs, tail average of the last 5 rounds, paired with all-dense by seed):

- all-dense: every device trains dense (the bound no real federation reaches): the frontier's dense records,
  same partition and seeds;
- `mixfed-capable-only`: the weak devices are left out (`federated.tier_selectable`), the 5 capable ones train:
  what users do today;
- `mixfed-weak-heads`: weak devices prune 90% of heads (`heads.tiers`, remove mode) and, to fit both limits,
  train 3 local steps with activation checkpointing (`weak-remove-0.9-ckpt-steps3`);
- `mixfed-weak-ckpt`: weak devices train dense LoRA with activation checkpointing and 2 local steps
  (`weak-ckpt-steps2`), a combination of levers that fits both limits;
- `mixfed-weak-b8`: weak devices take the capable ones' 8 local steps on batches of 8 instead of 32
  (`federated.tier_batch_size`, `dense-b8`): a quarter of the FLOPs and activation memory, and every client
  takes the same number of optimizer steps;
- `mixfed-weak-b16m8`: weak devices take 8 local steps on batches of 16, each run as two micro-batches of 8
  (`federated.micro_batch_size`, gradient accumulation; `dense-b16-m8`): half the FLOPs (the batch of 16's) and a
  quarter of the activations (the batch of 8's).

    python bench/heterogeneous.py run --seeds 0 1 2 --threads 1   # resumable; records docs/results/heterogeneous/
    python bench/heterogeneous.py table                           # docs/results/heterogeneous.md
    python bench/heterogeneous.py status                          # missing seeds, unfinished runs' progress
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

from common import ROOT
from frontier import RESULTS, frontier_rows, run, status
from frontier_records import load_records
from frontier_stats import t_quantile

LEFT_OUT = "mixfed-capable-only"  # what users do today: the row the others must beat
ROWS = ("mixfed-capable-only", "mixfed-weak-heads", "mixfed-weak-ckpt", "mixfed-weak-b8", "mixfed-weak-b16m8")
# the weak tier of each federation, as a single-tier row that bench/budget.py costs measures
WEAK_TIER = {"mixfed-weak-heads": "weak-remove-0.9-ckpt-steps3", "mixfed-weak-ckpt": "weak-ckpt-steps2",
             "mixfed-weak-b8": "dense-b8", "mixfed-weak-b16m8": "dense-b16-m8"}
COSTS = ROOT / "docs" / "results" / "budget_costs.json"
RECORDS = ROOT / "docs" / "results" / "heterogeneous"
RUNS = ROOT / "bench" / "results" / "heterogeneous"
TABLE = ROOT / "docs" / "results" / "heterogeneous.md"


def paired_points(records: dict, row: str, versus: dict[int, dict]) -> dict[int, float]:
    """100 (row_s - versus_s) for each seed s both have, of the tail-averaged models' full-set accuracy
    (`records`: `load_records` of RECORDS; `versus`: another row's records by seed)."""
    mine = records.get(row, {})
    return {s: 100 * (mine[s]["full_eval_tail_average"]["accuracy"] - versus[s]["full_eval_tail_average"]["accuracy"])
            for s in sorted(set(mine) & set(versus))}


def mean_interval(points: dict[int, float]) -> tuple[float, float | None, float | None]:
    """(mean, low, high) of paired points: mean +- t_{0.975, n-1} sd / sqrt(n), the 95% t interval over seeds
    (one seed: no interval, None, None)."""
    values = list(points.values())
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    half = t_quantile(len(values)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _gain_text(points: dict[int, float]) -> str:
    """Mean, per-seed values and 95% t interval of paired points (one seed: no interval)."""
    if not points:
        return "- | -"
    mean, low, high = mean_interval(points)
    seeds = ", ".join(f"{v:+.1f}" for v in points.values())
    return f"{mean:+.1f} ({seeds}) | " + ("-" if low is None else f"[{low:+.1f}, {high:+.1f}]")


def table() -> str:
    """The mixed federation's rows beside all-dense (the frontier's dense records of the same seeds)."""
    dense = {r["row"]: r for r in frontier_rows(RESULTS)}.get("dense")
    # all-dense: the frontier's own records, paired by seed (no copy in RECORDS)
    rows = {r["row"]: r for r in frontier_rows(RECORDS, dense_from=RESULTS)} if RECORDS.exists() else {}
    lines = ["| federation | seeds | accuracy (9,815 pairs) | drop vs all-dense (pt) | 95% interval "
             "| gain over leaving the weak out (pt) | 95% interval |", "|---|---|---|---|---|---|---|"]
    if dense is not None:
        lines.append(f"| all dense (frontier) | {len(dense['seeds'])} | {dense['accuracy']:.4f} | 0 | - | - | - |")
    records = load_records(RECORDS) if RECORDS.exists() else {}
    dense_records = load_records(RESULTS).get("dense", {})
    for name in ROWS:
        r = rows.get(name)
        if r is None:
            lines.append(f"| `{name}` | 0 | not run yet | - | - | - | - |")
            continue
        interval = f"[{r['drop_low']:+.1f}, {r['drop_high']:+.1f}]" if len(r["seeds"]) > 1 else "-"
        drops = ", ".join(f"{-p:+.1f}" for p in paired_points(records, name, dense_records).values())
        gain = "- | -" if name == LEFT_OUT else _gain_text(paired_points(records, name, records.get(LEFT_OUT, {})))
        lines.append(f"| `{name}` | {len(r['seeds'])} | {r['accuracy']:.4f} | {r['drop']:+.1f} ({drops}) | {interval} "
                     f"| {gain} |")
    lines += ["", "The weak tier's client round against dense's (`bench/budget.py costs`; a weak device needs at least "
              "2x on both):", "", "| weak tier | as the row | training FLOPs saved | peak training memory saved "
              "(64 tokens) | fits |", "|---|---|---|---|---|"]
    costs = json.loads(COSTS.read_text()) if COSTS.exists() else {"rows": {}}
    for federation, weak in WEAK_TIER.items():
        if weak not in costs["rows"]:
            lines.append(f"| `{federation}` | `{weak}` | not measured | - | - |")
            continue
        dense, mine = costs["rows"]["dense"], costs["rows"][weak]
        flops = dense["train_flops"] / mine["train_flops"]
        memory = dense["peak_memory_bytes"] / mine["peak_memory_bytes"]
        fits = "yes" if flops >= 2 and memory >= 2 else "no"
        lines.append(f"| `{federation}` | `{weak}` | {flops:.2f}x | {memory:.2f}x | {fits} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=None)
    sub.add_parser("table")
    sub.add_parser("status", help="the rows' missing seeds and the progress of unfinished runs")
    args = parser.parse_args()
    if args.command == "status":
        print(status(RECORDS, RUNS, rows=ROWS))
        return
    if args.command == "run":
        run(args.rows, args.seeds, args.threads, args.rounds, RUNS, RECORDS)
    text = table()
    TABLE.write_text("# A federation of mixed devices\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
