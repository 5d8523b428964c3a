import math

import numpy as np
import pytest

from fedhead.federated.selection import ClientStats, select_clients


def test_random_is_seeded():
    a = select_clients("random", 50, 5, 1, np.random.default_rng(3), ClientStats())
    b = select_clients("random", 50, 5, 1, np.random.default_rng(3), ClientStats())
    assert a.clients == b.clients and len(set(a.clients)) == 5


def test_never_seen_first_then_largest_gap():
    stats = ClientStats()
    stats.record(0, 1, loss_global=2.0, loss_local=0.5, kept=[])  # gap 1.5
    stats.record(1, 1, loss_global=1.0, loss_local=0.9, kept=[])  # gap 0.1
    stats.record(2, 1, loss_global=1.5, loss_local=0.5, kept=[])  # gap 1.0
    sel = select_clients("loss_gap", 4, 2, 2, np.random.default_rng(0), stats, exploration=0.0)
    assert sel.clients == [0, 3]  # 3 was never seen; 0 has the largest gap
    assert sel.priorities[3] == math.inf


@pytest.mark.parametrize(("n", "k"), [(10, 3), (25, 4), (7, 7)])
def test_exploration_reaches_every_client(n, k):
    stats, rng, seen = ClientStats(), np.random.default_rng(0), set()
    for r in range(1, math.ceil(n / k) + 3):
        sel = select_clients("loss_gap", n, k, r, rng, stats, exploration=0.1)
        for c in sel.clients:
            # a client that always looks well served (tiny gap) must still come back
            stats.record(c, r, loss_global=1.0 + 0.01 * c, loss_local=1.0, kept=[])
            seen.add(c)
    assert seen == set(range(n))


def test_power_of_choice_picks_highest_global_loss():
    losses = {c: float(c) for c in range(20)}
    sel = select_clients("power_of_choice", 20, 2, 1, np.random.default_rng(1), ClientStats(), candidates_d=6,
                         global_loss_of=lambda cs: {c: losses[c] for c in cs})
    candidates = sorted(int(c) for c in sel.priorities)
    assert len(candidates) == 6 and sel.clients == candidates[-2:]


def test_head_coverage_prefers_uncovered_heads():
    stats = ClientStats()
    for c, kept in enumerate([[0, 1], [0, 1], [2, 3]]):
        stats.record(c, 1, 1.0, 1.0, kept)
    sel = select_clients("head_coverage", 3, 2, 2, np.random.default_rng(0), stats, exploration=0.0)
    assert 2 in sel.clients and len(sel.clients) == 2
