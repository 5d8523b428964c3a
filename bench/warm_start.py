"""Warm start: does head-pruned training keep a model that already solves the task?

The paper's t5-small was pre-trained on a mixture that includes MNLI; MiniLM has to learn it. This separates the
two: every row starts from a finished frontier run's model that already solves MNLI (by default dense seed 0's
mean of its last 5 rounds' global models: every LoRA factor and the classifier, A included) and trains `--rounds`
more rounds of the frontier protocol (bench/frontier.py: same federation and seed as that run) with the row's
options. With `lora.freeze_a` the row's A stays frozen at the source run's *trained* A (the source state is
loaded before the first round and again on resume, since a frozen A is not checkpointed). The paired drop is the
row's accuracy minus the `dense` row's, both continued from the same model on the same pairs.

    python bench/warm_start.py --rows dense mixed-ng-rolling-fa-0.9 --threads 1     # resumable
    python bench/warm_start.py --source bench/results/frontier/seed1/dense --rows ...

Each row scores on the first `--pairs` validation_matched pairs at round 0 (the start: the same for every row,
which checks the load), every 5 rounds, and the mean of the last 5 rounds' models. Run folders:
bench/results/warm_start/[from-<source>/]seed<S>/<row>/ (not committed); records: docs/results/warm_start/
<row>[.from-<source>].seed<S>.json (the tag only for a source that is not a dense run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import ROOT
from frontier import BASE, PROTOCOL, ROWS

from fedhead.config import load_config
from fedhead.federated.state import State, load_state_
from fedhead.federated.tail_average import tail_average_of_checkpoint
from fedhead.runners.local import Simulation, drive_rounds, run_round
from fedhead.runners.run_dir import RunDir
from fedhead.trained import read_run_config

RUNS = ROOT / "bench" / "results" / "warm_start"
RESULTS = ROOT / "docs" / "results" / "warm_start"
SOURCE = ROOT / "bench" / "results" / "frontier" / "seed0" / "dense"


def source_state(source: Path) -> State:
    """The tail-averaged global state of the finished run `source` (every trainable tensor it had)."""
    checkpoint = RunDir(source).load_checkpoint()
    if checkpoint is None:
        raise SystemExit(f"{source} has no checkpoint: not a finished run")
    state = tail_average_of_checkpoint(*checkpoint)
    if state is None:
        raise SystemExit(f"{source} has no complete tail average (federated.tail_average_rounds, last round)")
    return state


def source_tag(source: Path) -> str:
    """The folder that keeps runs from different sources apart ('' for a dense run: its runs and records carry
    no tag)."""
    return "" if source.name == "dense" else f"from-{source.name}"


def run_row(row: str, source: Path, rounds: int, pairs: int, threads: int) -> dict[str, Any]:
    """Continue `source`'s model for `rounds` rounds with `row`'s options; returns the row's record."""
    seed = read_run_config(source).seed
    overrides = {**ROWS[row], **PROTOCOL, "federated.rounds": rounds, "federated.eval_every": 5,
                 "data.eval_size": pairs, "seed": seed, "threads": threads}
    cfg = load_config(BASE, overrides)
    out = RUNS / source_tag(source) / f"seed{seed}" / row
    sim = Simulation.setup(cfg)
    load_state_(sim.lm.model, source_state(source))  # before a resume too: a frozen A is not checkpointed
    resume = (out / "checkpoint.safetensors").exists()
    rd = RunDir(out)
    summary = drive_rounds(sim, rd, lambda state, r, rng, stats: run_round(sim, state, r, rng, stats), resume=resume)
    metrics = rd.metrics()
    curve = {m["round"]: m["accuracy"] for m in metrics if "accuracy" in m}
    shown = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
    return {
        "row": row, "options": ROWS[row], "seed": seed, "source": str(shown),
        "rounds": rounds, "pairs": pairs, "start_accuracy": curve[0], "accuracy_by_round": curve,
        "last_round_accuracy": curve[rounds], "tail_average_accuracy": metrics[-1]["tail_average_accuracy"],
        "bytes_up": summary["bytes_up"], "bytes_down": summary["bytes_down"], "train_flops": summary["train_flops"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", required=True, choices=list(ROWS))
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for row in args.rows:
        record = run_row(row, args.source.resolve(), args.rounds, args.pairs, args.threads)
        tag = source_tag(args.source.resolve())
        path = RESULTS / f"{row}{'.' + tag if tag else ''}.seed{record['seed']}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"{row}: start {record['start_accuracy']:.4f}, round {args.rounds} {record['last_round_accuracy']:.4f}, "
              f"mean of last 5 rounds' models {record['tail_average_accuracy']:.4f} on {args.pairs} pairs -> {path}",
              flush=True)


if __name__ == "__main__":
    main()
