"""The accuracy frontier of head pruning: each row's paired accuracy drop against dense, with its noise, beside
what it saves (training FLOPs, upload and download bytes, client step time, peak client training memory).

Protocol (issue "Head pruning that pays"): MiniLM on MultiNLI, the paper_base federation (20 Dirichlet(1.0)
clients, 4 a round, 8 local steps at batch 32, lr 3e-3, 64 tokens), 60 rounds, 1,000-pair evaluations every 4
rounds for the curves, and the **final global model of every run scored on all 9,815 validation_matched
pairs**. Each row runs with 3 seeds (the seed changes the partition, the client sequence and the LoRA init);
a row's drop is paired: its full-set accuracy minus dense's of the same seed, then mean, sd and a 95% t interval
over seeds.

    python bench/frontier.py run --rows dense sparse-0.9 --seeds 0 1 2 --threads 1   # resumable
    python bench/frontier.py table          # docs/results/frontier.md from docs/results/frontier/*.json
    python bench/frontier.py screen --rounds 30 --rows ...   # one seed, fewer rounds: screening only
    python bench/frontier.py costs --rows dense sparse-0.9 ...   # client time and memory, one controlled batch
    python bench/frontier.py refresh        # rewrite the records from the run folders (new record fields)
    python bench/frontier.py status         # the protocol's missing runs, and how far the unfinished ones are

The client time and memory columns come from `costs`, not from the runs' own timings (two runs share the two
cores here, so their wall-clock times measure the neighbour as much as the row): one process builds every row's
client from the same global state and times the same client's round (scoring, 8 local steps, the post-round
loss) for each row in turn, round-robin, `--repeats` times, and records the median round time, the median
seconds per local step, and the peak training memory the client reports (fedhead.federated.local_training.train_local:
the bytes autograd saves for the backward, plus a gradient and AdamW's two moments per trainable value). Ratios
are to dense in the same measurement (docs/results/frontier_costs.json). Measuring a few new rows adds them to
the file: dense is measured again in every batch and the old rows' times are rescaled by it (merge_costs).

Finished runs are not run again and an interrupted run resumes from its checkpoint (run folders in
bench/results/frontier/seed<S>/<row>/, not committed). Each finished run leaves a small record in
docs/results/frontier/<row>.seed<S>.json (config overrides, seed, full-set accuracy, totals): the table is
rebuilt from those records alone.

The code: the rows and the protocol in frontier_protocol.py, training and scoring in frontier_run.py, the records
in frontier_records.py, paired drops and ratios in frontier_stats.py, the tables and figures in frontier_table.py,
the controlled cost measurement (shared with bench/budget.py) in frontier_costs.py; this file is the command line
and re-exports their names (`from frontier import ROWS, run, frontier_rows, ...`).
"""

from __future__ import annotations

import argparse
import json

from common import ROOT
from frontier_costs import frontier_costs, measure_costs, merge_costs
from frontier_protocol import BASE, CONVERGENCE_ROUNDS, COSTS, PROTOCOL, PROTOCOL_ROWS, RESULTS, ROWS, RUNS
from frontier_records import learning_by_rounds, load_records, lora_a_row_norm, make_record, record_path, refresh
from frontier_run import full_eval, has_tail_average, run, run_one, status
from frontier_stats import CONTRASTS, contrasts, convergence, frontier_rows, paired_drop, t_quantile
from frontier_table import figure, table, write_tables

__all__ = ["BASE", "CONTRASTS", "CONVERGENCE_ROUNDS", "COSTS", "PROTOCOL", "PROTOCOL_ROWS", "RESULTS", "ROWS", "RUNS",
           "contrasts", "convergence", "figure", "frontier_costs", "frontier_rows", "full_eval", "has_tail_average",
           "learning_by_rounds", "load_records", "lora_a_row_norm", "main", "make_record", "measure_costs",
           "merge_costs", "paired_drop", "record_path", "refresh", "run", "run_one", "status", "t_quantile", "table",
           "write_tables"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "screen"):
        p = sub.add_parser(name)
        p.add_argument("--rows", nargs="+", required=True, choices=list(ROWS))
        p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2] if name == "run" else [0])
        p.add_argument("--threads", type=int, default=1, help="torch threads (1 when two jobs share 2 cores)")
        p.add_argument("--rounds", type=int, default=None if name == "run" else 30)
    costs = sub.add_parser("costs")
    costs.add_argument("--rows", nargs="+", required=True, choices=list(ROWS))
    costs.add_argument("--repeats", type=int, default=3)
    costs.add_argument("--threads", type=int, default=1)
    sub.add_parser("table")
    sub.add_parser("status", help="the protocol's missing runs and the progress of unfinished ones")
    sub.add_parser("refresh", help="rewrite the records from the run folders that still hold their runs")
    args = parser.parse_args()
    if args.command == "run":
        run(args.rows, args.seeds, args.threads, args.rounds, RUNS, RESULTS)
    elif args.command == "costs":
        rows = ["dense", *[r for r in args.rows if r != "dense"]]
        measured = merge_costs(json.loads(COSTS.read_text()) if COSTS.exists() else None,
                               frontier_costs(measure_costs(rows, args.repeats, args.threads)))
        COSTS.write_text(json.dumps(measured, indent=1) + "\n")
        print(f"wrote {COSTS.relative_to(ROOT)}: {', '.join(measured['rows'])}")
    elif args.command == "status":
        print(status())
    elif args.command == "refresh":
        for results in (RESULTS, RESULTS.parent / "screen30"):
            for path in refresh(results):
                print(f"rewrote {path.relative_to(ROOT)}")
    elif args.command == "screen":
        results = ROOT / "docs" / "results" / f"screen{args.rounds}"
        run(args.rows, args.seeds, args.threads, args.rounds, RUNS, results)
        print(table(results, tail_column=True))
    else:
        for name, text in write_tables(RESULTS).items():
            print(f"{name}:\n{text}")


if __name__ == "__main__":
    main()
