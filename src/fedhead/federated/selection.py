"""Client selection: which K of N clients train in a round, and why.

- random: uniform without replacement (FedAvg's sampling).
- loss_gap (the Assortment-of-Heads paper's third mechanism, our formulation): priority
  = L_c^global - L_c^local from the client's last participation + exploration * rounds since it took part;
  clients never seen come first. The K highest priorities are picked (ties by a seeded random order).
- power_of_choice (Cho et al. 2020): sample d candidates, pick the K whose global-model loss is highest.
- head_coverage: greedy; each pick maximises its loss-gap priority plus how many of its last kept heads are
  not yet covered by the clients already picked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fedhead.config import FederatedSection


@dataclass
class ClientStats:
    """What the server remembers of each client (plain data, saved in checkpoints)."""

    last_round: dict[int, int] = field(default_factory=dict)
    loss_global: dict[int, float] = field(default_factory=dict)
    loss_local: dict[int, float] = field(default_factory=dict)
    kept_heads: dict[int, list[int]] = field(default_factory=dict)  # flat indices of its last kept heads
    # flat head index -> how many accepted client updates trained that head (heads.schedule = "coverage")
    head_counts: dict[int, int] = field(default_factory=dict)

    FIELDS = ("last_round", "loss_global", "loss_local", "kept_heads", "head_counts")

    def record(self, client: int, round_: int, loss_global: float, loss_local: float, kept: list[int]) -> None:
        """Remember a client's participation in `round_` (and count the heads it trained)."""
        self.last_round[client] = round_
        self.loss_global[client] = loss_global
        self.loss_local[client] = loss_local
        self.kept_heads[client] = kept
        for head in kept:
            self.head_counts[head] = self.head_counts.get(head, 0) + 1

    def head_count_matrix(self, blocks: int, heads: int) -> torch.Tensor:
        """`head_counts` as a [blocks, heads] int64 tensor (0 for a head never trained)."""
        counts = torch.zeros(blocks * heads, dtype=torch.int64)
        for head, n in self.head_counts.items():
            counts[head] = n
        return counts.view(blocks, heads)

    def to_json(self) -> dict:
        return {k: {str(c): v for c, v in getattr(self, k).items()} for k in self.FIELDS}

    @classmethod
    def from_json(cls, data: dict) -> ClientStats:
        return cls(**{k: {int(c): v for c, v in data.get(k, {}).items()} for k in cls.FIELDS})


@dataclass
class Selection:
    """The picked clients and, per considered client, the priority that decided it."""

    clients: list[int]
    priorities: dict[int, float] = field(default_factory=dict)
    reason: str = ""


def loss_gap_priority(stats: ClientStats, client: int, round_: int, exploration: float) -> float:
    """L_global - L_local + exploration * (rounds since last participation); +inf for a never-seen client."""
    if client not in stats.last_round:
        return float("inf")
    gap = stats.loss_global[client] - stats.loss_local[client]
    return gap + exploration * (round_ - stats.last_round[client])


def _top(priorities: dict[int, float], k: int, rng: np.random.Generator) -> list[int]:
    clients = list(priorities)
    tiebreak = rng.permutation(len(clients))  # seeded random order among equal priorities
    order = sorted(range(len(clients)), key=lambda i: (-priorities[clients[i]], tiebreak[i]))
    return [clients[i] for i in order[:k]]


def select_clients(
    method: str,
    num_clients: int,
    k: int,
    round_: int,
    rng: np.random.Generator,
    stats: ClientStats,
    *,
    exploration: float = 0.1,
    candidates_d: int = 0,
    global_loss_of: Callable[[list[int]], dict[int, float]] | None = None,
) -> Selection:
    """Pick `k` of `num_clients` clients for `round_` (1-based) with `method`."""
    if not 1 <= k <= num_clients:
        raise ValueError(f"cannot select {k} of {num_clients} clients")
    if method == "random":
        return Selection(sorted(rng.choice(num_clients, size=k, replace=False).tolist()), reason="uniform")
    if method == "power_of_choice":
        if global_loss_of is None:
            raise ValueError("power_of_choice needs the candidates' global-model losses")
        d = min(num_clients, candidates_d or 2 * k)
        candidates = sorted(rng.choice(num_clients, size=d, replace=False).tolist())
        losses = global_loss_of(candidates)
        return Selection(sorted(_top(losses, k, rng)), losses, reason=f"highest global loss of {d} candidates")
    priorities = {c: loss_gap_priority(stats, c, round_, exploration) for c in range(num_clients)}
    if method == "loss_gap":
        picked = _top(priorities, k, rng)
        return Selection(sorted(picked), {c: priorities[c] for c in picked}, reason="loss gap + exploration")
    if method == "head_coverage":
        return _head_coverage(priorities, k, stats, rng)
    raise ValueError(f"unknown selection '{method}'")


def _head_coverage(priorities: dict[int, float], k: int, stats: ClientStats, rng: np.random.Generator) -> Selection:
    covered: set[int] = set()
    picked: list[int] = []
    scores: dict[int, float] = {}
    pool = dict(priorities)
    total_heads = max((max(v) + 1 for v in stats.kept_heads.values() if v), default=1)
    for _ in range(k):
        gain = {c: p + len(set(stats.kept_heads.get(c, [])) - covered) / total_heads for c, p in pool.items()}
        best = _top(gain, 1, rng)[0]
        picked.append(best)
        scores[best] = gain[best]
        covered |= set(stats.kept_heads.get(best, []))
        del pool[best]
    return Selection(sorted(picked), scores, reason="loss gap + uncovered heads")


def select_among(available: list[int], fed: FederatedSection, round_: int, rng: np.random.Generator,
                 stats: ClientStats, global_loss_of: Callable[[list[int]], dict[int, float]]) -> Selection:
    """`select_clients` over the client ids in `available` (sorted): positions in, client ids out.

    With every client connected this is `select_clients` over all clients, draw for draw, so the Flower engine
    picks what the in-process engine picks."""
    pos = {c: i for i, c in enumerate(available)}
    view = ClientStats(**{name: {pos[c]: v for c, v in getattr(stats, name).items() if c in pos}
                          for name in ("last_round", "loss_global", "loss_local", "kept_heads")})

    def losses(positions: list[int]) -> dict[int, float]:
        by_client = global_loss_of([available[p] for p in positions])
        return {p: by_client.get(available[p], -math.inf) for p in positions}

    s = select_clients(fed.selection, len(available), min(fed.clients_per_round, len(available)), round_, rng, view,
                       exploration=fed.exploration, candidates_d=fed.power_of_choice_d, global_loss_of=losses)
    return Selection([available[p] for p in s.clients], {available[p]: v for p, v in s.priorities.items()}, s.reason)
