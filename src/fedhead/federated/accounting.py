"""Counting what a round costs: FLOPs with torch's own counter, and the activation memory of a training step."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode


@contextmanager
def count_flops(enabled: bool = True) -> Iterator[list[int]]:
    """Count the FLOPs of the enclosed PyTorch ops (torch.utils.flop_counter); the total lands in box[0].

    Attention-score FLOPs are counted only under eager attention (the counter misses CPU sdpa kernels).
    """
    box = [0]
    if not enabled:
        yield box
        return
    mode = FlopCounterMode(display=False)
    with mode:
        yield box
    box[0] = int(mode.get_total_flops())


@contextmanager
def saved_activation_bytes(
    model: torch.nn.Module, storages: list[tuple[int, tuple[int, ...]]] | None = None
) -> Iterator[list[int]]:
    """Bytes the autograd graph of the enclosed forward keeps for its backward; the total lands in box[0].
    `storages`, when given, also receives (bytes, shape of the first tensor saved on it) per counted storage.

    Every tensor autograd saves passes through a `saved_tensors_hooks` pack hook; its storage is counted once
    (views of one storage share it) unless it is a parameter or buffer of `model` (weights are not activation
    memory). The saved tensors live until the backward, so their sum is the activation memory at the end of
    the forward, the peak of a training step up to the kernels' transient buffers. Device-independent.

    The graph of the enclosed forward must be run backward (as a training step does), which frees what it saved:
    a tensor the pack hook hands back that is its op's own output (softmax, tanh) holds the graph that holds it,
    a reference cycle through autograd that Python's collector cannot see. To measure a forward that is never
    differentiated, use `saved_bytes_by_module`, which keeps nothing.
    """
    box = [0]
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in owned and key not in seen:
            seen[key] = storage.nbytes()
            if storages is not None:
                storages.append((seen[key], tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield box
    box[0] = sum(seen.values())


@contextmanager
def saved_bytes_by_module(model: torch.nn.Module, modules: list[torch.nn.Module]) -> Iterator[list[int]]:
    """Bytes the autograd graph of the enclosed forward keeps for its backward while each of `modules` runs
    (box[i] for modules[i]; counted as `saved_activation_bytes` does, each storage once). With activation
    checkpointing, the largest of these is what the backward holds again while it recomputes one layer.

    A measurement only: the enclosed forward cannot be run backward, its graph keeps none of the tensors it
    would save (kept, a saved output would hold its own graph in a reference cycle through autograd, and every
    such forward would leak its activations and the model's trainable parameters)."""
    box = [0] * len(modules)
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: set[int] = set()
    current: list[int] = []

    def pack(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if current and key not in owned and key not in seen:
            seen.add(key)
            box[current[-1]] += storage.nbytes()
        return None  # counted, not kept

    def enter(i: int):
        return lambda *_: current.append(i)

    def leave(*_: object) -> None:
        current.pop()

    handles = [h for i, m in enumerate(modules)
               for h in (m.register_forward_pre_hook(enter(i)), m.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _not_kept):
            yield box
    finally:
        for h in handles:
            h.remove()


def _not_kept(_: None) -> torch.Tensor:
    raise RuntimeError("saved_bytes_by_module measures a forward: its graph kept nothing to run backward with")
