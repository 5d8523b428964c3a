"""The frontier's statistics (bench/frontier.py), from the records alone: each row's accuracy drop against dense,
paired by seed (d_s = 100 (dense_s - row_s); mean, sd and 95% t interval over seeds), its savings as ratios
dense / row, dense's convergence and the contrasts of a mechanism with its baseline row."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from frontier_protocol import COSTS
from frontier_records import load_records


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
