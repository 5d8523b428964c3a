"""Federated MultiNLI accuracy at head sparsity 0 / 0.5 / 0.7 / 0.9 for each pruning mode, importance, scope
and pooling: the measurement that decides the method's defaults (issue "Keep the accuracy at 90% head
sparsity"). Every row uses the same seed, clients and rounds; only the named options differ.

    python bench/sparsity_sweep.py                  # all rows, results in bench/results/paper/
    python bench/sparsity_sweep.py --rows dense confidence-0.9   # a subset
    python bench/sparsity_sweep.py --table-only     # rebuild the table from finished runs
    python bench/sparsity_sweep.py --rounds 60 --out bench/results/paper60 --extend-from bench/results/paper
                                                    # 60 rounds, each row continuing its 30-round run
    python bench/sparsity_sweep.py --seed 1 --out bench/results/paper-seed1 --rows dense confidence-0.9
    python bench/sparsity_sweep.py --across-seeds bench/results/paper bench/results/paper-seed1   # seeds.md

Rows already finished (summary.json present) are not run again; an interrupted row resumes from its
checkpoint. The table is written to bench/results/paper/sweep.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, run_rows

from fedhead.config import Config
from fedhead.report import Run, heads_pruned

BASE = ROOT / "configs" / "paper_base.toml"
SPARSE = {"heads.mode": "train_sparse"}
FULL = {"federated.aggregation": "head_weighted", "federated.selection": "loss_gap"}

# Rows named like bench/paper_comparison.py's share its runs (same base, same folder): each is run once.
# The base prunes per block (the best scope measured); ordered by how much each row tells.
ROWS: list[tuple[str, dict[str, Any]]] = [
    ("dense", {}),
    *[(f"confidence-{s}", {"heads.sparsity": s}) for s in (0.5, 0.7, 0.9)],
    ("random-0.9", {"heads.sparsity": 0.9, "heads.importance": "random"}),
    *[(f"full-{s}", {"heads.sparsity": s, **FULL}) for s in (0.5, 0.7, 0.9)],
    ("full-0.9-freeze_a", {"heads.sparsity": 0.9, **FULL, "lora.freeze_a": True}),
    ("sparse-confidence-0.9", {"heads.sparsity": 0.9, **SPARSE}),
    ("sparse-random-0.9", {"heads.sparsity": 0.9, "heads.importance": "random", **SPARSE}),
    ("confidence-global-0.9", {"heads.sparsity": 0.9, "heads.scope": "global"}),
    ("gradient-0.9", {"heads.sparsity": 0.9, "heads.importance": "gradient"}),
    ("confidence-alltokens-0.9", {"heads.sparsity": 0.9, "heads.exclude_special_tokens": False}),
    ("dense-cls_raw", {"model.pooling": "cls_raw"}),
    ("confidence-0.9-cls_raw", {"heads.sparsity": 0.9, "model.pooling": "cls_raw"}),
    ("dense-cls", {"model.pooling": "cls"}),  # the checkpoint's pooler over [CLS], frozen
    ("confidence-0.9-cls", {"heads.sparsity": 0.9, "model.pooling": "cls"}),
    ("dense-cls-train_pooler", {"model.pooling": "cls", "model.train_pooler": True}),
    ("sparse-confidence-0.5", {"heads.sparsity": 0.5, **SPARSE}),
    ("sparse-confidence-0.7", {"heads.sparsity": 0.7, **SPARSE}),
    ("confidence-0.9-lr1e-3", {"heads.sparsity": 0.9, "federated.learning_rate": 1e-3}),
    ("confidence-0.9-lr1e-2", {"heads.sparsity": 0.9, "federated.learning_rate": 1e-2}),
    ("sparse-confidence-0.9-lr1e-2", {"heads.sparsity": 0.9, **SPARSE, "federated.learning_rate": 1e-2}),
    ("dense-lr1e-2", {"federated.learning_rate": 1e-2}),
    ("confidence-0.9-steps12", {"heads.sparsity": 0.9, "federated.local_steps": 12}),  # about dense's FLOPs
    ("dense-lr1e-3", {"federated.learning_rate": 1e-3}),
    ("dense-freeze_a", {"lora.freeze_a": True}),
    ("confidence-0.9-mean", {"heads.sparsity": 0.9, "heads.compensate": "mean"}),
    ("mixed-0.9-c0.5", {"heads.sparsity": 0.9, "heads.mode": "mixed", "heads.compute_sparsity": 0.5}),
    ("mixed-0.9-c0.7", {"heads.sparsity": 0.9, "heads.mode": "mixed", "heads.compute_sparsity": 0.7}),
    ("dense-ffn", {"lora.target_modules": ["query", "value", "feed_forward"]}),
    ("confidence-0.9-ffn", {"heads.sparsity": 0.9, "lora.target_modules": ["query", "value", "feed_forward"]}),
    ("sample-0.9", {"heads.sparsity": 0.9, "heads.selection": "sample"}),
]


def describe(cfg) -> dict[str, Any]:
    h = cfg.heads
    mode = h.mode + (" + mean" if h.mode != "train_sparse" and h.compensate == "mean" else "")
    if h.mode == "mixed":
        mode += f" (removes {min(h.compute_sparsity, h.sparsity):g})"
    if h.selection == "sample":
        mode += f", sampled (T={h.temperature:g})"
    pooling = cfg.model.pooling + (" (pooler trained)" if cfg.model.train_pooler else "")
    return {"sparsity": h.sparsity, "mode": mode if h.sparsity else "-",
            "importance": (h.importance + ("" if h.exclude_special_tokens else " (all tokens)")) if h.sparsity else "-",
            "scope": h.scope if h.sparsity else "-", "pooling": pooling,
            "lr": cfg.federated.learning_rate, "steps": cfg.federated.local_steps,
            "aggregation": cfg.federated.aggregation,
            "selection": cfg.federated.selection,
            "lora": ",".join({"query": "q", "key": "k", "value": "v", "output": "o", "feed_forward": "ffn"}[t]
                             for t in cfg.lora.target_modules) + (" (A frozen)" if cfg.lora.freeze_a else "")}


def table(out: Path, names: list[str]) -> str:
    """The sweep's Markdown table; rows are compared on the mean of their last 5 evaluations (see fedhead.report)."""
    lines = ["| row | sparsity | mode | importance | scope | pooling | lr | local steps | aggregation | selection "
             "| LoRA | heads pruned | distinct masks | final acc | best acc | mean of last 5 evals | vs dense "
             "| train TFLOPs | upload MB | download MB |",
             "|" + "---|" * 20]
    dense = None
    if (out / "dense" / "summary.json").exists():
        dense = json.loads((out / "dense" / "summary.json").read_text())["tail_mean_score"]
    for name in names:
        path = out / name / "summary.json"
        if not path.exists():
            continue
        s = json.loads(path.read_text())
        run = Run.load(out / name)
        d = describe(Config.model_validate(run.config))
        drop = f"{100 * (s['tail_mean_score'] - dense):+.1f} pt" if dense is not None else "-"
        masks = {tuple(c["kept_heads"]) for m in run.rounds for c in m["clients"]}
        lines.append(
            f"| {name} | {d['sparsity']} | {d['mode']} | {d['importance']} | {d['scope']} | {d['pooling']} | "
            f"{d['lr']:g} | {d['steps']} | {d['aggregation']} | {d['selection']} | {d['lora']} | "
            f"{heads_pruned(run):.0%} | {len(masks)} of {sum(len(m['clients']) for m in run.rounds)} | "
            f"{s['final_accuracy']:.3f} | {s['best_accuracy']:.3f} | {s['tail_mean_score']:.3f} | {drop} | "
            f"{s['train_flops'] / 1e12:.1f} | {s['bytes_up'] / 1e6:.1f} | {s['bytes_down'] / 1e6:.1f} |")
    return "\n".join(lines)


def seeds_table(dirs: list[Path], names: list[str]) -> str:
    """Rows finished in every folder of `dirs` (one seed each): each seed's mean of the last 5 evaluations,
    their mean and standard deviation, and the drop against the same seed's dense row (paired)."""
    def score(d: Path, name: str) -> float | None:
        path = d / name / "summary.json"
        return json.loads(path.read_text())["tail_mean_score"] if path.exists() else None

    seeds = [json.loads((d / "dense" / "config.json").read_text())["seed"] for d in dirs]
    lines = ["| row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | drop vs dense, paired: mean ± sd |",
             "|" + "---|" * (len(dirs) + 3)]
    dense = [score(d, "dense") for d in dirs]
    for name in names:
        scores = [score(d, name) for d in dirs]
        if any(v is None for v in scores + dense):
            continue
        drops = 100 * (np.array(scores) - np.array(dense))
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in scores) + f" | {np.mean(scores):.3f} ± "
                     f"{np.std(scores, ddof=1):.3f} | {np.mean(drops):+.1f} ± {np.std(drops, ddof=1):.1f} pt |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=None, help="Names of rows to run, in this order (default: all).")
    parser.add_argument("--rounds", type=int, default=None, help="Override the rounds of every row.")
    parser.add_argument("--seed", type=int, default=None, help="Override the seed of every row (use another --out).")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "paper")
    parser.add_argument("--extend-from", type=Path, default=None,
                        help="Start each row from its finished run in this folder (same config, fewer rounds).")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--across-seeds", nargs="+", type=Path, default=None, metavar="DIR",
                        help="Only write OUT/seeds.md: the rows finished in every DIR (one seed each) side by side.")
    args = parser.parse_args()
    known = dict(ROWS)
    rows = [(n, known[n]) for n in args.rows if n in known] if args.rows else ROWS  # in the order asked
    unknown = set(args.rows or []) - {n for n, _ in ROWS}
    if unknown:
        parser.error(f"unknown rows: {sorted(unknown)}; known: {[n for n, _ in ROWS]}")
    if args.across_seeds:
        text = seeds_table(args.across_seeds, [n for n, _ in ROWS])
        (args.out / "seeds.md").write_text(text + "\n")
        print(text)
        return
    if not args.table_only:
        extra = {k: v for k, v in {"federated.rounds": args.rounds, "seed": args.seed}.items() if v is not None}
        run_rows(BASE, rows, args.out, extra, args.extend_from)
    text = table(args.out, [n for n, _ in ROWS])
    (args.out / "sweep.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
