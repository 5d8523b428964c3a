"""The mechanisms of the accuracy issue: sparse_backward, the rolling and coverage head schedules, the warm-up,
HeteroFL's scaler, the server optimisers, and the activation-memory count they are measured with."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from fedhead.config import ConfigError
from fedhead.federated.accounting import saved_activation_bytes
from fedhead.federated.client import client_update
from fedhead.federated.server_optimizer import ServerOptimizer, server_step
from fedhead.federated.state import trainable_state
from fedhead.heads.pruning import coverage_heads_mask, kept_heads_mask, rolling_heads_mask
from fedhead.models.slicing import attach_frozen_heads, prune_heads_, scale_kept_context
from fedhead.runners.local import Simulation, run_simulation
from tests.conftest import read_metrics, tiny_config

KEPT = torch.tensor([[True, False, True, False], [False, True, False, False]])


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_sparse_backward_forward_is_the_whole_model(tiny_lora):
    """Rules out a sparse_backward that drops the pruned heads (it would equal `remove`) or adds their
    contribution twice (the output projection's bias counted again)."""
    lm, batch = tiny_lora
    full = copy.deepcopy(lm.model).eval()
    ref = full(**batch)
    work = copy.deepcopy(lm.model).eval()
    prune_heads_(work, lm.head_map, KEPT, lm.prefix)
    removed_only = work(**batch).logits.detach()
    handles = attach_frozen_heads(work, copy.deepcopy(lm.model), lm.head_map, KEPT, lm.prefix)
    out = work(**batch)
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    assert not torch.allclose(removed_only, ref.logits, atol=1e-3)
    # the last block's kept heads see no pruned head downstream: their gradient is exact
    out.loss.backward()
    ref.loss.backward()
    full_grads, work_grads = _grads(full), _grads(work)
    name = next(n for n in work_grads if "layer.1.attention.self.query.lora_B" in n)
    rows = lm.layout.index_of(name, KEPT)
    assert torch.allclose(work_grads[name], full_grads[name][rows], atol=1e-6)
    for h in handles:
        h.remove()
    assert torch.allclose(work(**batch).logits, removed_only, atol=1e-6)  # the hooks are gone


def test_sparse_backward_rejects_t5():
    from fedhead.models.head_map import Block, HeadMap, UnsupportedModelError

    head_map = HeadMap("t5", (Block("b", "a", {"query": "a.q"}, 4, 8),))
    with pytest.raises(UnsupportedModelError, match="sparse_backward"):
        attach_frozen_heads(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), head_map, KEPT[:1], "")


@pytest.fixture(scope="module")
def sim(tiny_bert_dir, tmp_path_factory):
    cfg = tiny_config(tiny_bert_dir, tmp_path_factory.mktemp("mech"),
                      heads={"sparsity": 0.75, "scope": "per_block"}, federated={"local_steps": 3})
    return Simulation.setup(cfg)


def _update(sim: Simulation, round_: int = 1, **heads):
    cfg = sim.cfg.model_copy(deep=True)
    for key, value in heads.items():
        setattr(cfg.heads, key, value)
    state = trainable_state(sim.lm.model)
    return client_update(sim.lm, state, sim.client_data(1), cfg, client_id=1, round_=round_)


def test_sparse_backward_costs_between_remove_and_train_sparse(sim):
    """Rules out a sparse_backward that still runs autograd through the pruned heads (its FLOPs and saved
    activations would equal train_sparse's) or that skips their forward (FLOPs equal to remove's)."""
    remove, sparse, sb = (_update(sim, mode=m) for m in ("remove", "train_sparse", "sparse_backward"))
    assert torch.equal(sb.kept_heads, remove.kept_heads)
    assert {n: t.shape for n, t in sb.tensors.items()} == {n: t.shape for n, t in remove.tensors.items()}
    assert remove.stats["train_flops"] < sb.stats["train_flops"] < sparse.stats["train_flops"]
    assert sb.stats["peak_memory_bytes"] < sparse.stats["peak_memory_bytes"]
    assert remove.stats["peak_memory_bytes"] == sb.stats["peak_memory_bytes"]  # no graph for the side heads


def test_rolling_windows_cover_every_head_evenly():
    """Rules out a schedule whose window does not move (FedRolex's point) or gives a round's clients the same heads."""
    blocks, heads, s = 3, 12, 0.9  # k = 2 heads a block
    counts = torch.zeros(blocks, heads)
    for round_ in range(1, 7):
        masks = [rolling_heads_mask(blocks, heads, s, round_, c) for c in range(4)]
        assert all(int(m[b].sum()) == 2 for m in masks for b in range(blocks))
        assert not (masks[0] & masks[1]).any()  # adjacent clients, disjoint windows
        counts += masks[0].float()
    assert torch.equal(counts, torch.ones(blocks, heads))  # 6 rounds x 2 heads: each head once


def test_shared_rolling_window_is_fedrolex_rule():
    """Shared windows: every client of a round keeps the same heads, and the window moves one head a round
    (FedRolex: roll = round mod size), so over H rounds each head is kept k times by every client."""
    blocks, heads, s = 2, 12, 0.9
    counts = torch.zeros(blocks, heads)
    for round_ in range(heads):
        masks = [rolling_heads_mask(blocks, heads, s, round_, c, shared=True) for c in (0, 3, 7)]
        assert all(torch.equal(m, masks[0]) for m in masks)
        assert masks[0][0].nonzero().flatten().tolist() == sorted([round_ % heads, (round_ + 1) % heads])
        counts += masks[0].float()
    assert torch.equal(counts, torch.full((blocks, heads), 2.0))


def test_rolling_schedule_in_a_client_update(sim):
    a, b = _update(sim, round_=1, schedule="rolling"), _update(sim, round_=2, schedule="rolling")
    assert torch.equal(a.kept_heads, rolling_heads_mask(2, 4, 0.75, 1, 1))
    assert not torch.equal(a.kept_heads, b.kept_heads)
    shared = _update(sim, round_=2, schedule="rolling", rolling_window="shared")
    assert torch.equal(shared.kept_heads, rolling_heads_mask(2, 4, 0.75, 2, 0, shared=True))


def test_coverage_keeps_the_least_trained_of_the_acceptable_heads():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
                           [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    counts = torch.tensor([[5, 0, 3, 0, 0, 0],
                           [0, 0, 0, 0, 2, 2]])
    # k = 2 of 6; pool 0.5: the top 3 by score are acceptable, the 2 least trained of them kept
    kept = coverage_heads_mask(scores, counts, 2 / 3, pool=0.5)
    assert kept.nonzero().tolist() == [[0, 1], [0, 2], [1, 3], [1, 5]]  # block 1: 3 untrained, then 5 beats 4
    # pool 1: the least trained anywhere, ties by score (block 0: heads 1, 3, 4, 5 untrained, 1 and 3 score higher)
    assert coverage_heads_mask(scores, counts, 2 / 3, pool=1.0).nonzero().tolist() == [[0, 1], [0, 3], [1, 2], [1, 3]]
    # nothing trained yet, or a pool no larger than k: the client's own top k
    top = kept_heads_mask(scores, 2 / 3, "per_block")
    assert torch.equal(coverage_heads_mask(scores, torch.zeros_like(counts), 2 / 3, pool=0.5), top)
    assert torch.equal(coverage_heads_mask(scores, counts, 2 / 3, pool=0.1), top)
    with pytest.raises(ValueError, match="shape"):
        coverage_heads_mask(scores, counts[:1], 0.5, 0.5)


def test_coverage_schedule_trains_heads_evenly_and_resumes(tiny_bert_dir, tmp_path):
    """Over a run the server's counts reach the clients: with pool 1 every client of a round keeps the heads least
    trained before the round, so the per-head counts stay within one round's clients of each other, where the
    importance schedule keeps training the same heads; the counts survive a resume."""
    # Prepare
    heads = {"sparsity": 0.75, "schedule": "coverage", "coverage_pool": 1.0}
    cfg = tiny_config(tiny_bert_dir, tmp_path, heads=heads, federated={"rounds": 4, "local_steps": 1})
    # Execute
    run_simulation(cfg, tmp_path / "run")
    run_simulation(cfg, tmp_path / "resumed", stop_after=2)
    run_simulation(cfg, tmp_path / "resumed", resume=True)
    importance = tiny_config(tiny_bert_dir, tmp_path, heads={"sparsity": 0.75},
                             federated={"rounds": 4, "local_steps": 1})
    run_simulation(importance, tmp_path / "importance")
    # Assert
    def kept_per_round(run):
        return [[c["kept_heads"] for c in m["clients"]] for m in read_metrics(run) if m.get("round", 0) > 0]

    def final_counts(run):
        counts = torch.zeros(8, dtype=torch.int64)  # 2 blocks x 4 heads
        for clients in kept_per_round(run):
            for kept in clients:
                counts[kept] += 1
        return counts

    counts = torch.zeros(2, 4, dtype=torch.int64)  # the server's counts at the start of each round
    for clients in kept_per_round(tmp_path / "run"):
        for kept in clients:  # k = 1 head a block: one of the least trained of its block
            assert all(counts[h // 4, h % 4] == counts[h // 4].min() for h in kept)
        for kept in clients:
            counts.view(-1)[kept] += 1
    assert int(final_counts(tmp_path / "run").max() - final_counts(tmp_path / "run").min()) <= 3
    assert torch.equal(final_counts(tmp_path / "resumed"), final_counts(tmp_path / "run"))
    assert kept_per_round(tmp_path / "resumed") == kept_per_round(tmp_path / "run")
    assert int(final_counts(tmp_path / "importance").max() - final_counts(tmp_path / "importance").min()) > 3


def test_options_that_do_not_apply_are_rejected(tiny_bert_dir, tmp_path):
    for heads, message in [({"schedule": "rolling", "selection": "sample"}, "does not apply"),
                           ({"schedule": "rolling", "scope": "global"}, "per_block"),
                           ({"schedule": "coverage", "selection": "sample"}, "does not apply"),
                           ({"schedule": "coverage", "scope": "global"}, "per_block"),
                           ({"scale_kept": True, "mode": "train_sparse"}, "scale_kept"),
                           ({"compensate": "mean", "mode": "sparse_backward"}, "compensate"),
                           ({"rolling_window": "shared"}, "rolling_window")]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(tiny_bert_dir, tmp_path, heads=heads)


def test_warmup_rounds_are_dense(sim):
    cfg = sim.cfg.model_copy(deep=True)
    cfg.heads.warmup_rounds = 2
    assert cfg.heads.sparsity_of(1, 2) == 0.0 and cfg.heads.sparsity_of(1, 3) == 0.75
    assert bool(_update(sim, round_=2, warmup_rounds=2).kept_heads.all())
    assert not bool(_update(sim, round_=3, warmup_rounds=2).kept_heads.all())


def test_scale_kept_multiplies_the_context_during_training_only(tiny_lora, sim):
    """Rules out a scaler with the wrong factor (k / H instead of H / k) or one left on at evaluation."""
    lm, batch = tiny_lora
    pruned = copy.deepcopy(lm.model).eval()
    prune_heads_(pruned, lm.head_map, KEPT, lm.prefix)
    scaled_by_hand = copy.deepcopy(pruned)
    with torch.no_grad():
        for b, block in enumerate(lm.head_map.blocks):
            o = scaled_by_hand.get_submodule(lm.prefix + block.projections["output"])
            factor = 4 / int(KEPT[b].sum())
            o.base_layer.weight.mul_(factor)
            o.lora_A["default"].weight.mul_(factor)
    handles = scale_kept_context(pruned, lm.head_map, KEPT, lm.prefix)
    assert all(h.training_only for h in handles)
    assert torch.allclose(pruned(**batch).logits, scaled_by_hand(**batch).logits, atol=1e-5)
    plain = _update(sim, mode="remove")
    scaled = _update(sim, mode="remove", scale_kept=True)
    assert scaled.train_loss != plain.train_loss


def _flower_adam(x, agg, m, v, rnd, eta, b1, b2, tau):
    """flwr.serverapp.strategy.FedAdam.aggregate_train's arithmetic, in numpy."""
    delta = agg - x
    m = b1 * m + (1 - b1) * delta
    v = b2 * v + (1 - b2) * delta**2
    eta_norm = eta * np.sqrt(1 - np.power(b2, rnd + 1.0)) / (1 - np.power(b1, rnd + 1.0))
    return x + eta_norm * m / (np.sqrt(v) + tau), m, v


def test_server_adam_and_momentum_follow_flower_and_skip_untrained_heads():
    """Rules out moments updated for a head nobody trained (its slice would drift from momentum alone) and a
    step that differs from Flower's FedAdam / FedAvgM on the elements that were trained."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3))
    opt = ServerOptimizer("adam", learning_rate=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    trained = torch.tensor([[True] * 3, [True] * 3, [False] * 3, [True] * 3])  # row 2: a head nobody kept
    state, moments = {"w": torch.tensor(x)}, {}
    fx, fm, fv = x.copy(), np.zeros_like(x), np.zeros_like(x)
    for rnd in (1, 2, 3):
        agg = fx + rng.normal(scale=1e-2, size=x.shape)
        state, moments = server_step(state, {"w": torch.tensor(agg)}, {"w": trained}, moments, opt)
        fx_new, fm, fv = _flower_adam(fx, agg, fm, fv, rnd, 0.01, 0.9, 0.99, 1e-3)
        fx = np.where(trained.numpy(), fx_new, fx)
        fm, fv = np.where(trained.numpy(), fm, 0), np.where(trained.numpy(), fv, 0)
    assert np.allclose(state["w"].numpy(), fx)
    assert np.array_equal(state["w"].numpy()[2], x[2]) and float(moments["m/w"][2].abs().sum()) == 0
    # FedAvgM: x_{t+1} = x_t - eta (beta m + (x_t - agg))
    mom = ServerOptimizer("momentum", learning_rate=0.5, momentum=0.9)
    every = {"w": torch.ones(2, dtype=torch.bool)}
    s1, m1 = server_step({"w": torch.zeros(2)}, {"w": torch.ones(2)}, every, {}, mom)
    s2, _ = server_step(s1, {"w": s1["w"] + 1}, every, m1, mom)
    assert torch.allclose(s1["w"], torch.full((2,), 0.5))
    assert torch.allclose(s2["w"], torch.full((2,), 0.5 + 0.5 * (0.9 + 1)))


def test_saved_activation_bytes_counts_what_autograd_keeps():
    """A Linear with a trainable weight saves its input for the weight's gradient, and nothing else of its own;
    rules out counting the parameters or counting a storage twice."""
    linear = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    storages: list = []
    with saved_activation_bytes(linear, storages) as saved:
        y = linear(x)
        z = y * y  # saves y (one storage, counted once even though both operands are y)
    assert saved[0] == x.nbytes + y.nbytes
    assert sorted(storages) == sorted([(x.nbytes, (3, 8)), (y.nbytes, (3, 4))])  # what each counted byte was
    z.sum().backward()
    linear.weight.requires_grad_(False)
    linear.bias.requires_grad_(False)
    with saved_activation_bytes(linear) as frozen:
        linear(x.requires_grad_())  # a frozen weight needs no input saved for its gradient
    assert frozen[0] == 0


def test_power_of_choice_scores_candidates_on_its_own_sample(sim):
    """Rules out power-of-choice candidates reporting the global model's loss on heads.samples rows (the head
    scoring sample) instead of federated.power_of_choice_samples, in both engines: the in-process server's
    loss equals the loss on the client's first 3 rows, and a Flower node answers with 3 examples."""
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedhead.federated.evaluation import evaluate
    from fedhead.federated.payload import encode_state
    from fedhead.runners.flower_client import evaluate_reply, payload_record

    # Prepare: heads.samples (8) and power_of_choice_samples (3) differ
    fed = sim.cfg.federated.model_copy(update={"selection": "power_of_choice", "power_of_choice_samples": 3})
    cfg = sim.cfg.model_copy(update={"federated": fed})
    run = dataclasses.replace(sim, cfg=cfg)
    state = trainable_state(sim.lm.model)
    data = sim.client_data(0)

    def loss_on(rows: int) -> float:
        return evaluate(sim.lm.model, data.select(range(rows)), sim.lm.tokenizer, 8, task=sim.lm.task)["eval_loss"]

    # Execute
    server_side = run.global_losses(state, [0])[0]
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # a message outside Flower
    try:
        ask = Message(RecordDict({"arrays": payload_record(encode_state(state))}), 1, "evaluate")
        node_side = evaluate_reply(ask, sim.lm, data, cfg).content["metrics"]
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
    # Assert
    assert cfg.heads.samples == 8 and loss_on(3) != pytest.approx(loss_on(8))
    assert server_side == pytest.approx(loss_on(3))
    assert node_side["num-examples"] == 3 and node_side["eval_loss"] == pytest.approx(loss_on(3))
