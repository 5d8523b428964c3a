"""Client-level differential privacy: DP-FedAvg with server-side clipping and Gaussian noise.

Each client's update delta (trained minus received values, zero for heads it did not keep) is clipped to
L2 norm C; the server averages the K clipped deltas with equal weights and adds N(0, (z C / K)^2) noise to every
coordinate (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"). The privacy
spent is tracked with Opacus' RDP accountant, with sampling rate q = K / N and one step per round.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fedhead.federated.payload import ClientUpdate
from fedhead.federated.state import State
from fedhead.models.head_map import HeadLayout
from fedhead.models.slicing import scatter_kept


def client_delta(update: ClientUpdate, global_state: State, layout: HeadLayout) -> State:
    """Full-shaped (trained - received) of one client; zero for the heads it did not keep."""
    full = scatter_kept(update.tensors, update.kept_heads, layout, global_state)
    return {n: (full[n] - global_state[n]).double() for n in global_state}


def clip_delta(delta: State, clipping_norm: float) -> State:
    """Scale `delta` to L2 norm at most `clipping_norm`."""
    norm = torch.sqrt(sum(((d**2).sum() for d in delta.values()), torch.zeros((), dtype=torch.float64)))
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
    """global + mean of clipped deltas + Gaussian noise of std noise_multiplier * clipping_norm / K."""
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


def epsilon_spent(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Epsilon of (epsilon, delta)-DP after `rounds` rounds, from Opacus' RDP accountant."""
    if rounds == 0:
        return 0.0
    accountant = _rdp_accountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta=delta))


def _rdp_accountant() -> Any:
    """A new `opacus.accountants.RDPAccountant`. Importing Opacus calls `logging.basicConfig`, which gives the root
    logger a handler that prints every propagating record of every library a second time (each of Flower's log
    lines under `flwr run --stream`): the handlers the import adds to the root logger are taken away again."""
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        from opacus.accountants import RDPAccountant
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
    return RDPAccountant()
