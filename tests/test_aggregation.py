import torch

from fedhead.federated.aggregation import aggregate
from fedhead.federated.payload import ClientUpdate
from fedhead.models.head_map import HeadLayout
from fedhead.models.slicing import gather_kept

# One block of 2 heads, head_dim 1: "qb" is a q LoRA B (rows = heads), "cls" is shared.
LAYOUT = HeadLayout(num_blocks=1, num_heads=2, head_dim=1, sliced={"qb": (0, 0)})
GLOBAL = {"qb": torch.tensor([[10.0], [20.0]]), "cls": torch.tensor([0.0])}


def client(cid, n, kept, scores, qb, cls):
    kept_t = torch.tensor([kept])
    full = {"qb": torch.tensor(qb).view(2, 1), "cls": torch.tensor([cls])}
    return ClientUpdate(cid, n, kept_t, torch.tensor([scores]), gather_kept(full, kept_t, LAYOUT), 0.0, 0.0, 0.0)


def test_head_weighted_matches_hand_computation():
    # Prepare: head 0 kept by clients 0 and 1, head 1 by client 2 only
    a = client(0, 10, [True, False], [0.5, 0.1], [1.0, 99.0], 1.0)
    b = client(1, 30, [True, False], [0.25, 0.9], [3.0, 99.0], 2.0)
    c = client(2, 20, [False, True], [0.3, 0.4], [99.0, 5.0], 4.0)
    # Execute
    prod = aggregate(GLOBAL, [a, b, c], LAYOUT, "head_weighted", "product")
    imp = aggregate(GLOBAL, [a, b, c], LAYOUT, "head_weighted", "importance")
    avg = aggregate(GLOBAL, [a, b, c], LAYOUT, "fedavg")
    # Assert
    w0, w1 = 10 * 0.5, 30 * 0.25
    assert torch.allclose(prod["qb"], torch.tensor([[(w0 * 1 + w1 * 3) / (w0 + w1)], [5.0]]))
    assert torch.allclose(imp["qb"], torch.tensor([[(0.5 * 1 + 0.25 * 3) / 0.75], [5.0]]))
    assert torch.allclose(avg["qb"], torch.tensor([[(10 * 1 + 30 * 3) / 40], [5.0]]))
    assert torch.allclose(prod["cls"], torch.tensor([(10 * 1 + 30 * 2 + 20 * 4) / 60]))  # shared: FedAvg


def test_head_kept_by_nobody_is_unchanged():
    a = client(0, 10, [True, False], [1.0, 1.0], [1.0, 0.0], 0.0)
    out = aggregate(GLOBAL, [a], LAYOUT, "head_weighted")
    assert out["qb"][1].item() == 20.0 and out["qb"][0].item() == 1.0


def test_all_zero_importance_falls_back_to_data_size():
    a = client(0, 10, [True, True], [0.0, 0.0], [1.0, 2.0], 0.0)
    b = client(1, 30, [True, True], [0.0, 0.0], [5.0, 6.0], 0.0)
    out = aggregate(GLOBAL, [a, b], LAYOUT, "head_weighted", "product")
    assert torch.allclose(out["qb"], torch.tensor([[4.0], [5.0]]))
    assert torch.isfinite(out["qb"]).all()


def test_dense_head_weighted_by_data_size_equals_fedavg_exactly():
    g = torch.Generator().manual_seed(0)
    layout = HeadLayout(2, 3, 4, {"b0": (0, 0), "a1": (1, 1)})
    state = {"b0": torch.randn(12, 5, generator=g), "a1": torch.randn(5, 12, generator=g),
             "s": torch.randn(7, generator=g)}
    ones = torch.ones(2, 3, dtype=torch.bool)
    ups = [ClientUpdate(i, 5 + 7 * i, ones, torch.rand(2, 3, generator=g),
                        {k: torch.randn(v.shape, generator=g) for k, v in state.items()}, 0, 0, 0) for i in range(3)]
    weighted = aggregate(state, ups, layout, "head_weighted", "data_size")
    plain = aggregate(state, ups, layout, "fedavg")
    assert all(torch.equal(weighted[k], plain[k]) for k in state)
    expected = sum(u.num_examples * u.tensors["b0"] for u in ups) / sum(u.num_examples for u in ups)
    assert torch.allclose(plain["b0"], expected, atol=1e-6)
