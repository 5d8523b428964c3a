"""heads.mode = 'mixed': the lowest-scored heads removed from compute, the other pruned heads computed but
frozen. It must reduce to 'remove' and 'train_sparse' at its two ends, and cost in between."""

from __future__ import annotations

import pytest
import torch

from fedhead.federated.client import client_update
from fedhead.federated.state import trainable_state
from fedhead.models.slicing import gather_kept
from fedhead.runners.local import Simulation
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def sim(tiny_bert_dir, tmp_path_factory):
    cfg = tiny_config(tiny_bert_dir, tmp_path_factory.mktemp("mixed"),
                      heads={"sparsity": 0.75, "scope": "per_block"}, federated={"local_steps": 3})
    return Simulation.setup(cfg)


def _update(sim: Simulation, **heads):
    cfg = sim.cfg.model_copy(deep=True)
    for key, value in heads.items():
        setattr(cfg.heads, key, value)
    state = trainable_state(sim.lm.model)
    return client_update(sim.lm, state, sim.client_data(1), cfg, client_id=1, round_=1), state


def _same(a, b) -> None:
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name
    assert torch.equal(a.kept_heads, b.kept_heads) and a.stats == b.stats and a.train_loss == b.train_loss


def test_mixed_reduces_to_remove_and_train_sparse(sim):
    remove, _ = _update(sim, mode="remove")
    sparse, _ = _update(sim, mode="train_sparse")
    _same(_update(sim, mode="mixed", compute_sparsity=0.75)[0], remove)
    _same(_update(sim, mode="mixed", compute_sparsity=0.0)[0], sparse)
    with pytest.raises(ValueError, match="at most the sparsity"):
        _update(sim, mode="mixed", compute_sparsity=0.9)


def test_mixed_trains_kept_heads_only_at_intermediate_cost(sim):
    remove, _ = _update(sim, mode="remove")
    sparse, _ = _update(sim, mode="train_sparse")
    mixed, state = _update(sim, mode="mixed", compute_sparsity=0.5)
    assert int(mixed.kept_heads.sum()) == 2  # one of 4 heads in each of 2 blocks is trained and sent
    before = gather_kept(state, mixed.kept_heads, sim.lm.layout)
    for name, tensor in mixed.tensors.items():
        assert tensor.shape == remove.tensors[name].shape, name  # same upload as remove
    for name in sim.lm.layout.sliced:
        assert not torch.equal(mixed.tensors[name], before[name]), name  # the kept heads' slices were trained
    assert remove.stats["train_flops"] < mixed.stats["train_flops"] < sparse.stats["train_flops"]
    # the kept heads saw a different forward (two heads per block computed, one frozen), so they learned differently
    assert any(not torch.equal(mixed.tensors[n], remove.tensors[n]) for n in mixed.tensors)


def test_mixed_without_autograd_reduces_to_sparse_backward_and_keeps_the_mixed_forward(sim):
    """`heads.frozen_autograd = false`: the frozen heads are computed without autograd. Rules out a no-grad mixed
    mode that drops its frozen heads (its first loss would be remove's), that keeps the removed ones (it would
    be sparse_backward's), or that still runs autograd through the frozen heads (its FLOPs and saved bytes would
    be mixed's)."""
    sb, _ = _update(sim, mode="sparse_backward")
    _same(_update(sim, mode="mixed", compute_sparsity=0.0, frozen_autograd=False)[0], sb)
    _same(_update(sim, mode="mixed", compute_sparsity=0.75, frozen_autograd=False)[0], _update(sim, mode="remove")[0])
    one_step = {"compute_sparsity": 0.5, "mode": "mixed"}
    sim.cfg.federated.local_steps = 1  # the loss of the only step is the forward's before any update
    try:
        mixed, _ = _update(sim, **one_step)
        no_grad, _ = _update(sim, **one_step, frozen_autograd=False)
        remove, _ = _update(sim, mode="remove")
    finally:
        sim.cfg.federated.local_steps = 3
    # the same forward up to dropout, whose masks the side computation draws in another order
    assert abs(no_grad.train_loss - mixed.train_loss) < abs(no_grad.train_loss - remove.train_loss) / 10, (
        no_grad.train_loss, mixed.train_loss, remove.train_loss)
    assert remove.stats["train_flops"] < no_grad.stats["train_flops"] < mixed.stats["train_flops"]
    assert no_grad.stats["peak_memory_bytes"] < mixed.stats["peak_memory_bytes"]
    assert no_grad.tensors.keys() == mixed.tensors.keys()
    for name in no_grad.tensors:
        assert no_grad.tensors[name].shape == mixed.tensors[name].shape, name  # only the kept heads travel


def test_frozen_autograd_applies_to_mixed_only():
    from fedhead.config import HeadsSection

    for bad in ({"mode": "sparse_backward"}, {"mode": "mixed", "scale_kept": True},
                {"mode": "mixed", "compensate": "mean"}):
        with pytest.raises(ValueError, match="frozen_autograd"):
            HeadsSection(frozen_autograd=False, sparsity=0.9, **bad)


def test_options_that_do_not_apply_are_rejected():
    from fedhead.config import HeadsSection, ModelSection

    with pytest.raises(ValueError, match="at most the sparsity"):
        HeadsSection(mode="mixed", sparsity=0.3, compute_sparsity=0.5)
    HeadsSection(mode="mixed", tiers=[0.3, 0.9], compute_sparsity=0.5)  # per tier, capped at its sparsity
    with pytest.raises(ValueError, match="pooling = 'mean' does not use it"):
        ModelSection(train_pooler=True, pooling="mean")
    ModelSection(train_pooler=True, pooling="cls")
