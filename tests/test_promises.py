"""Promises a plausible wrong implementation would break without any other test noticing (issue "Prove the
promises"): each test's docstring names the wrong implementation it rules out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedhead.federated.accounting import count_flops
from fedhead.federated.payload import encode_update
from fedhead.federated.privacy import client_delta, clip_delta, dp_aggregate, epsilon_spent
from fedhead.federated.selection import ClientStats, select_clients
from fedhead.models import build_model
from fedhead.models.slicing import prune_heads_
from fedhead.run_dir import RunDir
from fedhead.runners.local import run_simulation
from tests.conftest import read_metrics, strip_timings, tiny_config
from tests.test_robustness import GLOBAL, LAYOUT, valid_update


def _norm(delta) -> float:
    return math.sqrt(sum(float((d**2).sum()) for d in delta.values()))


@pytest.mark.parametrize("shift,expected", [(0.1, None), (0.25, None), (2.0, 1.0)])
def test_dp_clipping_on_known_norms(shift, expected):
    """Rules out a no-op clip (norm 2 would pass through) and a clip that rescales updates already inside the
    bound. The delta is the full-shaped one the aggregation sees: zero on the heads the client pruned."""
    u = valid_update(0, kept=((True, False), (True, True)), shift=shift)
    delta = client_delta(u, GLOBAL, LAYOUT)
    kept_values = sum(t.numel() for t in u.tensors.values())
    assert math.isclose(_norm(delta), shift * math.sqrt(kept_values), rel_tol=1e-6)
    assert float(delta["qb"][2:].abs().sum()) == 0  # head (0, 1) was pruned: no delta there
    bound = shift * math.sqrt(kept_values) if expected is None else expected
    clipped = clip_delta(delta, 1.0 if expected is not None else bound)
    assert math.isclose(_norm(clipped), bound, rel_tol=1e-6)
    for name in delta:  # same direction
        assert torch.allclose(clipped[name] * _norm(delta), delta[name] * _norm(clipped), atol=1e-9)


def test_dp_aggregate_averages_the_clipped_deltas():
    """Rules out averaging raw deltas (the big client would dominate) or weighting by data size under DP."""
    small = valid_update(0, kept=((True, True), (True, True)), shift=0.01)
    big = valid_update(1, kept=((True, True), (True, True)), shift=10.0)
    big.num_examples = 1000
    new = dp_aggregate(GLOBAL, [small, big], LAYOUT, noise_multiplier=0.0, clipping_norm=1.0,
                       generator=torch.Generator().manual_seed(0))
    n = sum(v.numel() for v in GLOBAL.values())
    expected_shift = (0.01 + 1.0 / math.sqrt(n)) / 2  # small passes unclipped, big is clipped to norm 1
    for name in GLOBAL:
        assert torch.allclose(new[name], GLOBAL[name] + expected_shift, atol=1e-6)


def _independent_epsilon(noise: float, q: float, steps: int, delta: float) -> float:
    """Opacus' RDP analysis called directly (not through fedhead's accountant wrapper)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=q, noise_multiplier=noise, steps=steps, orders=orders)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def test_epsilon_matches_opacus_rdp_for_the_runs_sample_rate(tiny_bert_dir, tmp_path):
    """Rules out an epsilon from the wrong sample rate (q = 1, or K / N of another run), one that ignores the
    rounds, or a made-up formula such as rounds / noise: every round's epsilon equals Opacus' RDP analysis of
    q = K / N, the run's noise multiplier, the rounds so far and delta."""
    cfg = tiny_config(tiny_bert_dir, tmp_path, privacy={"enabled": True, "noise_multiplier": 1.3,
                                                        "clipping_norm": 0.1, "delta": 1e-4},
                      federated={"rounds": 3})
    run_simulation(cfg, tmp_path / "dp")
    q = cfg.federated.clients_per_round / cfg.partition.num_clients
    for m in read_metrics(tmp_path / "dp")[1:]:
        assert m["dp_epsilon"] == pytest.approx(_independent_epsilon(1.3, q, m["round"], 1e-4), rel=1e-6)
        assert m["dp_epsilon"] != pytest.approx(_independent_epsilon(1.3, 1.0, m["round"], 1e-4), rel=1e-3)
    assert epsilon_spent(1.3, q, 3, 1e-4) == pytest.approx(_independent_epsilon(1.3, q, 3, 1e-4), rel=1e-6)


STATEFUL = {
    "loss_gap + tiers + freeze_a + train_sparse + adam": {
        "federated": {"selection": "loss_gap", "server_optimizer": "adam", "server_learning_rate": 0.01},
        "heads": {"tiers": [0.0, 0.5, 0.75], "mode": "train_sparse"}, "lora": {"freeze_a": True}},
    "head_coverage + rolling + momentum": {
        "federated": {"selection": "head_coverage", "server_optimizer": "momentum"},
        "heads": {"sparsity": 0.5, "schedule": "rolling"}},
    "power_of_choice + sparse_backward": {
        "federated": {"selection": "power_of_choice", "power_of_choice_samples": 8},
        "heads": {"sparsity": 0.5, "mode": "sparse_backward"}},
}


@pytest.mark.parametrize("name", list(STATEFUL))
def test_resume_with_stateful_selection_equals_uninterrupted(name, tiny_bert_dir, tmp_path):
    """Rules out a ClientStats or server-optimiser round trip that loses state (last rounds, losses, kept heads,
    moments): a run stopped after round 1 and resumed must end with the same metrics and checkpoint tensors."""
    cfg = tiny_config(tiny_bert_dir, tmp_path, **STATEFUL[name])
    cfg.federated.rounds = 3
    run_simulation(cfg, tmp_path / "whole")
    run_simulation(cfg, tmp_path / "cut", stop_after=1)
    run_simulation(cfg, tmp_path / "cut", resume=True)
    assert strip_timings(read_metrics(tmp_path / "cut")) == strip_timings(read_metrics(tmp_path / "whole"))
    whole, cut = RunDir(tmp_path / "whole").load_checkpoint(), RunDir(tmp_path / "cut").load_checkpoint()
    for a, b in [(whole.state, cut.state), (whole.server_moments, cut.server_moments)]:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if "adam" in name or "momentum" in name:
        assert whole.server_moments
    if "tiers" in name:
        sparsities = {c["client"] % 3: c["sparsity"] for m in read_metrics(tmp_path / "whole")[1:]
                      for c in m["clients"]}
        assert all(s == [0.0, 0.5, 0.75][t] for t, s in sparsities.items())
        # freeze_a: A is rebuilt from the seed, never sent
        assert not any("lora_A" in k for k in [*whole.state, *whole.server_moments])


def test_head_coverage_changes_the_pick():
    """Rules out a head_coverage whose coverage term does nothing (it would pick like loss_gap)."""
    stats = ClientStats()
    for c, (gap, kept) in enumerate([(1.0, [0, 1]), (0.95, [0, 1]), (0.9, [2, 3])]):
        stats.record(c, 1, 1.0 + gap, 1.0, kept)
    args = (3, 2, 2, np.random.default_rng(0), stats)
    assert select_clients("loss_gap", *args, exploration=0.0).clients == [0, 1]
    assert select_clients("head_coverage", *args, exploration=0.0).clients == [0, 2]


def test_forward_flops_equal_the_closed_form(tiny_bert_dir, tmp_path):
    """Rules out FLOPs of the unpruned model reported for a pruned one, or a counter that misses the attention
    products: the counted forward FLOPs of the tiny BERT (2 blocks, hidden 32, 4 heads of 8, FFN 64, LoRA r=8 on
    query and value, eager attention) equal 2 x multiply-adds counted by hand, pruned or not."""
    cfg = tiny_config(tiny_bert_dir, tmp_path, model={"attn_implementation": "eager"})
    lm = build_model(cfg, 3)
    B, T, d, dh, f, r, C = 4, 16, 32, 8, 64, 8, 3
    batch = {"input_ids": torch.randint(1000, 2000, (B, T)), "attention_mask": torch.ones(B, T, dtype=torch.long),
             "labels": torch.zeros(B, dtype=torch.long)}

    def closed_form(kept_per_block: list[int]) -> int:
        n, total = B * T, 0
        for k in kept_per_block:
            a = k * dh  # attention width left
            total += 3 * n * d * a + n * a * d  # q, k, v, o
            total += 2 * B * k * T * T * dh  # scores and context
            total += 2 * n * d * f  # feed-forward
            total += 2 * (n * d * r + n * r * a)  # LoRA A and B of query and value
        return 2 * (total + B * d * C)  # + the classifier

    with torch.no_grad(), count_flops() as full:
        lm.model(**batch)
    assert full[0] == closed_form([4, 4])
    kept = torch.tensor([[True, False, True, False], [False, False, False, True]])
    pruned = __import__("copy").deepcopy(lm.model)
    prune_heads_(pruned, lm.head_map, kept, lm.prefix)
    with torch.no_grad(), count_flops() as part:
        pruned(**batch)
    assert part[0] == closed_form([2, 1])


def test_upload_bytes_are_the_tensor_bytes_plus_a_bounded_header():
    """Rules out bytes counted from the full-shaped state instead of the kept slices that travel."""
    u = valid_update(0, kept=((True, False), (True, True)))
    blob = encode_update(u)
    values = sum(t.numel() * t.element_size() for t in u.tensors.values())
    masks = u.kept_heads.numel() + u.head_scores.numel() * u.head_scores.element_size()
    assert values + masks <= len(blob) <= values + masks + 2048
    full = sum(t.numel() * t.element_size() for t in GLOBAL.values())
    assert values < full
