"""A client's local training: AdamW on the trainable parameters of its working copy, counting FLOPs and memory.

`train_local` runs the steps; `frozen_rows_of` names the entries of head-sliced tensors that belong to heads the
working copy computes but does not train (train_sparse and mixed modes, `fedhead.heads.plan`), which it keeps at
their received values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from fedhead.config import FederatedSection
from fedhead.data.batching import collate, to_device
from fedhead.federated.accounting import count_flops, saved_activation_bytes, saved_bytes_by_module
from fedhead.models.head_map import HeadLayout
from fedhead.models.loading import device_of

FrozenRows = dict[str, tuple[torch.Tensor, torch.Tensor]]  # parameter name -> (mask of trainable entries, values)


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains: AdamW (learning_rate, weight_decay) on batches of `batch_size` of its data, for
    `local_steps` steps, or `local_epochs` passes over the data when local_steps is None; each batch run as
    micro-batches of `micro_batch_size` examples whose gradients add up to the batch's (None: the whole batch)."""

    batch_size: int
    learning_rate: float
    weight_decay: float = 0.0
    local_steps: int | None = None
    local_epochs: int = 1
    micro_batch_size: int | None = None

    @classmethod
    def from_config(cls, fed: FederatedSection) -> LocalTraining:
        micro = fed.micro_batch_size if isinstance(fed.micro_batch_size, int) else None  # a list: per tier
        return cls(fed.batch_size, fed.learning_rate, fed.weight_decay, fed.local_steps, fed.local_epochs, micro)

    def steps(self, examples: int) -> int:
        """Optimizer steps on `examples` local examples: local_steps, else local_epochs * ceil(n / batch_size)."""
        return self.local_steps or self.local_epochs * -(-examples // self.batch_size)


@dataclass
class TrainResult:
    """What `train_local` measured: mean training loss, optimizer steps, FLOPs, seconds and peak memory."""

    mean_loss: float
    steps: int
    flops: int
    seconds: float
    # activations saved for the backward (largest step) + LoRA grads + AdamW state; on CUDA the device's peak
    # allocation above what was held before training (torch.cuda.max_memory_allocated)
    peak_memory_bytes: int = 0


def train_local(
    model: torch.nn.Module,
    data: datasets.Dataset,
    training: LocalTraining,
    tokenizer: PreTrainedTokenizerBase,
    generator: torch.Generator,
    frozen_rows: FrozenRows | None = None,
    checkpointed: list[torch.nn.Module] | None = None,
) -> TrainResult:
    """AdamW on the trainable parameters for `local_steps` steps (or `local_epochs` passes), counting FLOPs; a
    step's batch of n examples runs as micro-batches m of n_m examples (`training.micro_batch_size`), the loss of
    each scaled by n_m / n, so the accumulated gradient is sum_m (n_m / n) grad L_m = grad L of the batch (for a
    mean over examples: the config allows micro-batches for classification only).

    frozen_rows: parameter name -> (mask of trainable entries, original values) (`frozen_rows_of`); other entries
    get no gradient and are restored after every step (train_sparse and mixed modes).
    checkpointed: the layers under activation checkpointing (`enable_activation_checkpointing_`); the peak memory
    then adds, to what the forward keeps, the largest layer's activations, which the backward holds again while
    it recomputes that layer (measured once per batch shape by a forward of the batch without checkpointing,
    not counted in FLOPs or seconds).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    device = device_of(model)
    optim = torch.optim.AdamW(params.values(), lr=training.learning_rate, weight_decay=training.weight_decay)
    n, batch_size = len(data), training.batch_size
    micro = min(training.micro_batch_size or batch_size, batch_size)
    steps = training.steps(n)
    model.train()
    order: list[int]
    losses, flops, start, order, pos, activations = [], 0, time.perf_counter(), [], 0, 0
    on_cuda = device.type == "cuda"
    if on_cuda:  # the device's own count: bytes allocated above what the client held before training
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    flops_by_shape: dict[tuple[int, ...], int] = {}  # FLOPs depend only on the batch shape: count each once
    recomputed: dict[tuple[int, ...], int] = {}  # checkpointing: the largest layer's activations, by batch shape
    for _ in range(steps):
        if pos >= len(order):  # a new pass over the local data in a fresh seeded order
            order, pos = torch.randperm(n, generator=generator).tolist(), 0
        indices = order[pos : pos + batch_size]
        pos += batch_size
        step_loss = 0.0
        for part in range(0, len(indices), micro):  # gradient accumulation: sum_m (n_m / n) grad L_m = grad L
            chunk = indices[part : part + micro]
            batch = to_device(collate(data[chunk], tokenizer), device)
            shape = tuple(batch["input_ids"].shape)
            if checkpointed and shape not in recomputed:
                measured = time.perf_counter()
                recomputed[shape] = _largest_recomputed_layer(model, checkpointed, batch)
                start += time.perf_counter() - measured  # the measurement is no part of the client's training time
            with count_flops(shape not in flops_by_shape) as counted, saved_activation_bytes(model) as saved:
                loss = model(**batch).loss
                if len(chunk) < len(indices):
                    loss = loss * (len(chunk) / len(indices))
            with count_flops(shape not in flops_by_shape) as counted_backward:
                loss.backward()
            counted[0] += counted_backward[0]
            activations = max(activations, saved[0] + recomputed.get(shape, 0))
            flops_by_shape.setdefault(shape, counted[0])
            flops += flops_by_shape[shape]
            step_loss += float(loss.detach())
        if frozen_rows:
            for name, (mask, _) in frozen_rows.items():
                grad = params[name].grad
                if grad is not None:  # None: no gradient reached the tensor this step
                    grad.mul_(mask)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if frozen_rows:
            with torch.no_grad():
                for name, (mask, original) in frozen_rows.items():
                    params[name].copy_(torch.where(mask.bool(), params[name], original))
        losses.append(step_loss)
    trainable = sum(p.numel() * p.element_size() for p in params.values())
    peak = activations + 3 * trainable  # + a gradient and AdamW's two moments per trainable value
    if on_cuda:
        peak = torch.cuda.max_memory_allocated(device) - held
    return TrainResult(sum(losses) / max(len(losses), 1), steps, flops, time.perf_counter() - start, peak)


def _largest_recomputed_layer(model: torch.nn.Module, layers: list[torch.nn.Module], batch: dict) -> int:
    """Bytes the largest of `layers` keeps for its backward when not checkpointed: what the backward of a
    checkpointed model holds again while it recomputes that layer (a forward of `batch` with checkpointing off)."""
    for layer in layers:
        layer.gradient_checkpointing = False  # type: ignore[assignment]  # torch: setattr takes any value
    try:
        with saved_bytes_by_module(model, layers) as by_layer:
            model(**batch)
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True  # type: ignore[assignment]  # torch: setattr takes any value
    return max(by_layer, default=0)


def frozen_rows_of(model: torch.nn.Module, trained: torch.Tensor, computed: torch.Tensor,
                   layout: HeadLayout) -> FrozenRows:
    """Masks of the entries of `model`'s head-sliced trainable tensors (a model holding the `computed` heads, bool
    [blocks, heads]) that belong to `trained` heads, with the tensors' current values; every other head's slice is
    frozen at them by `train_local`."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen: FrozenRows = {}
    for name, (_, dim) in layout.sliced.items():
        present = layout.index_of(name, computed)  # full-model rows/columns the working model holds
        trainable = torch.isin(present, layout.index_of(name, trained)).nonzero().flatten()
        trainable = trainable.to(state[name].device)
        mask = torch.zeros_like(state[name])
        mask.index_fill_(dim, trainable, 1.0)  # trained heads' (or kv units') slices
        frozen[name] = (mask, state[name].clone())
    return frozen
