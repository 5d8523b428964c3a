"""The server's aggregation as it was before it streamed (fedhead 2025, commit a929d5d), kept verbatim as the
reference the streaming implementation must equal within float64 rounding (tests/test_streaming_aggregation.py).
It stacks every client's full-size copy of the state: do not use it outside the tests."""

from __future__ import annotations

import torch

from fedhead.federated.payload import ClientUpdate
from fedhead.federated.state import State
from fedhead.models.head_map import HeadLayout
from fedhead.models.slicing import scatter_kept

MIN_ROBUST_VALUES = 3


def head_weights(updates: list[ClientUpdate], block: int, weighting: str) -> torch.Tensor:
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
        w_rows = layout.row_weights(name, w_heads)  # (C, units * d)
        shape = [len(updates)] + [1] * previous.dim()
        shape[1 + dim] = w_rows.shape[1]
        w_rows = w_rows.view(shape)
        total = w_rows.sum(0)
        mean = (stacked * w_rows).sum(0) / total.clamp(min=1e-300)
        new[name] = torch.where(total > 0, mean, previous.to(torch.float64)).to(previous.dtype)
    return new


def client_delta(update: ClientUpdate, global_state: State, layout: HeadLayout) -> State:
    full = scatter_kept(update.tensors, update.kept_heads, layout, global_state)
    return {n: (full[n] - global_state[n]).double() for n in global_state}


def clip_delta(delta: State, clipping_norm: float) -> State:
    norm = torch.sqrt(sum((d**2).sum() for d in delta.values()))
    scale = min(1.0, clipping_norm / max(float(norm), 1e-12))
    return {n: d * scale for n, d in delta.items()}


def dp_aggregate(
    global_state: State,
    updates: list[ClientUpdate],
    layout: HeadLayout,
    noise_multiplier: float,
    clipping_norm: float,
    generator: torch.Generator,
) -> State:
    if not updates:
        return {k: v.clone() for k, v in global_state.items()}
    clipped = [clip_delta(client_delta(u, global_state, layout), clipping_norm) for u in updates]
    std = noise_multiplier * clipping_norm / len(updates)
    new: State = {}
    for name, previous in global_state.items():
        mean = torch.stack([c[name] for c in clipped]).mean(0)
        noise = torch.randn(previous.shape, generator=generator, dtype=torch.float64) * std
        new[name] = (previous.double() + mean + noise).to(previous.dtype)
    return new
