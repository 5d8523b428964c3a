"""The server's side of a round, as core code that every engine calls once the replies are in.

    replies -> values (a quantised upload's deltas + what was sent) -> screen (validation) -> record client
            statistics (selection) -> aggregate, or DP-aggregate (aggregation, privacy) -> server optimiser step
            (server_optimizer) -> the round's metrics line

Drivers (the in-process loop, the Flower strategy) only move bytes: they decode each reply and say which
client the server sent to; this module decides what counts. Nothing a client sends is trusted:

- the update's fields are checked (`validation.check_update`: names, shapes, dtypes, finite values, masks,
  scores in [0, 1], a data size between 1 and `max_examples`, equal to the size the server knows for the
  client when it knows one), and an update that claims another client's id is rejected;
- a client's own statistics (FLOPs, steps, seconds, memory) are kept only under the known keys, as finite
  non-negative numbers, and never over a field the server measured (client, bytes, kept heads, losses);
- clients are tracked by their position in the round, so an update the norm bound clipped (a new object) is
  still recorded, counted and aggregated.

A hostile field costs at most that client's update: the honest updates of the round are aggregated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedhead.config import HeadsSection
from fedhead.federated.aggregation import aggregate
from fedhead.federated.payload import ClientUpdate
from fedhead.federated.privacy import dp_aggregate, epsilon_spent
from fedhead.federated.selection import ClientStats, Selection
from fedhead.federated.server_optimizer import ServerOptimizer, server_step, trained_masks
from fedhead.federated.state import State
from fedhead.federated.validation import Rejection, screen_indexed
from fedhead.models.head_map import HeadLayout
from fedhead.models.slicing import gather_kept

# What a client may report about its own work (stats and timings): anything else is dropped.
REPORTED = ("sparsity", "steps", "train_flops", "scoring_flops", "peak_memory_bytes", "train_seconds",
            "scoring_seconds")
MAX_REPORTED = 1e21  # above any real count of FLOPs, bytes or seconds of one client round
DEFAULT_MAX_EXAMPLES = 10**9


@dataclass(frozen=True)
class ServerOptions:
    """What the server's round uses, and nothing else of the run's config."""

    aggregation: str = "fedavg"
    weighting: str = "product"
    trim_fraction: float = 0.2
    max_norm: float | None = None
    norm_action: str = "reject"
    outlier_factor: float | None = None
    min_clients: int = 1
    max_examples: int = DEFAULT_MAX_EXAMPLES
    optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    dp_noise_multiplier: float | None = None  # None: no differential privacy
    dp_clipping_norm: float = 1.0
    dp_delta: float = 1e-5
    dp_sample_rate: float = 1.0  # q = K / N, for the accountant


@dataclass
class Reply:
    """One answer as the driver received it: the decoded update, the client the server sent to, the bytes
    that travelled each way, and the client's timings (reported, not trusted)."""

    client: int
    update: ClientUpdate
    bytes_down: int
    bytes_up: int
    timings: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundResult:
    state: State
    moments: State
    metrics: dict[str, Any]


def reported_stats(*sources: dict[str, Any]) -> dict[str, int | float]:
    """A client's statistics, kept only under REPORTED keys as finite numbers in [0, MAX_REPORTED]."""
    out: dict[str, int | float] = {}
    for source in sources:
        if not isinstance(source, dict):
            continue
        for key in REPORTED:
            value = source.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if 0 <= value <= MAX_REPORTED and math.isfinite(value):  # the bound first: a huge int has no float
                out[key] = value if isinstance(value, int) else float(value)
    return out


def screen(
    replies: list[Reply], state: State, layout: HeadLayout, opts: ServerOptions,
    known_sizes: dict[int, int] | None = None,
) -> tuple[list[int], list[ClientUpdate], list[Rejection]]:
    """The positions in `replies` of the accepted updates, those updates (clipped where the options say), and
    the rejections with their reasons (`validation.screen_indexed`, plus what the server knows of each client:
    the id it sent to and, in simulation, its data size)."""
    def knows(i: int, update: ClientUpdate) -> str | None:
        client = replies[i].client
        if update.client_id != client:
            return f"update claims client {update.client_id!r}, sent to client {client}"
        if known_sizes and client in known_sizes and update.num_examples != known_sizes[client]:
            return (f"data size {update.num_examples} differs from the {known_sizes[client]} the server knows "
                    "for this client")
        return None

    positions, accepted, rejected = screen_indexed(
        [r.update for r in replies], state, layout, max_norm=opts.max_norm, norm_action=opts.norm_action,
        outlier_factor=opts.outlier_factor, max_examples=opts.max_examples, extra_check=knows)
    return positions, accepted, [Rejection(replies[i].client, reason) for i, reason in rejected]


def client_line(reply: Reply, update: ClientUpdate) -> dict[str, Any]:
    """One client's entry in the round's metrics: the server's measurements, then what the client reported
    (known keys only; a reported key never replaces a measured one)."""
    measured = {
        "client": reply.client,
        "num_examples": int(update.num_examples),
        "bytes_down": int(reply.bytes_down),
        "bytes_up": int(reply.bytes_up),
        "loss_before": float(update.loss_before),
        "loss_after": float(update.loss_after),
        "train_loss": float(update.train_loss),
        "kept_heads": update.kept_heads.flatten().nonzero().flatten().tolist(),
        "head_scores": [[round(float(x), 5) for x in row] for row in update.head_scores],
    }
    return {**reported_stats(update.stats, reply.timings), **measured}


def materialize(update: ClientUpdate, state: State, layout: HeadLayout) -> ClientUpdate:
    """The update with its trained values: received + delta for a quantised upload (`update.upload_bits` < 32),
    itself otherwise. A tensor whose name or shape does not fit the state is left as sent, for the screening to
    refuse; a kept mask that does not fit leaves the whole update as sent."""
    if update.upload_bits >= 32:
        return update
    try:
        sent = gather_kept(state, update.kept_heads.bool(), layout)
    except (IndexError, RuntimeError, ValueError, KeyError):
        return update
    values = {}
    for name, delta in update.tensors.items():
        fits = name in sent and tuple(sent[name].shape) == tuple(delta.shape)
        values[name] = (sent[name].float() + delta.float()).to(sent[name].dtype) if fits else delta
    return replace(update, tensors=values, upload_bits=32)


def head_counts_to_send(heads: HeadsSection, stats: ClientStats, layout: HeadLayout) -> torch.Tensor | None:
    """heads.schedule = "coverage": [blocks, heads], how often the server has seen each head trained, sent to the
    round's clients as at its start (every client of a round gets the same counts); None for other schedules."""
    if heads.schedule != "coverage":
        return None
    return stats.head_count_matrix(layout.num_blocks, layout.num_heads)


def server_round(
    state: State,
    round_: int,
    replies: list[Reply],
    selection: Selection,
    stats: ClientStats,
    moments: State,
    layout: HeadLayout,
    opts: ServerOptions,
    *,
    noise: torch.Generator | None = None,
    known_sizes: dict[int, int] | None = None,
    failed: list[dict[str, Any]] | None = None,
    bytes_down: int = 0,
) -> RoundResult:
    """The server's side of round `round_` (see the module docstring). `stats` is updated in place with the
    accepted clients; `noise` draws the DP noise; `bytes_down` is what the round sent."""
    replies = [replace(r, update=materialize(r.update, state, layout)) for r in replies]
    positions, updates, rejected = screen(replies, state, layout, opts, known_sizes)
    clients = []
    for i, update in zip(positions, updates, strict=True):
        clients.append(client_line(replies[i], update))
        stats.record(replies[i].client, round_, float(update.loss_before), float(update.loss_after),
                     clients[-1]["kept_heads"])
    skipped = len(updates) < opts.min_clients
    new_moments = moments
    if skipped:
        new_state = {k: v.clone() for k, v in state.items()}
    else:
        if opts.dp_noise_multiplier is not None:
            new_state = dp_aggregate(state, updates, layout, opts.dp_noise_multiplier, opts.dp_clipping_norm,
                                     noise if noise is not None else torch.Generator().manual_seed(round_))
        else:
            new_state = aggregate(state, updates, layout, opts.aggregation, opts.weighting, opts.trim_fraction)
        if opts.optimizer.kind != "none":  # post-processing: a DP aggregate stays DP
            new_state, new_moments = server_step(state, new_state, trained_masks(state, updates, layout), moments,
                                                 opts.optimizer)

    def total(key: str) -> float:
        return sum(c.get(key, 0.0) for c in clients)

    metrics: dict[str, Any] = {
        "round": round_,
        "selected": selection.clients,
        "selection_reason": selection.reason,
        "selection_priorities": {str(k): v for k, v in selection.priorities.items()},
        "train_loss": float(np.mean([c["train_loss"] for c in clients])) if clients else None,
        "bytes_down": bytes_down,
        "bytes_up": sum(c["bytes_up"] for c in clients),
        "train_flops": total("train_flops"),
        "scoring_flops": total("scoring_flops"),
        "clients": clients,
        "rejected": [{"client": r.client_id, "reason": r.reason} for r in rejected],
        "failed": list(failed or []),
    }
    if skipped:
        metrics["skipped"] = (f"only {len(updates)} good updates, fewer than federated.min_clients = "
                              f"{opts.min_clients}: the global state is kept")
    if opts.dp_noise_multiplier is not None:
        metrics["dp_epsilon"] = epsilon_spent(opts.dp_noise_multiplier, opts.dp_sample_rate, round_, opts.dp_delta)
        metrics["dp_delta"] = opts.dp_delta
    return RoundResult(new_state, new_moments, metrics)
