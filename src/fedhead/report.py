"""`fedhead report`: compare runs by their trade-off of accuracy against bytes, compute and time.

Reads each run directory's `config.json` and `metrics.jsonl` and writes a Markdown table and PNG plots. The
dense baseline is the run with sparsity 0 and FedAvg aggregation (or the one named with `--baseline`). Runs are
compared on the mean of their last 5 evaluations, or of all of them when a run has fewer (with a few label-skewed
clients a round, a single evaluation swings by several points); the target accuracy defaults to the baseline's
mean minus 2 points. The table says when a mean is over fewer than 5 evaluations.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedhead.config import ConfigError
from fedhead.run_dir import CONFIG, METRICS, RunDir, refuse_run_file
from fedhead.run_metrics import TAIL, headline_metric, tail_mean


class ReportError(ValueError):
    """A run directory that cannot be reported."""


@dataclass
class Run:
    """One run's config and per-round metrics, with cumulative costs per round."""

    path: Path
    config: dict[str, Any]
    rounds: list[dict[str, Any]]
    initial: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Run:
        rd = RunDir(path)
        if not rd.metrics_file.is_file() or not rd.config_file.is_file():
            raise ReportError(f"{path} is not a run directory ({CONFIG} and {METRICS} needed)")
        try:
            config = rd.read_config_json()  # not validated: a run of an older fedhead is reported as it ran
        except ConfigError as err:
            raise ReportError(str(err)) from None
        try:
            lines = rd.metrics()
        except (ValueError, UnicodeError) as err:
            raise ReportError(f"{path}: unreadable run files ({type(err).__name__}: {err})") from None
        if not all(isinstance(config.get(s), dict) for s in CONFIG_SECTIONS):
            raise ReportError(f"{rd.config_file} is not a fedhead config")
        for number, line in enumerate(lines, 1):
            problem = _metrics_line_problem(line)
            if problem is not None:
                raise ReportError(f"{rd.metrics_file} line {number} is not a fedhead metrics line: {problem}")
        rounds = [m for m in lines if m["round"] > 0]
        if not rounds:
            held = "is empty" if not lines else "holds only round 0 (the initial evaluation)"
            raise ReportError(f"{path} has no finished round to report: its {METRICS} {held}")
        initial = next((m for m in lines if m["round"] == 0), {})
        return cls(path, config, rounds, initial)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def sparsity(self) -> float:
        heads = self.config["heads"]
        return max(heads.get("tiers") or [heads["sparsity"]])

    @property
    def method(self) -> str:
        fed, heads = self.config["federated"], self.config["heads"]
        base = "dense" if self.sparsity == 0 else f"{heads['importance']} {heads['mode']}"
        extras = [fed["aggregation"], fed["selection"]]
        if self.config["lora"].get("freeze_a"):
            extras.append("freeze A")
        return f"{base} ({', '.join(extras)})"

    def metric_key(self) -> str:
        """The run's headline metric: accuracy for classification, else its first generation metric."""
        return headline_metric(self.config)

    @property
    def metric_keys(self) -> list[str]:
        """Every metric the run evaluated, headline first."""
        if self.config["model"].get("task", "classification") == "classification":
            return ["accuracy"]
        return list(self.config["generation"]["metrics"])

    @property
    def points(self) -> float:
        """Points per unit of the headline metric: 100 for a [0, 1] accuracy, 1 for 0-100 scores."""
        return 100.0 if self.metric_key() == "accuracy" else 1.0

    def curve(self, x: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, metric) at evaluated rounds; x in round, bytes_up, bytes_total, train_flops, seconds."""
        key = self.metric_key()
        xs, ys, total = [], [], 0.0
        if key in self.initial:
            xs.append(0.0)
            ys.append(self.initial[key])
        for m in self.rounds:
            total += {"round": 1.0, "bytes_up": m["bytes_up"], "bytes_total": m["bytes_up"] + m["bytes_down"],
                      "train_flops": m["train_flops"], "seconds": _round_seconds(m)}[x]
            if key in m:
                xs.append(total if x != "round" else m["round"])
                ys.append(m[key])
        return np.asarray(xs), np.asarray(ys)


CONFIG_SECTIONS = ("model", "heads", "federated", "lora")  # what the report reads of a run's config.json
ROUND_TOTALS = ("bytes_up", "bytes_down", "train_flops")  # what it sums over a run's rounds


def _metrics_line_problem(line: Any) -> str | None:
    """What is wrong with one line of metrics.jsonl for the report, or None: an object with an integer round
    >= 0 and, after round 0, the round's totals as numbers."""
    if not isinstance(line, dict):
        return f"a JSON {type(line).__name__}, not an object"
    r = line.get("round")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        return f"round {str(r)[:20]!r} is not an integer >= 0"
    for key in ROUND_TOTALS if r > 0 else ():
        value = line.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"round {r} has no number {key}"
    clients = line.get("clients", [])
    if not isinstance(clients, list) or not all(isinstance(c, dict) for c in clients):
        return f"round {r}'s clients are not a list of objects"
    return None


def _round_seconds(m: dict[str, Any]) -> float:
    return sum(v for k, v in m.items() if k.startswith("seconds_") and isinstance(v, int | float))


def _to_target(run: Run, target: float) -> dict[str, Any] | None:
    """Rounds, bytes, FLOPs and seconds spent until the first evaluation at or above `target`."""
    key = run.metric_key()
    spent = {"rounds": 0, "bytes": 0, "train_flops": 0, "seconds": 0.0}
    for m in run.rounds:
        spent["rounds"] = m["round"]
        spent["bytes"] += m["bytes_up"] + m["bytes_down"]
        spent["train_flops"] += m["train_flops"]
        spent["seconds"] += _round_seconds(m)
        if m.get(key, -np.inf) >= target:
            return spent
    return None


def summarize_runs(runs: list[Run], baseline: Run | None, target: float | None) -> list[dict[str, Any]]:
    """One row per run with accuracy, costs, advantages over the baseline and costs to reach `target`."""
    rows = []
    base_tot, base_tail = None, None
    if baseline is not None:
        base_tot = {k: sum(m[k] for m in baseline.rounds) for k in ("bytes_up", "bytes_down", "train_flops")}
        base_tail = _tail_mean(baseline)
    for run in runs:
        key = run.metric_key()
        evaluated = [m[key] for m in run.rounds if key in m]
        tot = {k: sum(m[k] for m in run.rounds) for k in ("bytes_up", "bytes_down", "train_flops")}
        row: dict[str, Any] = {
            "run": run.name, "method": run.method, "sparsity": run.sparsity, "metric": key,
            "final": evaluated[-1] if evaluated else None, "best": max(evaluated) if evaluated else None,
            "tail_mean": float(np.mean(evaluated[-TAIL:])) if evaluated else None,
            "tail_evaluations": len(evaluated[-TAIL:]),
            "final_metrics": next(({k: m[k] for k in run.metric_keys if k in m} for m in reversed(run.rounds)
                                   if key in m), {}),
            **tot, "seconds": sum(_round_seconds(m) for m in run.rounds), "rounds": len(run.rounds),
            "heads_pruned": heads_pruned(run),
        }
        if baseline is not None and base_tot is not None and base_tail is not None and row["final"] is not None:
            row["drop_points"] = baseline.points * (base_tail - row["tail_mean"])
            row["upload_advantage"] = base_tot["bytes_up"] / max(tot["bytes_up"], 1)
            row["comm_advantage"] = (base_tot["bytes_up"] + base_tot["bytes_down"]) / max(
                tot["bytes_up"] + tot["bytes_down"], 1)
            row["flops_reduction"] = base_tot["train_flops"] / max(tot["train_flops"], 1)
        if target is not None:
            row["to_target"] = _to_target(run, target)
        rows.append(row)
    return rows


def heads_pruned(run: Run) -> float:
    """Fraction of heads the clients actually pruned, over all client updates (per-block rounding keeps
    ceil((1 - s) * heads) a block, so 0.9 of 12 heads prunes 10: 0.83)."""
    kept = [len(c["kept_heads"]) / sum(map(len, c["head_scores"])) for m in run.rounds for c in m["clients"]
            if c.get("kept_heads") is not None and c.get("head_scores")]
    return 1.0 - float(np.mean(kept)) if kept else 0.0


def _tail_mean(run: Run) -> float:
    value = tail_mean(run.rounds, run.metric_key())
    if value is None:
        raise ReportError(f"{run.path}: no evaluated round to compare the runs with")
    return value


def _fmt(value: Any, spec: str = ".3f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows: list[dict[str, Any]], target: float | None) -> str:
    """The comparison table (Markdown)."""
    head = (f"| run | method | sparsity | heads pruned | final | best | mean of last {TAIL} evals | drop vs dense "
            "| bytes up | bytes down | upload adv. "
            "| comm. adv. | train FLOPs | FLOPs red. | seconds | to target: rounds | bytes | FLOPs | seconds |")
    lines = [head, "|" + "---|" * 19]
    for r in rows:
        t = r.get("to_target")
        reach = ["not reached"] + ["-"] * 3 if t is None else [
            str(t["rounds"]), f"{t['bytes'] / 1e6:.1f} MB", f"{t['train_flops'] / 1e12:.1f} T", f"{t['seconds']:.0f}"]
        final = _fmt(r["final"])
        if len(r.get("final_metrics", {})) > 1:  # generation: every metric, headline first
            final = " / ".join(f"{k} {v:.3g}" for k, v in r["final_metrics"].items())
        lines.append(
            f"| {r['run']} | {r['method']} | {r['sparsity']:g} | {r['heads_pruned']:.0%} | {final} | "
            f"{_fmt(r['best'])} | {_fmt(r['tail_mean'])} | "
            f"{_fmt(r.get('drop_points'), '.1f', ' pt')} | {r['bytes_up'] / 1e6:.1f} MB | "
            f"{r['bytes_down'] / 1e6:.1f} MB | {_fmt(r.get('upload_advantage'), '.2f', 'x')} | "
            f"{_fmt(r.get('comm_advantage'), '.2f', 'x')} | {r['train_flops'] / 1e12:.1f} T | "
            f"{_fmt(r.get('flops_reduction'), '.2f', 'x')} | {r['seconds']:.0f} | " + " | ".join(reach) + " |")
    notes = [f"Target {rows[0]['metric']}: {target:.3f}."] if target is not None and rows else []
    fewer = [f"{r['run']} {r['tail_evaluations']}" for r in rows if 0 < r["tail_evaluations"] < TAIL]
    if fewer:
        notes.append(f"Mean of last {TAIL} evals: over fewer where a run has fewer ({', '.join(fewer)}).")
    return "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes)


SEED_ONLY = ("seed", "run_name", "out", "threads", "device")  # config keys that do not make another configuration


@dataclass
class Band:
    """The curve of one configuration over its runs (seeds): mean, min and max at each evaluation."""

    label: str
    runs: int
    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def seed_groups(runs: list[Run]) -> list[list[Run]]:
    """Runs grouped by configuration: configs equal up to the seed (and run name, output folder, threads,
    device), in the order of their first run."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        key = json.dumps({k: v for k, v in run.config.items() if k not in SEED_ONLY}, sort_keys=True)
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def curve_bands(runs: list[Run], x: str) -> list[Band]:
    """One `Band` per configuration: at the i-th evaluation, x and the metric averaged over the group's runs
    (the evaluations a run lacks are left out: the curves are cut at the shortest), with their min and max."""
    bands = []
    for group in seed_groups(runs):
        curves = [run.curve(x) for run in group]
        n = min(len(xs) for xs, _ in curves)
        xs = np.stack([c[0][:n] for c in curves])
        ys = np.stack([c[1][:n] for c in curves])
        label = group[0].name if len(group) == 1 else re.sub(r"[-_.]?seed\d+$", "", group[0].name)
        bands.append(Band(label, len(group), xs.mean(0), ys.mean(0), ys.min(0), ys.max(0)))
    return bands


def plot_curves(runs: list[Run], out: Path) -> list[Path]:
    """Accuracy vs round, vs cumulative bytes up, vs cumulative training FLOPs; one line per configuration,
    with a min-max band over its seeds when several runs differ only by the seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x, label, scale in [("round", "round", 1.0), ("bytes_up", "cumulative bytes up (MB)", 1e6),
                            ("train_flops", "cumulative training FLOPs (TFLOP)", 1e12)]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for band in curve_bands(runs, x):
            name = band.label if band.runs == 1 else f"{band.label} (mean of {band.runs} seeds, min-max)"
            line = ax.plot(band.x / scale, band.mean, marker="o", markersize=3, label=name)[0]
            if band.runs > 1:
                ax.fill_between(band.x / scale, band.low, band.high, color=line.get_color(), alpha=0.2)
        ax.set_xlabel(label)
        ax.set_ylabel(runs[0].metric_key() if runs else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{runs[0].metric_key() if runs else 'accuracy'}_vs_{x}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def mean_head_scores(run: Run) -> np.ndarray | None:
    """Head scores averaged over every client update of a run that pruned; None when it did not."""
    scores = [np.asarray(c["head_scores"]) for m in run.rounds for c in m.get("clients", [])
              if c.get("sparsity", 0) > 0 and "head_scores" in c]
    return np.mean(scores, axis=0) if scores else None


def _check_target(target: float, run: Run) -> None:
    """A target on the scale of the headline metric: [0, 1] for an accuracy, [0, 100] for generation scores."""
    top = 1.0 if run.points == 100.0 else 100.0
    if not 0 <= target <= top:
        hint = f" (a fraction: {target / 100:g} for {target:g}%)" if top == 1.0 and target <= 100 else ""
        raise ReportError(f"--target {target:g} is outside [0, {top:g}], the range of {run.metric_key()}{hint}")


def write_report(run_dirs: list[Path], out: Path, baseline: Path | None = None,
                 target: float | None = None) -> Path:
    """Write table.md, summary.json and plots for `run_dirs` into `out`; returns the table's path."""
    from fedhead.heads_report import plot_head_scores

    runs = [Run.load(Path(p)) for p in run_dirs]
    if not runs:
        raise ReportError("no runs given")
    base: Run | None
    if baseline is not None:
        base = Run.load(Path(baseline))
    else:
        dense = [r for r in runs if r.sparsity == 0 and r.config["federated"]["aggregation"] == "fedavg"]
        base = dense[0] if dense else None
    if target is None and base is not None and _tail_mean(base) is not None:  # None: no evaluation after round 0
        target = _tail_mean(base) - 2.0 / base.points
    elif target is not None:
        _check_target(target, runs[0])
    for name in ("summary.json", "table.md"):
        refuse_run_file(out / name, "--out")
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize_runs(runs, base, target)
    table = markdown_table(rows, target)
    header = f"Baseline: {base.name if base else 'none (no dense FedAvg run given)'}.\n\n"
    (out / "table.md").write_text(header + table)
    (out / "summary.json").write_text(json.dumps({"baseline": base.name if base else None, "target": target,
                                                  "rows": rows}, indent=1))
    plot_curves(runs, out)
    import torch

    for run in runs:
        scores = mean_head_scores(run)
        if scores is not None:
            plot_head_scores(torch.tensor(scores), out / f"heads_{run.name}.png",
                             f"mean head importance over clients: {run.name}")
    return out / "table.md"
