"""Federated MultiNLI accuracy at head sparsity 0 / 0.5 / 0.7 / 0.9 for each pruning mode, importance, scope
and pooling: the measurement that decides the method's defaults (issue "Keep the accuracy at 90% head
sparsity"). Every row uses the same seed, clients, rounds and local steps; only the named options differ.

    python bench/sparsity_sweep.py                  # all rows, results in bench/results/sweep/
    python bench/sparsity_sweep.py --rows dense remove-conf-0.9 --rounds 4   # a subset, shorter
    python bench/sparsity_sweep.py --table-only     # rebuild the table from finished runs

Rows already finished (summary.json present) are not run again; an interrupted row resumes from its
checkpoint. The table is written to bench/results/sweep/table.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fedhead.config import load_config
from fedhead.runners.local import run_simulation

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "sweep_base.toml"


def _row(name: str, **overrides: Any) -> tuple[str, dict[str, Any]]:
    return name, overrides


ROWS: list[tuple[str, dict[str, Any]]] = [
    _row("dense"),
    *[_row(f"remove-conf-{s}", **{"heads.sparsity": s}) for s in (0.5, 0.7, 0.9)],
    *[_row(f"sparse-conf-{s}", **{"heads.sparsity": s, "heads.mode": "train_sparse"}) for s in (0.5, 0.7, 0.9)],
    _row("remove-random-0.9", **{"heads.sparsity": 0.9, "heads.importance": "random"}),
    _row("remove-gradient-0.9", **{"heads.sparsity": 0.9, "heads.importance": "gradient"}),
    _row("remove-conf-alltokens-0.9", **{"heads.sparsity": 0.9, "heads.exclude_special_tokens": False}),
    _row("remove-conf-perblock-0.9", **{"heads.sparsity": 0.9, "heads.scope": "per_block"}),
    _row("remove-conf-0.9-lr1e-3", **{"heads.sparsity": 0.9, "federated.learning_rate": 1e-3}),
    _row("dense-cls", **{"model.pooling": "cls"}),
    _row("remove-conf-0.9-cls_raw", **{"heads.sparsity": 0.9, "model.pooling": "cls_raw"}),
    _row("sparse-conf-0.9-headweighted", **{"heads.sparsity": 0.9, "heads.mode": "train_sparse",
                                            "federated.aggregation": "head_weighted"}),
    _row("full-remove-0.9", **{"heads.sparsity": 0.9, "federated.aggregation": "head_weighted",
                               "federated.selection": "loss_gap"}),
    _row("full-remove-0.9-freeze_a", **{"heads.sparsity": 0.9, "federated.aggregation": "head_weighted",
                                        "federated.selection": "loss_gap", "lora.freeze_a": True}),
    _row("dense-freeze_a", **{"lora.freeze_a": True}),
]


def describe(cfg) -> dict[str, Any]:
    h = cfg.heads
    return {"sparsity": h.sparsity, "mode": h.mode if h.sparsity else "-",
            "importance": (h.importance + ("" if h.exclude_special_tokens else " (all tokens)")) if h.sparsity else "-",
            "scope": h.scope if h.sparsity else "-", "pooling": cfg.model.pooling,
            "lr": cfg.federated.learning_rate, "aggregation": cfg.federated.aggregation,
            "selection": cfg.federated.selection, "freeze_a": cfg.lora.freeze_a}


def table(out: Path, names: list[str]) -> str:
    lines = ["| row | sparsity | mode | importance | scope | pooling | lr | aggregation | selection | freeze A "
             "| final acc | best acc | vs dense | train TFLOPs | upload MB | download MB |", "|" + "---|" * 16]
    dense = None
    if (out / "dense" / "summary.json").exists():
        dense = json.loads((out / "dense" / "summary.json").read_text())["final_accuracy"]
    for name in names:
        path = out / name / "summary.json"
        if not path.exists():
            continue
        s = json.loads(path.read_text())
        d = json.loads((out / name / "row.json").read_text())
        drop = f"{100 * (s['final_accuracy'] - dense):+.1f} pt" if dense is not None else "-"
        lines.append(
            f"| {name} | {d['sparsity']} | {d['mode']} | {d['importance']} | {d['scope']} | {d['pooling']} | "
            f"{d['lr']:g} | {d['aggregation']} | {d.get('selection', 'random')} | {d.get('freeze_a', False)} | "
            f"{s['final_accuracy']:.3f} | {s['best_accuracy']:.3f} | {drop} | "
            f"{s['train_flops'] / 1e12:.1f} | {s['bytes_up'] / 1e6:.1f} | {s['bytes_down'] / 1e6:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=None, help="Names of rows to run (default: all).")
    parser.add_argument("--rounds", type=int, default=None, help="Override the rounds of every row.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sweep")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    rows = [(n, o) for n, o in ROWS if args.rows is None or n in args.rows]
    unknown = set(args.rows or []) - {n for n, _ in ROWS}
    if unknown:
        parser.error(f"unknown rows: {sorted(unknown)}; known: {[n for n, _ in ROWS]}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, overrides in ([] if args.table_only else rows):
        run_dir = args.out / name
        if (run_dir / "summary.json").exists():
            continue
        extra = {"federated.rounds": args.rounds} if args.rounds else {}
        cfg = load_config(BASE, {**overrides, **extra, "run_name": name, "out": str(args.out)})
        start = time.perf_counter()
        resume = (run_dir / "checkpoint.safetensors").exists()
        summary = run_simulation(cfg, run_dir, resume=resume)
        (run_dir / "row.json").write_text(json.dumps(describe(cfg)))
        print(f"{name}: final accuracy {summary['final_accuracy']:.3f} in {time.perf_counter() - start:.0f} s",
              flush=True)
    text = table(args.out, [n for n, _ in ROWS])
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
