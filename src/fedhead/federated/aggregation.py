"""Server aggregation of client updates into the next global state.

Head-specific weighted aggregation (the Assortment-of-Heads paper's second mechanism). For each head-sliced
tensor slice x[b, h]:

    x_{t+1}[b, h] = sum_{c kept (b, h)} w_c(b, h) x_c[b, h] / sum_{c kept (b, h)} w_c(b, h)

with w_c(b, h) = n_c ('data_size'), conf_c(b, h) ('importance') or n_c * conf_c(b, h) ('product'). A head no
client kept keeps its previous value; a head whose weights are all zero falls back to n_c. Shared tensors are
averaged with weights n_c (FedAvg). 'fedavg' is head_weighted with data_size weights: at sparsity 0 it is the
dense FedAvg baseline exactly. Under grouped-query attention a key/value unit (shared by several query heads)
gets, per client, the mean of its query heads' weights (0 for the heads the client pruned), so every client
that kept any of them counts.

Robust options for faulty or malicious clients: 'median' (coordinate-wise median; of an even count of values
the lower middle one, torch.nanmedian's convention, where Flower's FedMedian averages the two) and 'trimmed_mean'
(coordinate-wise mean after cutting c = max(1, floor(n * trim_fraction)) of the lowest and of the highest
values; Yin et al. 2018), each over the n clients that kept the head, unweighted. Head pruning leaves some heads
with few values, where a plain median of 2 is one client's choice and a 20% trim of 4 cuts nothing; so a
coordinate with n < 3 values keeps its previous value. Breakdown point (attackers a coordinate tolerates with
its value still bounded by honest ones): median floor((n - 1) / 2), trimmed mean c, with n >= 3 either way.
"""

from __future__ import annotations

import torch

from fedhead.federated.payload import ClientUpdate
from fedhead.federated.state import State
from fedhead.models.head_map import HeadLayout
from fedhead.models.slicing import scatter_kept

MIN_ROBUST_VALUES = 3  # fewer values of a coordinate than this: robust aggregation keeps the previous value


def head_weights(updates: list[ClientUpdate], block: int, weighting: str) -> torch.Tensor:
    """w_c(b, h) for every client c and head h of `block`, zero where c did not keep h: (C, H) float64."""
    sizes = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)[:, None]  # (C, 1)
    kept = torch.stack([u.kept_heads[block] for u in updates]).to(torch.float64)  # (C, H)
    if weighting == "data_size":
        w = sizes * kept
    else:
        conf = torch.stack([u.head_scores[block] for u in updates]).to(torch.float64)  # (C, H)
        w = (conf if weighting == "importance" else sizes * conf) * kept
        zero = (w.sum(0) == 0) & (kept.sum(0) > 0)  # kept by someone, but all weights zero
        w[:, zero] = (sizes * kept)[:, zero]
    return w


def robust_aggregate(
    global_state: State, updates: list[ClientUpdate], layout: HeadLayout, method: str, trim_fraction: float = 0.2
) -> State:
    """Coordinate-wise median or trimmed mean, per head slice over the clients that kept it."""
    nan_base = {k: torch.full_like(v, float("nan"), dtype=torch.float64) for k, v in global_state.items()}
    new: State = {}
    for name, previous in global_state.items():
        stacked = torch.stack([  # (C, *shape); NaN where the client did not keep the head
            scatter_kept({name: u.tensors[name].double()}, u.kept_heads, layout, nan_base)[name] for u in updates])
        valid = ~torch.isnan(stacked)
        count = valid.sum(0)  # (*shape)
        if method == "median":
            value = torch.nanmedian(stacked, dim=0).values
        else:
            ordered = torch.sort(stacked, dim=0).values  # NaN sort last
            cut = torch.floor(count * trim_fraction).clamp(min=1)
            rank = torch.arange(len(updates), dtype=torch.float64).view(-1, *([1] * previous.dim()))
            inside = (rank >= cut) & (rank < count - cut)
            value = torch.where(inside, ordered, 0.0).sum(0) / (count - 2 * cut).clamp(min=1)
        new[name] = torch.where(count >= MIN_ROBUST_VALUES, value, previous.double()).to(previous.dtype)
    return new


def aggregate(
    global_state: State,
    updates: list[ClientUpdate],
    layout: HeadLayout,
    method: str = "fedavg",
    weighting: str = "product",
    trim_fraction: float = 0.2,
) -> State:
    """The next global state from the clients' updates (see the module docstring)."""
    if not updates:
        return {k: v.clone() for k, v in global_state.items()}
    if method in ("median", "trimmed_mean"):
        return robust_aggregate(global_state, updates, layout, method, trim_fraction)
    if method not in ("fedavg", "head_weighted"):
        raise ValueError(f"unknown aggregation '{method}'")
    weighting = "data_size" if method == "fedavg" else weighting
    sizes = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    full = [scatter_kept(u.tensors, u.kept_heads, layout, global_state) for u in updates]
    weights_by_block = {}
    new: State = {}
    for name, previous in global_state.items():
        stacked = torch.stack([f[name].to(torch.float64) for f in full])  # (C, *shape)
        if name not in layout.sliced:
            w = (sizes / sizes.sum()).view(-1, *([1] * previous.dim()))
            new[name] = (stacked * w).sum(0).to(previous.dtype)
            continue
        block, dim = layout.sliced[name]
        if block not in weights_by_block:
            weights_by_block[block] = head_weights(updates, block, weighting)
        w_heads = weights_by_block[block]  # (C, H)
        w_rows = layout.row_weights(name, w_heads)  # (C, units * d); a key/value unit: mean of its heads' weights
        shape = [len(updates)] + [1] * previous.dim()
        shape[1 + dim] = w_rows.shape[1]
        w_rows = w_rows.view(shape)
        total = w_rows.sum(0)  # (*, H*d along dim)
        mean = (stacked * w_rows).sum(0) / total.clamp(min=1e-300)
        new[name] = torch.where(total > 0, mean, previous.to(torch.float64)).to(previous.dtype)
    return new
