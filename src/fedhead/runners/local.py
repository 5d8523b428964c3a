"""In-process simulation: N clients, K per round, one process, one model in memory.

This module is only the in-process driver: one round (`run_round`: open it, train each client on the bytes
it receives, close the round) and `run_simulation`, which hands that round to the shared run loop
(`fedhead.loop.drive_rounds`: run directory, resume, evaluation, checkpoints, summary). Memory and start-up
grow with K and the data, not with N: clients are index lists into one tokenised dataset, and only the K working
copies of a round are ever built, one at a time.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedhead.config import Config
from fedhead.data.loading import DataError
from fedhead.federated.selection import ClientStats
from fedhead.federated.server import close_round, plan_round
from fedhead.federated.state import State
from fedhead.loop import RoundFn, Simulation, drive_rounds, server_options, summarize
from fedhead.run_dir import RunDir

# The run context, loop and summary live in fedhead.loop; re-exported here for existing imports.
__all__ = ["RoundFn", "Simulation", "drive_rounds", "run_round", "run_simulation", "server_options", "summarize"]


def run_round(sim: Simulation, state: State, round_: int, rng: np.random.Generator,
              stats: ClientStats) -> tuple[State, dict[str, Any]]:
    """One round in two calls of the server's core: open it (`plan_round`: select, fix the payload sent), then
    close it (`close_round`: screen, aggregate) over the replies, each client trained in this process when the
    server reads its reply (`Simulation.client_reply`) and let go once folded in. Returns (new state, metrics)."""
    cfg = sim.cfg
    plan = plan_round(range(cfg.partition.num_clients), cfg.federated, cfg.heads, cfg.seed, round_, rng, stats,
                      sim.lm.layout, functools.partial(sim.global_losses, state), state=state,
                      dropout_probability=cfg.robust.dropout_probability)
    known = {c: len(sim.parts[c]) for c in plan.sent}  # the server made the partition: it knows each size
    result = close_round(plan, state, map(functools.partial(sim.client_reply, plan), plan.sent), stats,
                         sim.server_moments, sim.lm.layout, sim.options, known_sizes=known)
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
