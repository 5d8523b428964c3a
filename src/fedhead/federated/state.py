"""The global trainable state: parameter name -> tensor, for the LoRA adapters and the task head."""

from __future__ import annotations

import torch
from torch import nn

State = dict[str, torch.Tensor]


def trainable_state(model: nn.Module) -> State:
    """Detached copies of every trainable parameter of `model`, by name, on the CPU (the state that travels and
    is checkpointed stays on the CPU whatever device the model trains on)."""
    return {n: p.detach().clone().cpu() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_state_(model: nn.Module, state: State) -> None:
    """Copy `state` into the same-named parameters of `model`; every name must exist with the same shape."""
    params = dict(model.named_parameters())
    for name, value in state.items():
        if name not in params:
            raise KeyError(f"model has no parameter '{name}'")
        params[name].copy_(value)


def state_misfit(state: State, reference: State) -> str | None:
    """The first way `state` does not fit `reference` (the trainable state of the model a config builds): a
    missing or unexpected name, or another shape; None when every name and shape agree."""
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        return f"tensor names differ (missing {missing[:2]}, unexpected {extra[:2]})"
    for name, value in state.items():
        if tuple(value.shape) != tuple(reference[name].shape):
            return f"{name} has shape {list(value.shape)}, the config's model {list(reference[name].shape)}"
    return None
