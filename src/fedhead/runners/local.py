"""In-process simulation: N clients, K per round, one process, one model in memory.

This module is only the in-process driver: one round (`run_round`: select, send bytes, call `client_update`,
receive bytes, close the round) and `run_simulation`, which hands that round to the shared run loop
(`fedhead.loop.drive_rounds`: run directory, resume, evaluation, checkpoints, summary). Memory and start-up
grow with K and the data, not with N: clients are index lists into one tokenised dataset, and only the K working
copies of a round are ever built, one at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedhead.config import Config
from fedhead.data.loading import DataError
from fedhead.federated.client import client_update
from fedhead.federated.payload import decode_state, decode_update, encode_state, encode_update
from fedhead.federated.selection import ClientStats
from fedhead.federated.server import Reply, close_round, plan_round
from fedhead.federated.state import State
from fedhead.loop import RoundFn, Simulation, drive_rounds, server_options, summarize
from fedhead.run_dir import RunDir

# The run context, loop and summary live in fedhead.loop; re-exported here for existing imports.
__all__ = ["RoundFn", "Simulation", "drive_rounds", "run_round", "run_simulation", "server_options", "summarize"]


def run_round(sim: Simulation, state: State, round_: int, rng: np.random.Generator,
              stats: ClientStats) -> tuple[State, dict[str, Any]]:
    """One round: open it (`plan_round`: select), send, train each client, receive, close it (`close_round`:
    screen, aggregate). Returns (new state, metrics)."""
    cfg = sim.cfg
    plan = plan_round(range(cfg.partition.num_clients), cfg.federated, cfg.heads, cfg.seed, round_, rng, stats,
                      sim.lm.layout, lambda cs: sim.global_losses(state, cs),
                      dropout_probability=cfg.robust.dropout_probability)
    # The server sends the global trainable state (with freeze_a, A is not trainable: clients rebuild it
    # from the seed); each client trains from the bytes it received and answers with serialised bytes. Each
    # client trains when the server reads its reply, which is folded into the round's sums and let go.
    down = encode_state(state)
    client_seconds: list[float] = []  # each client's work, done while the server reads the replies

    def replies() -> Iterator[Reply]:
        for c in plan.selection.clients:
            if c in plan.dropped:  # simulated failures
                continue
            t = time.perf_counter()
            update = client_update(sim.lm, decode_state(down), sim.client_data(c), cfg, c, round_,
                                   plan.head_counts, sim.residuals.get(c))
            if update.residual is not None:
                sim.residuals[c] = update.residual
            blob = encode_update(update)
            reply = Reply(c, decode_update(blob), len(down), len(blob), update.timings)
            del update, blob
            client_seconds.append(time.perf_counter() - t)
            yield reply

    known = {c: len(sim.parts[c]) for c in plan.selection.clients}
    result = close_round(plan, state, replies(), stats, sim.server_moments, sim.lm.layout, sim.options,
                         known_sizes=known, failed=plan.dropouts(), client_seconds=client_seconds)
    sim.server_moments = result.moments
    return result.state, result.metrics


def run_simulation(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the federated experiment of `cfg`, writing everything to `run_dir`; returns the summary.

    stop_after: stop once this round is done (as if killed), leaving a resumable run directory.
    overwrite: a fresh run may replace another run's files in `run_dir` (otherwise ConfigError).
    """
    start = time.perf_counter()
    if cfg.data.train is None:
        raise DataError("data.train is not set: the in-process engine partitions it among its clients (devices "
                        "that bring their own data run on Flower's deployment engine, docs/deployment.md)")
    rd = RunDir(run_dir)
    if not resume and rd.holds_a_run() and not overwrite:
        rd.create("", overwrite=False)  # raises the ConfigError before the model is loaded
    sim = Simulation.setup(cfg)
    return drive_rounds(sim, rd, lambda state, r, rng, stats: run_round(sim, state, r, rng, stats),
                        resume=resume, on_round=on_round, stop_after=stop_after, start=start, overwrite=overwrite)
