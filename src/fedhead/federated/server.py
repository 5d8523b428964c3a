"""The server's side of a round, as core code that every engine calls: a round is two calls.

    plan_round(...)  -> RoundPlan    selection among the eligible clients, the head counts to send, the round's
                                     DP noise generator and start time; the driver then sends the state
    close_round(plan, replies, ...) -> RoundResult   `server_round` over the replies, with the round's timings

`server_round`, the pure core `close_round` calls:

    each reply, as it is read -> values (a quantised upload's deltas + what was sent) -> screen (validation)
            -> record client statistics (selection) -> fold into the running sums (aggregation, or privacy's DP
            sum) and let go;
    then -> the aggregate -> server optimiser step (server_optimizer) -> the round's metrics line

Drivers (the in-process loop, the Flower strategy) only move bytes: they decode each reply and say which
client the server sent to; this module decides what counts. Nothing a client sends is trusted:

- the update's fields are checked (`validation.check_update`: names, shapes, dtypes, finite values, masks,
  scores in [0, 1], a data size between 1 and `max_examples`, equal to the size the server knows for the
  client when it knows one), and an update that claims another client's id is rejected;
- a client's own statistics (FLOPs, steps, seconds, memory) are kept only under the known keys, as finite
  non-negative numbers, and never over a field the server measured (client, bytes, kept heads, losses);
- a data size the server cannot verify (device-local data) does not steer the round: with
  `unverified_sizes = "equal"` it weighs as the median size the server knows in the round, or 1
  (`unverified_weight`), so one client claiming 1,000,000 examples among honest tens takes 1/K of a round of K;
- clients are tracked by their position in the round, so an update the norm bound clipped (a new object) is
  still recorded, counted and aggregated.

A hostile field costs at most that client's update: the honest updates of the round are aggregated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedhead.config import FederatedSection, HeadsSection
from fedhead.federated.aggregation import HeldUpdates, WeightedSum, aggregator
from fedhead.federated.payload import ClientUpdate, encode_state
from fedhead.federated.privacy import DPSum, epsilon_spent
from fedhead.federated.selection import ClientStats, Selection, select_among
from fedhead.federated.server_optimizer import ServerOptimizer, server_step, trained_masks_of
from fedhead.federated.state import State
from fedhead.federated.validation import Rejection, norm_outliers, screen_one
from fedhead.models.head_map import HeadLayout
from fedhead.models.slicing import gather_kept
from fedhead.seeds import SERVER, Stream, derived_seed, failure_draws

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
    unverified_sizes: str = "equal"  # or "claimed"
    optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    dp_noise_multiplier: float | None = None  # None: no differential privacy
    dp_clipping_norm: float = 1.0
    dp_delta: float = 1e-5
    dp_sample_rate: float = 1.0  # q = K / N, for the accountant


@dataclass
class Reply:
    """One answer as the driver received it: the decoded update, the client the server sent to, the bytes
    that travelled each way, and the client's timings (reported, not trusted).

    seconds_in_read: the seconds of client work done while the server read this reply (the in-process engine
    trains a client when `close_round` reads its reply); 0 when the client worked before (Flower)."""

    client: int
    update: ClientUpdate
    bytes_down: int
    bytes_up: int
    timings: dict[str, Any] = field(default_factory=dict)
    seconds_in_read: float = 0.0


@dataclass
class RoundResult:
    """A closed round: the next global state, the server optimiser's next moments, the round's metrics line."""

    state: State
    moments: State
    metrics: dict[str, Any]


@dataclass(frozen=True)
class RoundPlan:
    """What the server decided when it opened round `round_` (`plan_round`), for `close_round`.

    selection: the clients sent to, with the selection's reason and priorities.
    head_counts: heads.schedule = "coverage": [blocks, heads] how often the server has seen each head trained,
        sent to every client of the round; None for other schedules.
    noise: the generator of the round's DP noise, seeded from (seed, round, SERVER, Stream.DP_NOISE).
    started: `time.perf_counter()` when the round opened (seconds_clients counts from it).
    dropped: `robust.dropout_probability` (simulation): the selected clients that fail this round, not sent to;
        selected client i fails when u_i < p, u = `seeds.failure_draws(seed, round, len(selected))`.
    down: what every client of the round receives: the global state's payload (`encode_state`).
    """

    round_: int
    selection: Selection
    head_counts: torch.Tensor | None
    noise: torch.Generator
    started: float
    dropped: list[int] = field(default_factory=list)
    down: bytes = b""
    sent: list[int] = field(init=False)  # the selected clients the round is sent to (not dropped), in order

    def __post_init__(self) -> None:
        object.__setattr__(self, "sent", [c for c in self.selection.clients if c not in self.dropped])

    def dropouts(self) -> list[dict[str, Any]]:
        """The `failed` entries of the dropped clients."""
        return [{"client": c, "reason": "dropped out (simulated failure)"} for c in self.dropped]


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


def screen_reply(reply: Reply, state: State, layout: HeadLayout, opts: ServerOptions,
                 known_sizes: dict[int, int] | None = None) -> tuple[ClientUpdate, float, str | None]:
    """One reply's screen without the round's outlier test (`validation.screen_one`, plus what the server knows
    of the client: the id it sent to and, in simulation, its data size): (the update, clipped where the options
    say; its norm; the problem, or None when accepted)."""
    def knows(update: ClientUpdate) -> str | None:
        client = reply.client
        if update.client_id != client:
            return f"update claims client {update.client_id!r}, sent to client {client}"
        if known_sizes and client in known_sizes and update.num_examples != known_sizes[client]:
            return (f"data size {update.num_examples} differs from the {known_sizes[client]} the server knows "
                    "for this client")
        return None

    return screen_one(reply.update, state, layout, max_norm=opts.max_norm, norm_action=opts.norm_action,
                      max_examples=opts.max_examples, extra_check=knows)


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


def unverified_weight(known_sizes: Iterable[int]) -> int:
    """The data size an unverified claim weighs as (`unverified_sizes = "equal"`): the lower median of the sizes
    the server knows in the round, 1 when it knows none. Every unverified client of a round then weighs the same,
    so in a round of K device-local clients each data-size weight n_c / sum n is exactly 1 / K."""
    sizes = sorted(known_sizes)
    return sizes[(len(sizes) - 1) // 2] if sizes else 1


def head_counts_to_send(heads: HeadsSection, stats: ClientStats, layout: HeadLayout) -> torch.Tensor | None:
    """heads.schedule = "coverage": [blocks, heads], how often the server has seen each head trained, sent to the
    round's clients as at its start (every client of a round gets the same counts); None for other schedules."""
    if heads.schedule != "coverage":
        return None
    return stats.head_count_matrix(layout.num_blocks, layout.num_heads)


def server_round(
    state: State,
    round_: int,
    replies: Iterable[Reply],
    selection: Selection,
    stats: ClientStats,
    moments: State,
    layout: HeadLayout,
    opts: ServerOptions,
    *,
    noise: torch.Generator | None = None,
    known_sizes: dict[int, int] | None = None,
    failed: list[dict[str, Any]] | None = None,
    bytes_down: int | None = None,
) -> RoundResult:
    """The server's side of round `round_` (see the module docstring).

    `replies` is read once, in order: each reply is screened, recorded and folded into the round's running sums
    as it is read, then let go, so the server's memory does not grow with the round's clients (a generator that
    decodes each reply when asked keeps it so). Two options need every update of the round before any is
    aggregated, and hold the accepted ones until the round's end: `robust.outlier_factor` (the round's median norm)
    and the robust aggregations (a coordinate's median needs every value). `stats` is updated in place with the
    accepted clients; `noise` draws the DP noise; `bytes_down` is what the round sent (default: the replies' own
    bytes_down summed); `failed` (clients that did not answer) is read after the replies, so a driver may append
    to it while they are read."""
    running: DPSum | WeightedSum | HeldUpdates
    if opts.dp_noise_multiplier is not None:
        running = DPSum(state, layout, opts.dp_noise_multiplier, opts.dp_clipping_norm,
                        noise if noise is not None else torch.Generator().manual_seed(round_))
    else:
        running = aggregator(state, layout, opts.aggregation, opts.weighting, opts.trim_fraction)
    clients: list[dict[str, Any]] = []
    rejected: list[Rejection] = []
    held: list[tuple[Reply, ClientUpdate, float]] = []  # for the outlier test only
    kept_any: torch.Tensor | None = None
    sent = 0

    known = known_sizes or {}
    weight = unverified_weight(known.values())

    def accept(reply: Reply, update: ClientUpdate) -> None:
        nonlocal kept_any
        clients.append(client_line(reply, update))
        stats.record(reply.client, round_, float(update.loss_before), float(update.loss_after),
                     clients[-1]["kept_heads"])
        if opts.unverified_sizes == "equal" and reply.client not in known and update.num_examples != weight:
            clients[-1]["num_examples_counted"] = weight
            update = replace(update, num_examples=weight)  # the claim is recorded, not weighed
        running.fold(update)
        kept_any = update.kept_heads.clone() if kept_any is None else kept_any | update.kept_heads

    for reply in replies:
        sent += int(reply.bytes_down)
        reply = replace(reply, update=materialize(reply.update, state, layout))
        update, norm, problem = screen_reply(reply, state, layout, opts, known_sizes)
        if problem is not None:
            rejected.append(Rejection(reply.client, problem))
        elif opts.outlier_factor is not None:
            held.append((reply, update, norm))
        else:
            accept(reply, update)
        del reply, update  # let it go before the next one is read
    if opts.outlier_factor is not None:
        outliers = norm_outliers([norm for _, _, norm in held], opts.outlier_factor)
        rejected += [Rejection(held[j][0].client, reason) for j, reason in outliers.items()]
        for j, (reply, update, _) in enumerate(held):
            if j not in outliers:
                accept(reply, update)
        held.clear()
    skipped = len(clients) < opts.min_clients
    new_moments = moments
    if skipped:
        new_state = {k: v.clone() for k, v in state.items()}
    else:
        new_state = running.result()
        if opts.optimizer.kind != "none":  # post-processing: a DP aggregate stays DP
            new_state, new_moments = server_step(state, new_state, trained_masks_of(state, kept_any, layout),
                                                 moments, opts.optimizer)

    def total(key: str) -> float:
        return sum(c.get(key, 0.0) for c in clients)

    metrics: dict[str, Any] = {
        "round": round_,
        "selected": selection.clients,
        "selection_reason": selection.reason,
        "selection_priorities": {str(k): v for k, v in selection.priorities.items()},
        "train_loss": float(np.mean([c["train_loss"] for c in clients])) if clients else None,
        "bytes_down": sent if bytes_down is None else bytes_down,
        "bytes_up": sum(c["bytes_up"] for c in clients),
        "train_flops": total("train_flops"),
        "scoring_flops": total("scoring_flops"),
        "clients": clients,
        "rejected": [{"client": r.client_id, "reason": r.reason} for r in rejected],
        "failed": list(failed or []),
    }
    if skipped:
        metrics["skipped"] = (f"only {len(clients)} good updates, fewer than federated.min_clients = "
                              f"{opts.min_clients}: the global state is kept")
    if opts.dp_noise_multiplier is not None:
        metrics["dp_epsilon"] = epsilon_spent(opts.dp_noise_multiplier, opts.dp_sample_rate, round_, opts.dp_delta)
        metrics["dp_delta"] = opts.dp_delta
    return RoundResult(new_state, new_moments, metrics)


def plan_round(available: Iterable[int], fed: FederatedSection, heads: HeadsSection, seed: int, round_: int,
               rng: np.random.Generator, stats: ClientStats, layout: HeadLayout,
               global_loss_of: Callable[[list[int]], dict[int, float]], *, state: State | None = None,
               started: float | None = None, dropout_probability: float = 0.0) -> RoundPlan:
    """Open round `round_`: select among the eligible clients of `available` and fix what the round sends.

    Args:
        available: the client ids the server can reach (all N in simulation, the connected nodes' on Flower);
            those `fed.selectable` refuses (left-out tiers) are not eligible.
        fed, heads, seed: the run's options (selection, clients per round; heads.schedule; the run's seed).
        rng: the selection RNG (drawn from; checkpointed by the run loop).
        stats: the server's client statistics (read, not changed).
        layout: the model's head layout (the coverage counts' shape).
        global_loss_of: client ids -> the global model's loss on each one's data (power_of_choice candidates).
        state: the global trainable state the round sends (its payload becomes `RoundPlan.down`; None: none).
        started: when the round opened (default: now), e.g. before the driver encoded the state.
        dropout_probability: `robust.dropout_probability`, simulated failures (default none).
    Returns:
        The `RoundPlan`: `selection.select_among` over the sorted eligible ids, the coverage head counts, the DP
        noise generator seeded from (seed, round_, SERVER, Stream.DP_NOISE), the start time, the dropped clients,
        the payload sent.
    """
    started = time.perf_counter() if started is None else started
    down = b"" if state is None else encode_state(state)
    eligible = sorted(c for c in available if fed.selectable(c))
    selection = select_among(eligible, fed, round_, rng, stats, global_loss_of)
    counts = head_counts_to_send(heads, stats, layout)
    noise = torch.Generator().manual_seed(derived_seed(seed, round_, SERVER, Stream.DP_NOISE))
    draws = failure_draws(seed, round_, len(selection.clients))
    dropped = [c for c, u in zip(selection.clients, draws, strict=True) if u < dropout_probability]
    return RoundPlan(round_, selection, counts, noise, started, dropped, down)


def close_round(plan: RoundPlan, state: State, replies: Iterable[Reply], stats: ClientStats, moments: State,
                layout: HeadLayout, opts: ServerOptions, *, known_sizes: dict[int, int] | None = None,
                failed: list[dict[str, Any]] | None = None, bytes_down: int | None = None) -> RoundResult:
    """Close the round `plan` opened: `server_round` over `replies` (read once, each folded as it is read; the
    arguments after `replies` are server_round's), with the DP noise of the plan, and the round's timings.

    failed: the clients that failed besides those the plan dropped (`plan.dropouts()`, inserted first into this
        same list, which the driver may still append to while the replies are read).
    Timings (metrics seconds_clients, seconds_aggregate), with t_close when this call starts and
    `inside` = the sum of the replies' `seconds_in_read` (client work done while they were read):
        seconds_clients   = (t_close - plan.started) + inside
        seconds_aggregate = (now - t_close) - inside
    """
    t_close = time.perf_counter()
    failed = failed if failed is not None else []
    failed[:0] = plan.dropouts()
    inside = 0.0

    def read() -> Iterator[Reply]:
        nonlocal inside
        for reply in replies:
            inside += reply.seconds_in_read
            yield reply

    result = server_round(state, plan.round_, read(), plan.selection, stats, moments, layout, opts,
                          noise=plan.noise, known_sizes=known_sizes, failed=failed,
                          bytes_down=bytes_down)
    result.metrics["seconds_clients"] = t_close - plan.started + inside
    result.metrics["seconds_aggregate"] = time.perf_counter() - t_close - inside
    return result
