"""The frontier's records (bench/frontier.py): one small JSON file a finished run,
docs/results/frontier/<row>.seed<S>.json, holding its config overrides, seed, full-set accuracy and totals. The
tables are rebuilt from these records alone; `refresh` rewrites them from their run folders after the record
gains a field."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from frontier_protocol import RESULTS, RUNS

from fedhead.run_dir import RunDir


def record_path(row: str, seed: int, results: Path = RESULTS) -> Path:
    return results / f"{row}.seed{seed}.json"


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


def load_records(results: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """Every record in `results`, by row and seed."""
    by_row: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(results.glob("*.json")):
        r = json.loads(path.read_text())
        by_row.setdefault(r["row"], {})[r["seed"]] = r
    return by_row
