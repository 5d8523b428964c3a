"""Server optimisers: a step on the round's pseudo-gradient instead of taking the aggregate as the next state.

With x_t the global state sent in round t and x̄_t the aggregate of the clients' answers, the update is
Δ_t = x̄_t - x_t (Flower's `delta_t`; the pseudo-gradient of FedAvgM is -Δ_t). Flower's formulas
(flwr.serverapp.strategy FedAvgM, FedAdam, FedYogi):

- 'momentum' (FedAvgM, Hsu et al. 2019):  m_t = β m_{t-1} - Δ_t (m_0 = 0),   x_{t+1} = x_t - η m_t
- 'adam' (FedAdam, Reddi et al. 2021):   m_t = β1 m_{t-1} + (1 - β1) Δ_t,   v_t = β2 v_{t-1} + (1 - β2) Δ_t²,
                                          x_{t+1} = x_t + η_n m_t / (sqrt(v_t) + τ),
                                          η_n = η sqrt(1 - β2^(n+1)) / (1 - β1^(n+1))
- 'yogi' (FedYogi, Reddi et al. 2021):    m_t as adam, v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²),
                                          x_{t+1} = x_t + η m_t / (sqrt(v_t) + τ)

Head-sliced tensors: an element moves, and its moments are updated, only in rounds where some client trained
it (`trained` masks); elsewhere x, m and v keep their values. Flower's bias correction uses the server round
(n = t); here n counts the rounds the element was trained, which is the round for dense FedAvg and keeps a
rarely trained head from stepping as if its moments were warm. Everything is float64 inside, the state keeps
its dtype. The optimiser's state is a plain `State` (names prefixed 'm/', 'v/', 'n/'), checkpointed with the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedhead.federated.payload import ClientUpdate
from fedhead.federated.state import State
from fedhead.models.head_map import HeadLayout


@dataclass(frozen=True)
class ServerOptimizer:
    """The options of a server step (config `federated.server_*`)."""

    kind: str = "none"
    learning_rate: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in ("none", "momentum", "adam", "yogi"):
            raise ValueError(f"unknown server optimizer '{self.kind}'")


def trained_masks(global_state: State, updates: list[ClientUpdate], layout: HeadLayout) -> dict[str, torch.Tensor]:
    """Per tensor of `global_state`, a bool mask of the elements some update trained: for a head-sliced tensor
    the slices of the heads (or key/value units) kept by any client, for a shared tensor everything."""
    kept_any = None
    for u in updates:
        kept_any = u.kept_heads.clone() if kept_any is None else kept_any | u.kept_heads
    return trained_masks_of(global_state, kept_any, layout)


def trained_masks_of(global_state: State, kept_any: torch.Tensor | None, layout: HeadLayout) -> dict[str, torch.Tensor]:
    """`trained_masks` from the heads some client kept (bool [blocks, heads]; None: no update, nothing trained)."""
    masks = {}
    for name, value in global_state.items():
        mask = torch.zeros(value.shape, dtype=torch.bool)
        if kept_any is None:
            masks[name] = mask
        elif name in layout.sliced:
            _, dim = layout.sliced[name]
            mask.index_fill_(dim, layout.index_of(name, kept_any), True)
            masks[name] = mask
        else:
            masks[name] = ~mask
    return masks


def server_step(
    global_state: State,
    aggregated: State,
    trained: dict[str, torch.Tensor],
    moments: State,
    opt: ServerOptimizer,
) -> tuple[State, State]:
    """The next global state and optimiser state (see the module docstring). `moments` may be empty (round 1)."""
    if opt.kind == "none":
        return aggregated, moments
    new_state: State = {}
    new_moments: State = dict(moments)
    for name, x in global_state.items():
        x64 = x.to(torch.float64)
        delta = aggregated[name].to(torch.float64) - x64
        mask = trained[name]
        m = moments.get(f"m/{name}", torch.zeros_like(x64))
        if opt.kind == "momentum":
            m_new = opt.momentum * m - delta
            step = -opt.learning_rate * m_new
        else:
            v = moments.get(f"v/{name}", torch.zeros_like(x64))
            n = moments.get(f"n/{name}", torch.zeros_like(x64)) + 1  # steps of each element, this one included
            m_new = opt.beta1 * m + (1 - opt.beta1) * delta
            sq = delta * delta
            if opt.kind == "adam":
                v_new = opt.beta2 * v + (1 - opt.beta2) * sq
                eta = opt.learning_rate * torch.sqrt(1 - opt.beta2 ** (n + 1)) / (1 - opt.beta1 ** (n + 1))
            else:
                v_new = v - (1 - opt.beta2) * sq * torch.sign(v - sq)
                eta = torch.full_like(x64, opt.learning_rate)
            step = eta * m_new / (torch.sqrt(v_new) + opt.tau)
            new_moments[f"v/{name}"] = torch.where(mask, v_new, v)
            new_moments[f"n/{name}"] = torch.where(mask, n, n - 1)
        new_moments[f"m/{name}"] = torch.where(mask, m_new, m)
        new_state[name] = torch.where(mask, x64 + step, x64).to(x.dtype)
    return new_state, new_moments
