"""Warm start: does head-pruned training keep a model that already solves the task?

The paper's t5-small was pre-trained on a mixture that includes MNLI; MiniLM has to learn it. This separates the
two: every row starts from a finished frontier run's model that already solves MNLI (by default dense seed 0's
mean of its last 5 rounds' global models: every LoRA factor and the classifier, A included) and trains `--rounds`
more rounds of the frontier protocol (bench/frontier.py: same federation and seed as that run) with the row's
options and `model.init_from` set to that run (the library's warm start, `fedhead run --init-from RUN_DIR`):
with `lora.freeze_a` the row's A stays frozen at the source run's *trained* A. The paired drop is the row's
accuracy minus the `dense` row's, both continued from the same model on the same pairs.

    python bench/warm_start.py --rows dense mixed-ng-rolling-fa-0.9 --threads 1     # resumable
    python bench/warm_start.py --source bench/results/frontier/seed1/dense --rows ...

Each row scores on the first `--pairs` validation_matched pairs at round 0 (the start: the same for every row, which
checks the load), every 5 rounds, and the mean of the last 5 rounds' models; after the last round its last-round and
tail-averaged models are also scored on all 9,815 pairs. Run folders:
bench/results/warm_start/[from-<source>/]seed<S>/<row>/ (not committed); records:
docs/results/warm_start/<row>[.from-<source>].seed<S>.json (the tag only for a source that is not a dense run).
`--table` pairs the records from dense sources with dense of the same seed (full set, tail-averaged models: drop
mean, sd, 95% t interval) and writes docs/results/warm_start.md.

    python bench/warm_start.py --table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT
from frontier import BASE, PROTOCOL, ROWS, paired_drop, record_path
from frontier import RESULTS as FRONTIER_RECORDS
from frontier import full_eval as score_on_every_pair

from fedhead.config import load_config
from fedhead.run_dir import RunDir
from fedhead.runners.local import run_simulation

RUNS = ROOT / "bench" / "results" / "warm_start"
RESULTS = ROOT / "docs" / "results" / "warm_start"
SOURCE = ROOT / "bench" / "results" / "frontier" / "seed0" / "dense"
TABLE = ROOT / "docs" / "results" / "warm_start.md"


def source_tag(source: Path) -> str:
    """The folder that keeps runs from different sources apart ('' for a dense run: its runs and records carry
    no tag)."""
    return "" if source.name == "dense" else f"from-{source.name}"


def full_eval(run_dir: Path, tail_average: bool) -> dict[str, float]:
    """The finished warm-start run's last-round (or tail-averaged) global model on every evaluation pair, kept in
    the run folder so that a rerun does not score it again."""
    rd = RunDir(run_dir)
    name = f"full_eval.r{rd.read_config().federated.rounds}{'.tail_average' if tail_average else ''}.json"
    if not (run_dir / name).exists():
        rd.write_json(name, score_on_every_pair(run_dir, tail_average))
    return rd.read_json(name)


def run_row(row: str, source: Path, rounds: int, pairs: int, threads: int) -> dict[str, Any]:
    """Continue `source`'s model for `rounds` rounds with `row`'s options; returns the row's record."""
    seed = RunDir(source).read_config().seed
    overrides = {**ROWS[row], **PROTOCOL, "federated.rounds": rounds, "federated.eval_every": 5,
                 "data.eval_size": pairs, "seed": seed, "threads": threads, "model.init_from": str(source)}
    cfg = load_config(BASE, overrides)
    out = RUNS / source_tag(source) / f"seed{seed}" / row
    summary = run_simulation(cfg, out, resume=(out / "checkpoint.safetensors").exists())
    last, averaged = full_eval(out, False), full_eval(out, True)
    rd = RunDir(out)
    metrics = rd.metrics()
    curve = {m["round"]: m["accuracy"] for m in metrics if "accuracy" in m}
    shown = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
    return {
        "row": row, "options": ROWS[row], "seed": seed, "source": str(shown),
        "rounds": rounds, "pairs": pairs, "start_accuracy": curve[0], "accuracy_by_round": curve,
        "last_round_accuracy": curve[rounds], "tail_average_accuracy": metrics[-1]["tail_average_accuracy"],
        "full_eval": last, "full_eval_tail_average": averaged,
        "bytes_up": summary["bytes_up"], "bytes_down": summary["bytes_down"], "train_flops": summary["train_flops"],
    }


def table(results: Path = RESULTS, sources: Path = FRONTIER_RECORDS) -> str:
    """Markdown: each row continued from dense seeds' models, its full-set accuracy (tail-averaged model: the
    source's, from its frontier record in `sources`, and the row's after the last round) and its drop against dense's
    continuation of the same seed: mean, sd and 95% t interval over the paired seeds."""
    records: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(results.glob("*.seed*.json")):
        r = json.loads(path.read_text())
        if "from-" not in path.name and "full_eval_tail_average" in r:
            records.setdefault(r["row"], {})[r["seed"]] = r
    dense = records.get("dense", {})
    rounds = "/".join(str(n) for n in sorted({r.get("rounds", 20) for by in records.values() for r in by.values()}))
    lines = [f"| continued from dense's model ({rounds} rounds) | seeds | start: the source model "
             f"| after {rounds} rounds | drop vs dense (each seed) | sd | 95% interval |", "|---" * 7 + "|"]
    for row, by_seed in sorted(records.items(), key=lambda kv: kv[0] != "dense"):
        seeds = sorted(s for s in by_seed if s in dense)
        if not seeds:
            continue
        acc = [by_seed[s]["full_eval_tail_average"]["accuracy"] for s in seeds]
        dense_acc = [dense[s]["full_eval_tail_average"]["accuracy"] for s in seeds]
        drop, sd, low, high = paired_drop(dense_acc, acc)
        start = np.mean([json.loads(record_path("dense", s, sources).read_text())["full_eval_tail_average"]
                         ["accuracy"] for s in seeds])
        each = ", ".join(f"{100 * (d - a):.1f}" for d, a in zip(dense_acc, acc, strict=True))
        lines.append(f"| `{row}` | {', '.join(map(str, seeds))} | {start:.4f} | {np.mean(acc):.4f} "
                     f"| {drop:.1f} ({each}) | {sd:.1f} | [{low:+.1f}, {high:+.1f}] |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS))
    parser.add_argument("--table", action="store_true", help=f"write {TABLE.relative_to(ROOT)} from the records")
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.table:
        text = table()
        TABLE.write_text(
            "# Warm start: federated rounds from dense's trained model\n\n`python bench/warm_start.py --table` from "
            "[warm_start/](warm_start/); the run commands are in bench/warm_start.py. Accuracy on all 9,815 "
            "validation_matched pairs, each model the mean of its run's last 5 rounds' global models.\n\n" + text)
        print(text, end="")
        return
    if not args.rows:
        parser.error("--rows is required (or --table)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for row in args.rows:
        record = run_row(row, args.source.resolve(), args.rounds, args.pairs, args.threads)
        tag = source_tag(args.source.resolve())
        path = RESULTS / f"{row}{'.' + tag if tag else ''}.seed{record['seed']}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"{row}: start {record['start_accuracy']:.4f}, round {args.rounds} {record['last_round_accuracy']:.4f}, "
              f"mean of last 5 rounds' models {record['tail_average_accuracy']:.4f} on {args.pairs} pairs, "
              f"{record['full_eval_tail_average']['accuracy']:.4f} on all -> {path}",
              flush=True)


if __name__ == "__main__":
    main()
