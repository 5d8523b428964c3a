"""The server round in two calls (`federated.server.plan_round` / `close_round`), which both engines use: what the
plan fixes (eligible clients, head counts, the DP noise stream) and that closing a round is `server_round` with
the plan's noise and the round's timings."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterator

import numpy as np
import torch

from fedhead.config import FederatedSection, HeadsSection
from fedhead.federated.payload import encode_state
from fedhead.federated.selection import ClientStats, select_among
from fedhead.federated.server import Reply, ServerOptions, close_round, plan_round, server_round
from fedhead.seeds import SERVER, Stream, derived_seed
from tests.test_robustness import GLOBAL, LAYOUT, valid_update

FULL = ((True, True), (True, True))


def _no_losses(clients: list[int]) -> dict[int, float]:
    return {}


def test_plan_round_selects_among_the_eligible_clients_sorted_and_seeds_the_dp_noise_from_the_round():
    # Prepare: clients 0-5 reachable in any order, odd clients in a tier that is never selected
    fed = FederatedSection(clients_per_round=2, selection="random", tier_selectable=[True, False])
    stats = ClientStats()
    stats.record(2, 1, loss_global=1.0, loss_local=0.5, kept=[0, 3])
    rng, twin = np.random.default_rng(7), np.random.default_rng(7)
    # Execute
    plan = plan_round([5, 0, 3, 4, 1, 2], fed, HeadsSection(schedule="coverage"), 11, 3, rng, stats, LAYOUT,
                      _no_losses, started=1.5)
    # Assert: the in-process engine's draw over the eligible ids, sorted; the coverage counts as at the start
    assert plan.selection == select_among([0, 2, 4], fed, 3, twin, stats, _no_losses)
    assert plan.round_ == 3 and plan.started == 1.5
    assert plan.head_counts is not None and plan.head_counts.tolist() == [[1, 0], [0, 1]]
    assert plan.noise.initial_seed() == derived_seed(11, 3, SERVER, Stream.DP_NOISE)
    assert plan_round([0, 1], fed, HeadsSection(), 11, 3, rng, stats, LAYOUT, _no_losses).head_counts is None


def test_plan_round_fixes_the_payload_sent_and_the_clients_it_reaches():
    # Prepare: four clients, all selected, half of them failing (robust.dropout_probability)
    fed = FederatedSection(clients_per_round=4, selection="random")
    # Execute
    plan = plan_round(range(4), fed, HeadsSection(), 3, 1, np.random.default_rng(0), ClientStats(), LAYOUT,
                      _no_losses, state=GLOBAL, dropout_probability=0.5)
    # Assert: every client receives the state's payload; the dropped ones are not sent to and close as failed
    assert plan.down == encode_state(GLOBAL)
    assert plan.dropped and set(plan.sent) == set(plan.selection.clients) - set(plan.dropped)
    result = close_round(plan, GLOBAL, [], ClientStats(), {}, LAYOUT, ServerOptions())
    assert [f["client"] for f in result.metrics["failed"]] == plan.dropped


def test_close_round_is_server_round_with_the_plans_noise_and_the_rounds_timings():
    # Prepare: a DP round of three clients (the noise shows in the aggregate)
    fed = FederatedSection(clients_per_round=3, selection="random")
    opts = ServerOptions(dp_noise_multiplier=1.0, dp_clipping_norm=10.0)
    plan = plan_round(range(3), fed, HeadsSection(), 5, 2, np.random.default_rng(0), ClientStats(), LAYOUT,
                      _no_losses)
    replies = [Reply(c, valid_update(c, FULL, shift=0.1 * (c + 1)), 100, 50) for c in plan.selection.clients]
    expected = server_round(GLOBAL, 2, copy.deepcopy(replies), plan.selection, ClientStats(), {}, LAYOUT, opts,
                            noise=torch.Generator().manual_seed(derived_seed(5, 2, SERVER, Stream.DP_NOISE)))

    def read() -> Iterator[Reply]:
        for reply in replies:  # a driver that trains each client (0.2 s) while its reply is read
            t = time.perf_counter()
            time.sleep(0.2)
            yield dataclasses.replace(reply, seconds_in_read=time.perf_counter() - t)

    # Execute
    result = close_round(plan, GLOBAL, read(), ClientStats(), {}, LAYOUT, opts)
    # Assert
    assert result.state.keys() == expected.state.keys()
    for name, value in expected.state.items():
        assert torch.equal(result.state[name], value), name
    timings = {k: result.metrics.pop(k) for k in ("seconds_clients", "seconds_aggregate")}
    assert result.metrics == expected.metrics
    assert timings["seconds_clients"] >= 0.6  # from plan.started to close_round, plus the clients' 3 x 0.2 s
    assert 0.0 <= timings["seconds_aggregate"] < 0.5  # the clients' seconds are not the server's
