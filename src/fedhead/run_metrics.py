"""A run's metrics log (`metrics.jsonl`, one JSON line a round) and the numbers every reader takes from it.

One home for what the run loop, the report, the Flower engine and the benchmarks all need: reading the log
(a line torn by a kill ends it), the run's headline metric, the tail mean that compares runs, and the head masks
the clients uploaded (what a pruned deployment's consensus is taken from).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedhead.config import ConfigError

TAIL = 5  # evaluations averaged by `tail_mean`: with few label-skewed clients a round, one evaluation swings


def parse_lines(text: str) -> list[dict[str, Any]]:
    """The metrics lines of `text`, up to the first line that is not valid JSON (torn by a kill mid-write:
    everything after it is not trusted)."""
    lines = []
    for raw in text.splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            break
    return lines


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The metrics lines of the file `path` ([] when it does not exist)."""
    return parse_lines(path.read_text()) if path.exists() else []


def headline_metric(config: dict[str, Any]) -> str:
    """The headline metric of a run's config (a dict, as config.json holds it): accuracy for classification,
    else its first generation metric."""
    if config.get("model", {}).get("task", "classification") == "classification":
        return "accuracy"
    return config.get("generation", {}).get("metrics", ["rougeL"])[0]


def tail_mean(metrics: list[dict[str, Any]], key: str, tail: int = TAIL) -> float | None:
    """Mean of `key` over the last `tail` evaluations after round 0 (None when there is none)."""
    values = [m[key] for m in metrics if m.get("round", 0) > 0 and key in m][-tail:]
    return sum(values) / len(values) if values else None


def client_head_masks(metrics: list[dict[str, Any]], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, scores), both [N, blocks, heads] (bool, float64): every client update of the last `window` rounds of
    `metrics` (a run's metrics.jsonl lines), from its `kept_heads` (flat indices) and `head_scores`.

    Raises:
        ConfigError: no client update with both fields in those rounds.
    """
    rounds = [m for m in metrics if m.get("round", 0) > 0][-window:]
    kept, scores = [], []
    for m in rounds:
        for c in m.get("clients", []):
            if c.get("kept_heads") is None or not c.get("head_scores"):
                continue
            score = torch.tensor(c["head_scores"], dtype=torch.float64)  # (blocks, heads)
            mask = torch.zeros(score.numel(), dtype=torch.bool)
            mask[c["kept_heads"]] = True
            kept.append(mask.view(score.shape))
            scores.append(score)
    if not kept:
        raise ConfigError("the run has no client update (kept_heads, head_scores) in its metrics.jsonl: no round "
                          "has finished")
    return torch.stack(kept), torch.stack(scores)
