"""Client-level differential privacy: DP-FedAvg with server-side clipping and Gaussian noise.

Each client's update delta (trained minus received values, zero for heads it did not keep) is clipped to
L2 norm C; the server averages the K clipped deltas with equal weights and adds N(0, (z C / K)^2) noise to every
coordinate (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"). The privacy
spent is tracked with Opacus' RDP accountant, with sampling rate q = K / N and one step per round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch

from fedhead.federated.payload import ClientUpdate
from fedhead.federated.state import State
from fedhead.models.head_map import HeadLayout
from fedhead.models.slicing import scatter_kept


def client_delta(update: ClientUpdate, global_state: State, layout: HeadLayout) -> State:
    """Full-shaped (trained - received) of one client, float64; zero for the heads it did not keep."""
    full = scatter_kept(update.tensors, update.kept_heads, layout, global_state)
    return {n: (full[n] - global_state[n]).double() for n in global_state}


def clip_delta(delta: State, clipping_norm: float) -> State:
    """Scale `delta` to L2 norm at most `clipping_norm`."""
    return {n: d * clip_scale(delta.values(), clipping_norm) for n, d in delta.items()}


def clip_scale(parts: Iterable[torch.Tensor], clipping_norm: float) -> float:
    """min(1, C / ||delta||), the norm taken over every value of `parts` (at least 1e-12)."""
    norm = math.sqrt(sum(float((d**2).sum()) for d in parts))
    return min(1.0, clipping_norm / max(norm, 1e-12))


class DPSum:
    """DP-FedAvg's running sum (McMahan et al. 2018): `fold` one update at a time, `result` the noised mean.

        x_{t+1} = x_t + (1 / K) sum_c clip(delta_c, C) + N(0, (z C / K)^2),   clip(d, C) = d min(1, C / ||d||)

    delta_c is the client's (trained - received) over the values it sent (zero for the heads it did not keep),
    taken in float64. Memory: one float64 sum of the state's shape, whatever K; an update can be let go once
    folded. The noise is drawn at `result`, tensor by tensor in the global state's order.
    """

    def __init__(self, global_state: State, layout: HeadLayout, noise_multiplier: float, clipping_norm: float,
                 generator: torch.Generator) -> None:
        self.global_state, self.layout = global_state, layout
        self.noise_multiplier, self.clipping_norm, self.generator = noise_multiplier, clipping_norm, generator
        self.sums = {n: torch.zeros(v.shape, dtype=torch.float64) for n, v in global_state.items()}
        self.count = 0

    def fold(self, update: ClientUpdate) -> None:
        """Add one (well-formed, screened) update's clipped delta to the sum (two passes over the update, the
        norm then the sum, so that no float64 copy of the whole update is held)."""
        scale = clip_scale((self._delta(name, sent, update) for name, sent in update.tensors.items()),
                           self.clipping_norm)
        for name, sent in update.tensors.items():
            delta = self._delta(name, sent, update)
            if name in self.layout.sliced:
                _, dim = self.layout.sliced[name]
                self.sums[name].index_add_(dim, self.layout.index_of(name, update.kept_heads), delta, alpha=scale)
            else:
                self.sums[name].add_(delta, alpha=scale)
        self.count += 1

    def _delta(self, name: str, sent: torch.Tensor, update: ClientUpdate) -> torch.Tensor:
        """(trained - received) of the values of `name` the client sent (its kept rows of a head-sliced tensor)."""
        received = self.global_state[name]
        if name in self.layout.sliced:
            _, dim = self.layout.sliced[name]
            received = received.index_select(dim, self.layout.index_of(name, update.kept_heads))
        return sent.double() - received.double()

    def result(self) -> State:
        """global + sum / K + Gaussian noise of std noise_multiplier * clipping_norm / K (the global state itself,
        and no noise drawn, when nothing was folded). Call it once: it releases each sum as it goes."""
        if self.count == 0:
            return {k: v.clone() for k, v in self.global_state.items()}
        if len(self.sums) < len(self.global_state):
            raise RuntimeError("DPSum.result() was already called: it consumes the sum")
        std = self.noise_multiplier * self.clipping_norm / self.count
        new: State = {}
        for name, previous in self.global_state.items():
            noise = torch.randn(previous.shape, generator=self.generator, dtype=torch.float64) * std
            new[name] = (previous.double() + self.sums.pop(name) / self.count + noise).to(previous.dtype)
        return new


def dp_aggregate(
    global_state: State,
    updates: Iterable[ClientUpdate],
    layout: HeadLayout,
    noise_multiplier: float,
    clipping_norm: float,
    generator: torch.Generator,
) -> State:
    """global + mean of clipped deltas + Gaussian noise of std noise_multiplier * clipping_norm / K (`DPSum`;
    `updates` is read once, so a generator keeps the server's memory independent of K)."""
    total = DPSum(global_state, layout, noise_multiplier, clipping_norm, generator)
    for update in updates:
        total.fold(update)
        del update  # let it go before the next one is read
    return total.result()


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
