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
seconds per local step, and the peak training memory the client reports (fedhead.federated.client.train_local:
the bytes autograd saves for the backward, plus a gradient and AdamW's two moments per trainable value). Ratios
are to dense in the same measurement (docs/results/frontier_costs.json). Measuring a few new rows adds them to
the file: dense is measured again in every batch and the old rows' times are rescaled by it (merge_costs).

Finished runs are not run again and an interrupted run resumes from its checkpoint (run folders in
bench/results/frontier/seed<S>/<row>/, not committed). Each finished run leaves a small record in
docs/results/frontier/<row>.seed<S>.json (config overrides, seed, full-set accuracy, totals): the table is
rebuilt from those records alone.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, load_finished_run

from fedhead.config import load_config
from fedhead.federated.client import evaluate
from fedhead.run_dir import RunDir
from fedhead.runners.local import run_simulation

BASE = ROOT / "configs" / "paper_base.toml"
# tail average of the last 5 rounds' global models: the model scored on the full set beside the last round's
PROTOCOL = {"federated.rounds": 60, "federated.eval_every": 4, "federated.tail_average_rounds": 5}
RESULTS = ROOT / "docs" / "results" / "frontier"
RUNS = ROOT / "bench" / "results" / "frontier"
COSTS = ROOT / "docs" / "results" / "frontier_costs.json"
# rounds at which a row's global model is also scored on the full set, on the way to the last round: dense at 30
# and 45 shows whether 60 rounds reach convergence (the issue: "enough rounds that dense has converged")
CONVERGENCE_ROUNDS = {"dense": (30, 45)}
# The rows of the protocol, docs/head_pruning.md's copy of the table: dense, today's best at 90% (train_sparse,
# remove), and the survivors of screening at 90% and 70%; docs/results/frontier.md has every row.
PROTOCOL_ROWS = ("dense", "sparse-0.9", "remove-0.9", "sparse-rolling-0.9", "mixed-ng-rolling-fapc-0.9",
                 "sparse-rolling-0.7", "mixed-ng-rolling-fapc-0.7")

SPARSE = {"heads.mode": "train_sparse"}
FREEZE = {"lora.freeze_a": True}
HEADWISE = {"lora.head_rank": 1}
SHARED_WINDOW = {"heads.schedule": "rolling", "heads.rolling_window": "shared"}
MIXED_NO_GRAD = {"heads.mode": "mixed", "heads.compute_sparsity": 0.25, "heads.frozen_autograd": False}

ROWS: dict[str, dict[str, Any]] = {
    "dense": {},
    "dense-freeze_a": FREEZE,
    # today's best: train_sparse keeps accuracy best, remove saves compute
    "sparse-0.9": {"heads.sparsity": 0.9, **SPARSE},
    "remove-0.9": {"heads.sparsity": 0.9},
    "sparse-0.7": {"heads.sparsity": 0.7, **SPARSE},
    "remove-0.7": {"heads.sparsity": 0.7},
    # mechanisms (issue "Head pruning that pays"), screened at 90%
    "sb-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward"},
    "sb-rolling-fa-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward", "heads.schedule": "rolling",
                          **FREEZE},
    "sparse-rolling-0.9": {"heads.sparsity": 0.9, **SPARSE, "heads.schedule": "rolling"},
    "sparse-adam-0.9": {"heads.sparsity": 0.9, **SPARSE, "federated.server_optimizer": "adam",
                        "federated.server_learning_rate": 3e-3},
    "sparse-momentum-0.9": {"heads.sparsity": 0.9, **SPARSE, "federated.server_optimizer": "momentum",
                            "federated.server_learning_rate": 1.0, "federated.server_momentum": 0.5},
    "remove-rolling-scaled-0.9": {"heads.sparsity": 0.9, "heads.schedule": "rolling", "heads.scale_kept": True},
    "remove-scaled-0.9": {"heads.sparsity": 0.9, "heads.scale_kept": True},
    "sb-fa-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward", **FREEZE},
    "sb-fa-r16-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward", **FREEZE, "lora.rank": 16,
                      "lora.alpha": 32.0},
    "sb-fa-r32-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward", **FREEZE, "lora.rank": 32,
                      "lora.alpha": 64.0},
    "sb-warmup10-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward", "heads.warmup_rounds": 10},
    "sb-momentum-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward",
                        "federated.server_optimizer": "momentum", "federated.server_momentum": 0.5},
    "sb-0.7": {"heads.sparsity": 0.7, "heads.mode": "sparse_backward"},
    "sb-rolling-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward", "heads.schedule": "rolling"},
    "sparse-rolling-fa-0.9": {"heads.sparsity": 0.9, **SPARSE, "heads.schedule": "rolling", **FREEZE},
    "sparse-rolling-0.7": {"heads.sparsity": 0.7, **SPARSE, "heads.schedule": "rolling"},
    # coverage-balanced: the least-trained among the client's top half by confidence
    "sparse-coverage-0.9": {"heads.sparsity": 0.9, **SPARSE, "heads.schedule": "coverage", "heads.coverage_pool": 0.5},
    "mixed-ng-rolling-fa-0.7": {"heads.sparsity": 0.7, **MIXED_NO_GRAD, "heads.schedule": "rolling", **FREEZE},
    # mixed without autograd: the 3 lowest-scored heads of a block removed (1.23x fewer FLOPs at 64 tokens),
    # the other 7 pruned computed without autograd, the rolling window of 2 trained; with freeze_a, as heads
    # computed without autograd need (sb-rolling-0.9, a trained A: 23.1 points below dense at 30 rounds)
    "mixed-ng-rolling-fa-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, "heads.schedule": "rolling", **FREEZE},
    # LoRA capacity where heads are kept: with A frozen a higher rank uploads no more A; rank 16 is the largest
    # whose upload stays 5x below dense's rank-8 A + B (issue goal), alpha / rank kept at 2
    "mixed-ng-rolling-fa-r16-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, "heads.schedule": "rolling", **FREEZE,
                                    "lora.rank": 16, "lora.alpha": 32.0},
    # freeze_a's learning speed: with A fixed at its init (row norm 0.58) and Adam on B, alpha / rank only scales
    # how fast B A moves; a trained A grows to row norm 1.06 by round 60 (dense seed 0). alpha 64 (x4) doubled the
    # local loss gain but not the accuracy (mixed: 0.4039 against 0.4317 at alpha 16): screened out
    "mixed-ng-rolling-fa-a64-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, "heads.schedule": "rolling", **FREEZE,
                                    "lora.alpha": 64.0},
    "sparse-rolling-fa-a64-0.9": {"heads.sparsity": 0.9, **SPARSE, "heads.schedule": "rolling", **FREEZE,
                                  "lora.alpha": 64.0},
    "remove-rolling-fa-a64-0.9": {"heads.sparsity": 0.9, "heads.schedule": "rolling", **FREEZE, "lora.alpha": 64.0},
    # is dense's alpha (16, alpha / r = 2) itself too small? the fairness check for the alpha-64 rows
    "dense-a64": {"lora.alpha": 64.0},
    # head-wise LoRA (lora.head_rank, fedhead.models.headwise): every head its own rank-1 adapter, A and B both
    # split by head, so A is trained and only the kept heads' rows of both are sent (a client keeping 2 of 12
    # heads a block sends 2 x (384 + 32) values a projection against rank-8 LoRA's 6,144) and a head's training
    # moves no other head: the heads computed without autograd stay exact (no shared-A drift, sb-rolling-0.9)
    "dense-hw1": HEADWISE,
    "sparse-rolling-hw1-0.9": {"heads.sparsity": 0.9, **SPARSE, "heads.schedule": "rolling", **HEADWISE},
    "sb-rolling-hw1-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward", "heads.schedule": "rolling",
                           **HEADWISE},
    "mixed-ng-rolling-hw1-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, "heads.schedule": "rolling", **HEADWISE},
    # FedRolex's own window (heads.rolling_window = "shared"): the round's clients all train the same 2 heads a
    # block, so each trained head's update is averaged over 4 clients instead of coming from about one (the
    # per-client windows rarely overlap); mixed-ng-rolling-hw1-0.9 sat near chance (0.34) through round 28
    "mixed-ng-shared-hw1-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, **SHARED_WINDOW, **HEADWISE},
    "mixed-ng-shared-fa-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, **SHARED_WINDOW, **FREEZE},
    "sparse-shared-hw1-0.9": {"heads.sparsity": 0.9, **SPARSE, **SHARED_WINDOW, **HEADWISE},
    # freeze_a with A at W's top right singular vectors (lora.init_a = "principal") instead of a random draw:
    # does a frozen A that reads the input directions W already uses cost dense less than 10.6 points?
    "dense-fa-principal": {**FREEZE, "lora.init_a": "principal"},
    "mixed-ng-rolling-fapc-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, "heads.schedule": "rolling", **FREEZE,
                                  "lora.init_a": "principal"},
    # A frozen at the principal directions of its inputs on random tokens (lora.init_a = "input_principal"):
    # bench/frozen_a_subspace.py puts 0.059 of dense's trained update in its row space (W's principal: 0.043)
    "mixed-ng-rolling-fain-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, "heads.schedule": "rolling", **FREEZE,
                                  "lora.init_a": "input_principal"},
    # the two frozen-A gains together: W's principal directions (60 rounds: 0.4633 against 0.4317 random) and
    # rank 16 (30 rounds, random A: 0.4437 against rank 8's 0.4252), upload still 5.4x below dense. Screened out:
    # 0.4487 last round, 0.4301 5-round mean at 30 rounds, against rank 8's 0.4543 / 0.4403
    "mixed-ng-rolling-fapc-r16-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, "heads.schedule": "rolling", **FREEZE,
                                      "lora.init_a": "principal", "lora.rank": 16, "lora.alpha": 32.0},
    # the compute-saving row's survivor (60 rounds, seed 0: 0.4633 against the random frozen A's 0.4317), at 70%
    "mixed-ng-rolling-fapc-0.7": {"heads.sparsity": 0.7, **MIXED_NO_GRAD, "heads.schedule": "rolling", **FREEZE,
                                  "lora.init_a": "principal"},
    # the levers users already have (issue "What a small device should run"), dense heads: fewer local steps
    # (training FLOPs fall with the steps: 8 / 6 = 1.33x, 8 / 5 = 1.6x)
    "dense-steps6": {"federated.local_steps": 6},
    "dense-steps5": {"federated.local_steps": 5},
    # quantised upload with error feedback (federated.upload_bits): upload falls with the bits (+ a float32 scale
    # a group of 64 values)
    "dense-up8": {"federated.upload_bits": 8},
    "dense-up4": {"federated.upload_bits": 4},
    "dense-up2": {"federated.upload_bits": 2},
    # LoRA in the top blocks only (lora.layers): the blocks below run without autograd
    "dense-top3": {"lora.layers": [3, 4, 5]},
    "dense-top4": {"lora.layers": [2, 3, 4, 5]},
    "dense-top5": {"lora.layers": [1, 2, 3, 4, 5]},
    # activation checkpointing: exact (no training needed: tests/test_levers.py), measured by `costs` only
    "dense-ckpt": {"federated.activation_checkpointing": True},
    "dense-sdpa": {"model.attn_implementation": "sdpa"},
    "dense-ckpt-sdpa": {"federated.activation_checkpointing": True, "model.attn_implementation": "sdpa"},
    "dense-top3-ckpt": {"lora.layers": [3, 4, 5], "federated.activation_checkpointing": True},
    "dense-steps5-ckpt": {"federated.local_steps": 5, "federated.activation_checkpointing": True},
    "dense-up2-top4": {"federated.upload_bits": 2, "lora.layers": [2, 3, 4, 5]},
    # the weak device of the mixed federation (bench/heterogeneous.py) on its own, for `budget.py costs`: at most
    # half of dense's peak training memory and of its training FLOPs a round
    "weak-ckpt-steps2": {"federated.activation_checkpointing": True, "federated.local_steps": 2},
    "weak-remove-0.9-ckpt-steps3": {"heads.sparsity": 0.9, "federated.activation_checkpointing": True,
                                    "federated.local_steps": 3},
    "weak-remove-0.9-steps4": {"heads.sparsity": 0.9, "federated.local_steps": 4},
    # the mixed federation (bench/heterogeneous.py): clients c % 4 == 0 capable (5 of 20), the rest weak
    "mixfed-capable-only": {"federated.tier_selectable": [True, False, False, False]},
    "mixfed-weak-heads": {"heads.tiers": [0.0, 0.9, 0.9, 0.9], "federated.activation_checkpointing":
                          [False, True, True, True], "federated.tier_local_steps": [8, 3, 3, 3]},
    "mixfed-weak-ckpt": {"federated.activation_checkpointing": [False, True, True, True],
                         "federated.tier_local_steps": [8, 2, 2, 2]},
    "sparse-rolling-0.9-up4": {"heads.sparsity": 0.9, **SPARSE, "heads.schedule": "rolling",
                               "federated.upload_bits": 4},
}


def record_path(row: str, seed: int, results: Path = RESULTS) -> Path:
    return results / f"{row}.seed{seed}.json"


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


def learning_by_rounds(metrics: list[dict[str, Any]], rounds: int, width: int = 10) -> list[dict[str, Any]]:
    """How fast a run learns, per `width` rounds up to `rounds`: the mean training loss of the round's clients
    and the mean local gain, loss_before - loss_after of each client (the received global model's loss on the
    client's sample minus its trained model's). Less noisy than 1,000-pair accuracy: it shows a row that learns
    slower (e.g. freeze_a's fixed A) before its accuracy can."""
    blocks = []
    for first in range(1, rounds + 1, width):
        last = min(first + width - 1, rounds)
        clients = [c for m in metrics if first <= m.get("round", 0) <= last for c in m["clients"]]
        if not clients:
            continue
        blocks.append({"rounds": f"{first}-{last}",
                       "train_loss": statistics.mean(c["train_loss"] for c in clients),
                       "local_loss_gain": statistics.mean(c["loss_before"] - c["loss_after"] for c in clients)})
    return blocks


def lora_a_row_norm(run_dir: Path) -> float | None:
    """Mean L2 norm of the rows of the global model's LoRA A tensors in the run's last checkpoint (peft's
    Kaiming-uniform init gives sqrt(1/3) ~ 0.58); None when A is frozen (rebuilt from the seed, not stored)."""
    checkpoint = RunDir(run_dir).load_checkpoint()
    if checkpoint is None:
        return None
    norms = [float(t.norm(dim=1).mean()) for k, t in checkpoint.state.items() if ".lora_A." in k]
    return statistics.mean(norms) if norms else None


def make_record(row: str, overrides: dict[str, Any], run_dir: Path, full_eval_file: str) -> dict[str, Any]:
    """The committed summary of one finished run: enough to rebuild the frontier table without rerunning."""
    rd = RunDir(run_dir)
    summary = rd.read_json("summary.json")
    cfg = rd.read_json("config.json")
    metrics = rd.metrics()
    clients = [c for m in metrics if m.get("round", 0) > 0 for c in m["clients"]]
    heads_total = len(clients[0]["head_scores"]) * len(clients[0]["head_scores"][0]) if clients else 0
    kept = [len(c["kept_heads"]) for c in clients]
    step_seconds = [c["train_seconds"] / c["steps"] for c in clients if c.get("steps")]
    peak = [c["peak_memory_bytes"] for c in clients if c.get("peak_memory_bytes") is not None]
    curve = [{"round": m["round"], "accuracy": m["accuracy"]} for m in metrics if "accuracy" in m]
    return {
        "row": row,
        "seed": cfg["seed"],
        "overrides": overrides,
        "rounds": summary["rounds"],
        "tail_average_rounds": cfg["federated"].get("tail_average_rounds", 0),
        "full_eval": rd.read_json(full_eval_file),
        "full_eval_tail_average": (rd.read_json(full_eval_file.replace(".json", ".tail_average.json"))
                                   if (run_dir / full_eval_file.replace(".json", ".tail_average.json")).exists()
                                   else None),
        "full_eval_accuracy_by_round": {int(p.stem.split(".r")[1]): rd.read_json(p.name)["accuracy"]
                                        for p in sorted(run_dir.glob("full_eval.r*.json"))
                                        if "tail_average" not in p.name},
        "full_eval_tail_average_by_round": {int(p.name.split(".")[1][1:]): rd.read_json(p.name)["accuracy"]
                                            for p in sorted(run_dir.glob("full_eval.r*.tail_average.json"))},
        "tail_mean_accuracy_1000": summary["tail_mean_score"],
        "curve_1000": curve,
        "learning_by_10_rounds": learning_by_rounds(metrics, summary["rounds"]),
        "lora_a_row_norm": lora_a_row_norm(run_dir),
        "heads_pruned": 1 - statistics.mean(kept) / heads_total if heads_total else 0.0,
        "distinct_masks": len({tuple(c["kept_heads"]) for c in clients}),
        "train_flops": summary["train_flops"],
        "scoring_flops": summary["scoring_flops"],
        "bytes_up": summary["bytes_up"],
        "bytes_down": summary["bytes_down"],
        "client_step_seconds_median": statistics.median(step_seconds) if step_seconds else None,
        "client_peak_memory_bytes_median": statistics.median(peak) if peak else None,
    }


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


def refresh(results: Path, runs: Path = RUNS) -> list[Path]:
    """Rewrite the records in `results` from their run folders (after the record gains a field), where the folder
    still holds the run the record describes: same rounds (a screen's folder extended to 60 rounds is not)."""
    written = []
    for path in sorted(results.glob("*.seed*.json")):
        record = json.loads(path.read_text())
        run_dir = runs / f"seed{record['seed']}" / record["row"]
        name = f"full_eval.r{record['rounds']}.json"
        if not (run_dir / "summary.json").exists() or not (run_dir / name).exists():
            continue
        if RunDir(run_dir).read_json("summary.json")["rounds"] != record["rounds"]:
            continue
        path.write_text(json.dumps(make_record(record["row"], record["overrides"], run_dir, name), indent=1) + "\n")
        written.append(path)
    return written


def measure_costs(rows: list[str], repeats: int, threads: int, client: int = 0, round_: int = 1,
                  seed: int = 0) -> dict[str, Any]:
    """Client round time, seconds per local step and peak training memory of each row (module docstring): the
    same client (`client` of the seed's partition) in round `round_`, from the row's initial global state, each
    row in turn, `repeats` times; medians of the timings."""
    import platform

    import torch

    from fedhead.federated.client import client_update
    from fedhead.federated.state import trainable_state
    from fedhead.models import build_model
    from fedhead.runners.local import Simulation

    base = load_config(BASE, {**PROTOCOL, "seed": seed, "threads": threads})
    sim = Simulation.setup(base)
    data = sim.client_data(client)
    built = {}
    for row in rows:
        cfg = load_config(BASE, {**ROWS[row], **PROTOCOL, "seed": seed, "threads": threads})
        lm = build_model(cfg, sim.data.num_labels, sim.lm.tokenizer)
        built[row] = (cfg, lm, trainable_state(lm.model))
    seconds: dict[str, list[float]] = {row: [] for row in rows}
    step: dict[str, list[float]] = {row: [] for row in rows}
    memory: dict[str, int] = {}
    for repeat in range(repeats + 1):  # the first pass warms up and is not timed
        for row in rows:
            cfg, lm, state = built[row]
            start = time.perf_counter()
            update = client_update(lm, state, data, cfg, client, round_)
            elapsed = time.perf_counter() - start
            memory[row] = int(update.stats["peak_memory_bytes"])
            if repeat:
                seconds[row].append(elapsed)
                step[row].append(update.timings["train_seconds"] / update.stats["steps"])
        print(f"  costs: pass {repeat} of {repeats} done", flush=True)
    return {
        "protocol": {"client": client, "round": round_, "seed": seed, "examples": len(data), "repeats": repeats,
                     "threads": threads, "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                     "processor": platform.processor() or platform.platform()},
        "rows": {row: {"client_round_seconds_median": statistics.median(seconds[row]),
                       "client_step_seconds_median": statistics.median(step[row]),
                       "peak_memory_bytes": memory[row]} for row in rows},
    }


def merge_costs(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """`new`'s rows added to `old`'s, so measuring a few new rows keeps the others: only when both batches
    measured the same client the same way (protocol) and dense is in `new`. Every ratio is to dense of the same
    batch, so the old rows are rescaled by the ratio of the two batches' dense times (memory is deterministic
    and kept as is); a different protocol replaces the file."""
    if old is None or old.get("protocol") != new["protocol"] or "dense" not in old.get("rows", {}):
        return new
    scale = {key: new["rows"]["dense"][key] / old["rows"]["dense"][key]
             for key in ("client_round_seconds_median", "client_step_seconds_median")}
    rows = {row: {key: value * scale.get(key, 1.0) for key, value in values.items()}
            for row, values in old["rows"].items() if row not in new["rows"]}
    return {"protocol": new["protocol"], "rows": {**new["rows"], **rows},
            "batches": old.get("batches", 1) + 1}


def t_quantile(n: int) -> float:
    """Two-sided 95% Student t quantile with n - 1 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def paired_drop(dense: Any, row: Any) -> tuple[float, float, float, float]:
    """Points lost against dense, paired by seed: d_s = 100 (dense_s - row_s); the mean of d, its sd and the 95% t
    interval mean -/+ t(0.975, n - 1) sd / sqrt(n) (sd and interval NaN for one seed)."""
    drops = 100 * (np.asarray(dense, dtype=float) - np.asarray(row, dtype=float))
    n = len(drops)
    sd = float(np.std(drops, ddof=1)) if n > 1 else math.nan
    half = t_quantile(n) * sd / math.sqrt(n) if n > 1 else math.nan
    mean = float(drops.mean())
    return mean, sd, mean - half, mean + half


def load_records(results: Path) -> dict[str, dict[int, dict[str, Any]]]:
    by_row: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(results.glob("*.json")):
        r = json.loads(path.read_text())
        by_row.setdefault(r["row"], {})[r["seed"]] = r
    return by_row


def frontier_rows(results: Path, costs: Path = COSTS, dense_from: Path | None = None) -> list[dict[str, Any]]:
    """Per row: seeds paired with dense, the full-set accuracy, the paired drop (mean, sd, 95% interval), the
    run totals (FLOPs, bytes) as ratios dense / row (above 1: the row saves) averaged over the paired seeds, and
    the client time and memory ratios of the controlled measurement in `costs` (None where it lacks the row).
    `dense_from`: another records folder whose dense records pair with these rows (the mixed federation's)."""
    records = load_records(results)
    if dense_from is not None:
        records["dense"] = load_records(dense_from).get("dense", {})
    measured = json.loads(costs.read_text())["rows"] if costs.exists() else {}

    def cost_ratio(row: str, key: str) -> float | None:
        if row not in measured or "dense" not in measured:
            return None
        return measured["dense"][key] / measured[row][key]

    dense = records.get("dense", {})
    out = []
    for row, by_seed in records.items():
        seeds = sorted(s for s in by_seed if s in dense)
        if not seeds:
            continue
        # the tail-averaged model when every paired run has one, else every run's last-round model
        tail = all(r.get("full_eval_tail_average") for s in seeds for r in (by_seed[s], dense[s]))
        key = "full_eval_tail_average" if tail else "full_eval"
        acc = np.array([by_seed[s][key]["accuracy"] for s in seeds])
        drop, sd, low, high = paired_drop([dense[s][key]["accuracy"] for s in seeds], acc)

        def ratio(key: str, seeds: list[int] = seeds, by_seed: dict = by_seed) -> float | None:
            pairs = [(dense[s].get(key), by_seed[s].get(key)) for s in seeds]
            if any(d is None or r in (None, 0) for d, r in pairs):
                return None
            return float(np.mean([d / r for d, r in pairs]))

        first = by_seed[seeds[0]]
        averaged = [by_seed[s].get("full_eval_tail_average") for s in seeds]
        out.append({
            "row": row, "seeds": seeds, "overrides": first["overrides"], "heads_pruned": first["heads_pruned"],
            "model": f"mean of last {first.get('tail_average_rounds')} rounds" if tail else "last round",
            "accuracy": float(acc.mean()), "drop": drop, "drop_sd": sd,
            # the row's own tail-averaged model, recorded or not for dense (a screen's second column)
            "tail_accuracy": (float(np.mean([a["accuracy"] for a in averaged])) if all(averaged) else None),
            "drop_low": low, "drop_high": high,
            "flops_saved": ratio("train_flops"), "upload_saved": ratio("bytes_up"),
            "download_saved": ratio("bytes_down"),
            "round_time_saved": cost_ratio(row, "client_round_seconds_median"),
            "step_time_saved": cost_ratio(row, "client_step_seconds_median"),
            "memory_saved": cost_ratio(row, "peak_memory_bytes"),
        })
    return sorted(out, key=lambda r: (r["row"] != "dense", r["drop"]))


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def table(results: Path, costs: Path = COSTS, tail_column: bool = False,
          only: Collection[str] | None = None) -> str:
    """The frontier table in Markdown; `tail_column` adds the row's mean-of-last-rounds model where its runs
    recorded one (screens: dense's 30-round screen has none, so the paired drop stays on the last round); `only`
    keeps just those rows (docs/head_pruning.md's copy: PROTOCOL_ROWS)."""
    tail_header = "| mean of last 5 rounds' models (unpaired) " if tail_column else ""
    lines = ["| row | options | heads pruned | seeds | model scored | accuracy (9,815 pairs) " + tail_header +
             "| drop vs dense, paired (pt) "
             "| 95% interval | training FLOPs saved | upload saved | download saved | client round time saved "
             "| local step time saved | peak training memory saved |",
             "|" + "---|" * (15 if tail_column else 14)]
    for r in frontier_rows(results, costs):
        if only is not None and r["row"] not in only:
            continue
        opts = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["overrides"].items()) or "-"
        interval = "-" if math.isnan(r["drop_low"]) else f"[{r['drop_low']:+.1f}, {r['drop_high']:+.1f}]"
        sd = "" if math.isnan(r["drop_sd"]) else f" ± {r['drop_sd']:.1f}"
        tail = ("-" if r["tail_accuracy"] is None else f"{r['tail_accuracy']:.4f}") + " | " if tail_column else ""
        lines.append(f"| {r['row']} | {opts} | {r['heads_pruned']:.0%} | {len(r['seeds'])} | {r['model']} | "
                     f"{r['accuracy']:.4f} | {tail}"
                     f"{r['drop']:+.1f}{sd} | {interval} | {_x(r['flops_saved'])} | {_x(r['upload_saved'])} | "
                     f"{_x(r['download_saved'])} | {_x(r['round_time_saved'])} | {_x(r['step_time_saved'])} | "
                     f"{_x(r['memory_saved'])} |")
    return "\n".join(lines)


def convergence(results: Path) -> str:
    """Dense's full-set accuracy on the way to its last round, per seed (CONVERGENCE_ROUNDS), and the mean change
    over the last stretch: how the benchmark checks that dense has converged."""
    dense = load_records(results).get("dense", {})
    lines, last_steps = [], []
    for seed, r in sorted(dense.items()):
        averaged = {int(k): v for k, v in (r.get("full_eval_tail_average_by_round") or {}).items()}
        last = {int(k): v for k, v in r.get("full_eval_accuracy_by_round", {}).items()}
        by_round = averaged if len(averaged) >= 2 else last  # the tail averages when there are several
        if len(by_round) < 2:
            continue
        rounds = sorted(by_round)
        model = "mean of the last rounds" if by_round is averaged else "last-round model"
        lines.append(f"seed {seed} ({model}): " + ", ".join(f"round {k} {by_round[k]:.4f}" for k in rounds))
        last_steps.append((rounds[-2], rounds[-1], 100 * (by_round[rounds[-1]] - by_round[rounds[-2]])))
    if not lines:
        return "Convergence: no dense run has full-set scores at two rounds yet."
    change = statistics.mean(d for _, _, d in last_steps)
    spans = sorted({f"{a} to {b}" for a, b, _ in last_steps})
    return ("Convergence, dense on all 9,815 pairs: " + "; ".join(lines) + f". Mean change from round "
            f"{' / '.join(spans)}: {change:+.1f} points.")


# a change against its baseline, paired by seed: (row, baseline). The rolling schedule against top-k heads, and
# 70% against 90% head sparsity (what pruning fewer heads buys back) for the two rows that have both.
CONTRASTS = (("sparse-rolling-0.9", "sparse-0.9"), ("sparse-rolling-0.7", "sparse-rolling-0.9"),
             ("mixed-ng-rolling-fapc-0.7", "mixed-ng-rolling-fapc-0.9"))


def contrasts(results: Path, pairs: tuple[tuple[str, str], ...] = CONTRASTS) -> str:
    """Each mechanism row against its baseline row, paired by seed on the tail-averaged full-set accuracy: the
    baseline's drop minus the row's (`paired_drop(row, baseline)`: above 0, the mechanism gains), per seed, with
    mean, sd and 95% t interval."""
    records, lines = load_records(results), []
    for row, baseline in pairs:
        seeds = sorted(set(records.get(row, {})) & set(records.get(baseline, {})))
        if len(seeds) < 2:
            continue
        acc = {name: [records[name][s]["full_eval_tail_average"]["accuracy"] for s in seeds]
               for name in (row, baseline)}
        gain, sd, low, high = paired_drop(acc[row], acc[baseline])
        each = ", ".join(f"{100 * (a - b):.1f}" for a, b in zip(acc[row], acc[baseline], strict=True))
        lines.append(f"`{row}` against `{baseline}`, paired by seed ({', '.join(map(str, seeds))}): {gain:+.1f} "
                     f"points ({each}; sd {sd:.1f}, 95% [{low:+.1f}, {high:+.1f}]).")
    return " ".join(lines)


def figure(results: Path, out: Path, title: str) -> Path:
    """Accuracy drop (with its 95% interval when a row has several seeds) against the training FLOPs and the
    upload bytes each row needs, as fractions of dense's (dense at (1, 0)); one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = frontier_rows(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "flops_saved", "training FLOPs (fraction of dense)"),
                           (axes[1], "upload_saved", "upload bytes (fraction of dense)")):
        for r in rows:
            if r[key] is None:
                continue
            x = 1 / r[key]
            err = None if math.isnan(r["drop_low"]) else [[r["drop"] - r["drop_low"]], [r["drop_high"] - r["drop"]]]
            ax.errorbar([x], [r["drop"]], yerr=err, fmt="o", capsize=3)
            ax.annotate(r["row"], (x, r["drop"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(2.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy drop vs dense, points (paired)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def status(results: Path = RESULTS, runs: Path = RUNS, seeds: tuple[int, ...] = (0, 1, 2)) -> str:
    """What the protocol still needs: each protocol row's recorded seeds and missing ones, and every run folder
    without a record with its progress (rounds done of its total, the median seconds a round took over its last
    5 rounds, from metrics.jsonl, and the rounds' time left at that pace, full-set scoring not included)."""
    records = load_records(results)
    lines = ["| protocol row | seeds recorded | missing |", "|---|---|---|"]
    for row in PROTOCOL_ROWS:
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


def _update_readme(name: str, text: str, page: Path = ROOT / "docs" / "head_pruning.md") -> None:
    """Rewrite a page's copy of a table (docs/head_pruning.md: the frontier's), between `<!-- NAME:start -->` and
    `<!-- NAME:end -->`."""
    readme = page
    content = readme.read_text()
    start, end = f"<!-- {name}:start -->\n", f"\n<!-- {name}:end -->"
    if start in content and end in content:
        head, rest = content.split(start, 1)
        readme.write_text(head + start + text + end + rest.split(end, 1)[1])


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
                               measure_costs(rows, args.repeats, args.threads))
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
        for results, name, title in (
                (RESULTS, "frontier", "Frontier: 60 rounds, mean of the last 5 rounds' global models on 9,815 "
                 "pairs, 95% interval over seeds"),
                (RESULTS.parent / "screen30", "screen30",
                 "Screening: 30 rounds, one seed, last-round model on 9,815 pairs")):
            text = (table(results, tail_column=name == "screen30") if results.exists()
                    else "No run has finished the full protocol yet.")
            short = text
            if name == "frontier" and results.exists():
                text += "\n\n" + convergence(results) + "\n\n" + contrasts(results)
                short = (table(results, only=PROTOCOL_ROWS) + "\n\nThe decomposition rows (A frozen on dense, and "
                         "the like) are in [results/frontier.md](results/frontier.md). " +
                         convergence(results))
            (RESULTS.parent / f"{name}.md").write_text(text + "\n")
            if results.exists():
                figure(results, ROOT / "docs" / f"{name}.png", title)
                _update_readme(name, short)
            print(f"{name}:\n{text}")


if __name__ == "__main__":
    main()
