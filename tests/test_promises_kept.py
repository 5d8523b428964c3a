"""Four promises no test kept (issue 40): each bug named in a test's docstring passed the whole fast suite before
these tests; each test was seen failing with its bug put in by hand."""

from __future__ import annotations

import numpy as np
import torch

from fedhead.federated.accounting import saved_activation_bytes
from fedhead.federated.payload import ClientUpdate
from fedhead.federated.selection import ClientStats, Selection, select_clients
from fedhead.federated.server import Reply, ServerOptions, server_round
from fedhead.federated.server_optimizer import ServerOptimizer, trained_masks
from fedhead.federated.state import State
from fedhead.models.head_map import HeadLayout
from fedhead.models.slicing import gather_kept
from tests.test_mechanisms import _flower_adam

# Two blocks of 3 heads, head_dim 1: "qb" is a q LoRA B of block 0 (rows = heads), "oa" an o LoRA A of block 1
# (columns = heads), "cls" a shared tensor (not split by head, e.g. the classifier).
LAYOUT = HeadLayout(num_blocks=2, num_heads=3, head_dim=1, sliced={"qb": (0, 0), "oa": (1, 1)})
GLOBAL: State = {"qb": torch.arange(6.0).view(3, 2), "oa": torch.ones(2, 3), "cls": torch.zeros(4)}


def _update(cid: int, kept: list[list[bool]], shift: float, loss_before: float = 1.0, loss_after: float = 0.8,
            state: State = GLOBAL, layout: HeadLayout = LAYOUT, num_examples: int = 10) -> ClientUpdate:
    """A well-formed update: every value `shift` away from `state`, on the kept heads' slices."""
    kept_t = torch.tensor(kept)
    full = {k: v + shift for k, v in state.items()}
    return ClientUpdate(cid, num_examples, kept_t, torch.full(kept_t.shape, 0.5), gather_kept(full, kept_t, layout),
                        loss_before, loss_after, 0.9)


def _round(updates: list[ClientUpdate], opts: ServerOptions = ServerOptions(), stats: ClientStats | None = None,
           state: State = GLOBAL, layout: HeadLayout = LAYOUT, moments: State | None = None, round_: int = 1):
    selection = Selection([u.client_id for u in updates], {}, "test")
    replies = [Reply(u.client_id, u, 100, 50) for u in updates]
    return server_round(state, round_, replies, selection, stats if stats is not None else ClientStats(),
                        moments or {}, layout, opts)


def test_server_round_records_losses_the_right_way_round_and_loss_gap_picks_the_largest_gap():
    """Rules out `server_round` recording a client's `loss_before` and `loss_after` swapped: loss-gap selection
    would then pick the clients the global model serves best. L_global is the loss before local training."""
    # Prepare: gaps L_before - L_after of 0.2, 0.9 and 0.05
    losses = {0: (1.0, 0.8), 1: (1.5, 0.6), 2: (0.7, 0.65)}
    full = [[True] * 3, [True] * 3]
    updates = [_update(c, full, 0.1, before, after) for c, (before, after) in losses.items()]
    stats = ClientStats()
    # Execute
    _round(updates, stats=stats)
    picked = select_clients("loss_gap", 3, 1, 2, np.random.default_rng(0), stats, exploration=0.1)
    # Assert
    for c, (before, after) in losses.items():
        assert stats.loss_global[c] == before and stats.loss_local[c] == after, c
    assert picked.clients == [1]
    assert picked.priorities[1] == 1.5 - 0.6 + 0.1 * (2 - 1)


def test_trained_masks_cover_shared_tensors_and_exactly_the_kept_heads():
    """Rules out `trained_masks` marking a shared tensor (not split by head) untrained, or a head-split tensor's
    mask off the heads some client kept: with momentum 0 and server learning rate 1 the server step is then no
    longer the plain aggregate (the classifier would never move under `federated.server_optimizer`)."""
    # Prepare: block 0 heads 0 and 2 kept by some client, block 1 head 1 only
    updates = [_update(0, [[True, False, False], [False, True, False]], 0.5),
               _update(1, [[False, False, True], [False, True, False]], 1.5)]
    # Execute
    masks = trained_masks(GLOBAL, updates, LAYOUT)
    plain = _round(updates)
    stepped = _round(updates, ServerOptions(optimizer=ServerOptimizer("momentum", learning_rate=1.0, momentum=0.0)))
    # Assert
    assert masks.keys() == GLOBAL.keys()
    assert torch.equal(masks["cls"], torch.ones(4, dtype=torch.bool))
    assert torch.equal(masks["qb"], torch.tensor([[True, True], [False, False], [True, True]]))  # rows = heads
    assert torch.equal(masks["oa"], torch.tensor([[False, True, False]] * 2))  # columns = heads
    assert not torch.equal(plain.state["cls"], GLOBAL["cls"])  # the shared tensor moves in the aggregate
    for name in GLOBAL:
        assert torch.allclose(stepped.state[name], plain.state[name], rtol=0, atol=1e-6), name


def test_adam_counts_steps_per_element_for_a_head_left_out_and_trained_again():
    """Rules out Adam's step count (`n/`) advancing for an element no client trained: head 1, trained in rounds
    1 and 4 and left out in rounds 2-3, must get the bias correction of 2 steps in round 4, not of 4. Checked
    against Flower's FedAdam arithmetic run per element over the rounds that element was trained."""
    # Prepare: one block of 2 heads, head_dim 1, and a shared tensor
    layout = HeadLayout(num_blocks=1, num_heads=2, head_dim=1, sliced={"qb": (0, 0)})
    f64 = torch.float64
    state: State = {"qb": torch.tensor([[0.5], [-0.25]], dtype=f64), "cls": torch.tensor([0.1], dtype=f64)}
    opt = ServerOptimizer("adam", learning_rate=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    plan = [((True, True), 0.3), ((True, False), -0.2), ((True, False), 0.1), ((True, True), 0.4)]  # kept, shift
    moments: State = {}
    # Flower's FedAdam per element: (x, m, v, steps so far) of head 0, head 1 and the shared value
    reference = {"h0": [0.5, 0.0, 0.0, 0], "h1": [-0.25, 0.0, 0.0, 0], "cls": [0.1, 0.0, 0.0, 0]}
    # Execute
    for round_, (kept, shift) in enumerate(plan, start=1):
        update = _update(0, [list(kept)], shift, state=state, layout=layout)
        result = _round([update], ServerOptions(optimizer=opt), state=state, layout=layout, moments=moments,
                        round_=round_)
        state, moments = result.state, result.moments
        for key, trained in (("h0", kept[0]), ("h1", kept[1]), ("cls", True)):
            if trained:  # the aggregate of one client is its value: x + shift
                x, m, v, n = reference[key]
                x, m, v = _flower_adam(x, x + shift, m, v, n + 1, 0.1, 0.9, 0.99, 1e-3)
                reference[key] = [x, m, v, n + 1]
    # Assert
    assert moments["n/qb"].flatten().tolist() == [4, 2] and moments["n/cls"].tolist() == [4]
    assert np.isclose(float(state["qb"][0, 0]), reference["h0"][0], rtol=0, atol=1e-12)
    assert np.isclose(float(state["qb"][1, 0]), reference["h1"][0], rtol=0, atol=1e-12)
    assert np.isclose(float(state["cls"][0]), reference["cls"][0], rtol=0, atol=1e-12)


def test_saved_activation_bytes_count_the_whole_storage_of_a_saved_view_once():
    """Rules out counting a saved view's own bytes instead of its storage's (memory under-reported: 64 bytes
    for `Linear(8, 4)` on `x[:2]`), and counting two views of one storage twice: autograd keeps the whole
    storage of `x` alive, once."""
    # Prepare
    linear = torch.nn.Linear(8, 4)
    x = torch.randn(4, 8)  # 128 bytes; its two halves are views of one storage
    storages: list = []
    # Execute
    with saved_activation_bytes(linear, storages) as saved:
        linear(x[:2])
        linear(x[2:])
    # Assert
    assert x.nbytes == 128 and x[:2].nbytes == 64
    assert saved[0] == 128
    assert storages == [(128, (2, 8))]
