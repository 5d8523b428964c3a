"""The client update: global state + local data + the options of its round (`ClientOptions`) in, a ClientUpdate out.

One round on client c: (1) score the heads of the received global model on up to `heads.samples` local
examples (this forward also gives the global model's loss on the client's data); (2) keep the top heads at the
client's sparsity; (3) train a working copy (`remove`: the pruned heads physically sliced out; `train_sparse`:
all heads computed, only kept heads' LoRA slices trained; `mixed`: the lowest-scored `compute_sparsity` of the
heads sliced out, the other pruned heads computed but frozen) with AdamW; (4) measure the trained model's loss on
the same sample; (5) return the kept-head slices and the shared tensors. Every random choice is drawn from
(seed, round, client), so a client's update does not depend on which other clients ran before it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import cast

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from fedhead.config import Config, FederatedSection, GenerationSection, HeadsSection
from fedhead.data.batching import batches_of, collate, to_device
from fedhead.data.generation import IGNORE, prompts_batch
from fedhead.federated.accounting import count_flops, saved_activation_bytes, saved_bytes_by_module
from fedhead.federated.compression import compress
from fedhead.federated.payload import ClientUpdate
from fedhead.federated.state import State, load_state_, trainable_state
from fedhead.heads.importance import score_heads
from fedhead.heads.mean_context import HeadContextMeans
from fedhead.heads.pruning import coverage_heads_mask, kept_heads_mask, rolling_heads_mask, sampled_scores
from fedhead.metrics import score_generations
from fedhead.models.loading import LoadedModel, device_of, enable_activation_checkpointing_
from fedhead.models.slicing import (
    attach_frozen_heads,
    gather_kept,
    prune_heads_,
    scale_kept_context,
    scatter_kept,
)
from fedhead.seeds import Stream, derived_seed


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains: AdamW (learning_rate, weight_decay) on batches of `batch_size` of its data, for
    `local_steps` steps, or `local_epochs` passes over the data when local_steps is None."""

    batch_size: int
    learning_rate: float
    weight_decay: float = 0.0
    local_steps: int | None = None
    local_epochs: int = 1

    @classmethod
    def from_config(cls, fed: FederatedSection) -> LocalTraining:
        return cls(fed.batch_size, fed.learning_rate, fed.weight_decay, fed.local_steps, fed.local_epochs)

    def steps(self, examples: int) -> int:
        """Optimizer steps on `examples` local examples: local_steps, else local_epochs * ceil(n / batch_size)."""
        return self.local_steps or self.local_epochs * -(-examples // self.batch_size)


@dataclass(frozen=True)
class ClientOptions:
    """What a client's round depends on, and nothing else of the run's config."""

    heads: HeadsSection  # how the client scores, picks and prunes its heads
    training: LocalTraining  # how it trains the kept heads
    seed: int  # every random draw of the round derives from (seed, round, client)
    always_score: bool = False  # the server weighs heads by their scores even when nothing is pruned
    tier_local_steps: tuple[int, ...] | None = None  # client c: tier_local_steps[c % len] steps
    checkpointing: tuple[bool, ...] = (False,)  # client c: activation checkpointing if checkpointing[c % len]
    upload_bits: int = 32  # 8 / 4: quantised upload with error feedback (fedhead.federated.compression)

    @classmethod
    def from_config(cls, cfg: Config) -> ClientOptions:
        fed = cfg.federated
        always = fed.aggregation == "head_weighted" and fed.aggregation_weights != "data_size"
        ckpt = fed.activation_checkpointing
        return cls(cfg.heads, LocalTraining.from_config(fed), cfg.seed, always,
                   tuple(fed.tier_local_steps) if fed.tier_local_steps else None,
                   tuple(ckpt) if isinstance(ckpt, list) else (ckpt,), fed.upload_bits)

    def training_of(self, client_id: int) -> LocalTraining:
        """How `client_id` trains: its tier's local steps when tier_local_steps is set."""
        if self.tier_local_steps is None:
            return self.training
        return replace(self.training, local_steps=self.tier_local_steps[client_id % len(self.tier_local_steps)])

    def checkpointing_of(self, client_id: int) -> bool:
        """Whether `client_id` trains with activation checkpointing."""
        return self.checkpointing[client_id % len(self.checkpointing)]


@dataclass
class TrainResult:
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
    frozen_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    checkpointed: list[torch.nn.Module] | None = None,
) -> TrainResult:
    """AdamW on the trainable parameters for `local_steps` steps (or `local_epochs` passes), counting FLOPs.

    frozen_rows: parameter name -> (mask of trainable entries, original values); other entries get no
    gradient and are restored after every step (train_sparse mode).
    checkpointed: the layers under activation checkpointing (`enable_activation_checkpointing_`); the peak memory
    then adds, to what the forward keeps, the largest layer's activations, which the backward holds again while
    it recomputes that layer (measured once per batch shape by a forward of the batch without checkpointing,
    not counted in FLOPs or seconds).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    device = device_of(model)
    optim = torch.optim.AdamW(params.values(), lr=training.learning_rate, weight_decay=training.weight_decay)
    n, batch_size = len(data), training.batch_size
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
        batch = to_device(collate(data[order[pos : pos + batch_size]], tokenizer), device)
        pos += batch_size
        shape = tuple(batch["input_ids"].shape)
        if checkpointed and shape not in recomputed:
            measured = time.perf_counter()
            recomputed[shape] = _largest_recomputed_layer(model, checkpointed, batch)
            start += time.perf_counter() - measured  # the measurement is no part of the client's training time
        with count_flops(shape not in flops_by_shape) as counted, saved_activation_bytes(model) as saved:
            loss = model(**batch).loss
        with count_flops(shape not in flops_by_shape) as counted_backward:
            loss.backward()
        counted[0] += counted_backward[0]
        activations = max(activations, saved[0] + recomputed.get(shape, 0))
        flops_by_shape.setdefault(shape, counted[0])
        flops += flops_by_shape[shape]
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
        losses.append(float(loss.detach()))
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


def _frozen_rows(work_state: dict[str, torch.Tensor], trained: torch.Tensor, computed: torch.Tensor,
                 lm: LoadedModel):
    """Masks of the entries of `work_state` (a model holding the `computed` heads) that belong to `trained`
    heads; every other head's slice is frozen at its current value."""
    frozen = {}
    for name, (_, dim) in lm.layout.sliced.items():
        present = lm.layout.index_of(name, computed)  # full-model rows/columns the working model holds
        trainable = torch.isin(present, lm.layout.index_of(name, trained)).nonzero().flatten()
        trainable = trainable.to(work_state[name].device)
        mask = torch.zeros_like(work_state[name])
        mask.index_fill_(dim, trainable, 1.0)  # trained heads' (or kv units') slices
        frozen[name] = (mask, work_state[name].clone())
    return frozen


def removed_fraction(heads: HeadsSection, sparsity: float) -> float:
    """Fraction of heads a client with `sparsity` removes from its autograd graph, by `heads.mode`
    (sparse_backward computes them in the forward, without autograd)."""
    if heads.mode in ("remove", "sparse_backward"):
        return sparsity
    if heads.mode == "mixed":
        return min(heads.compute_sparsity, sparsity)
    return 0.0


def client_update(
    lm: LoadedModel,
    global_state: State,
    data: datasets.Dataset,
    options: ClientOptions | Config,
    client_id: int,
    round_: int,
    head_counts: torch.Tensor | None = None,
    residual: State | None = None,
) -> ClientUpdate:
    """Run one client's round (see the module docstring); `lm.model` is left holding `global_state`.

    options: what the round depends on (a run's Config is read through `ClientOptions.from_config`).
    head_counts: heads.schedule = "coverage": [blocks, heads], how often the server has seen each head trained
    (None: never).
    residual: federated.upload_bits < 32: this client's error-feedback residual from its last round (None: none
    yet); the update carries the new one (`ClientUpdate.residual`), which the client keeps."""
    if isinstance(options, Config):
        options = ClientOptions.from_config(options)
    heads, training = options.heads, options.training_of(client_id)
    sparsity = heads.sparsity_of(client_id, round_)
    load_state_(lm.model, global_state)
    gen = torch.Generator().manual_seed(derived_seed(options.seed, round_, client_id, Stream.CLIENT_DATA))
    sample = torch.randperm(len(data), generator=gen)[: heads.samples].tolist()
    device = device_of(lm.model)
    sample_batches = [to_device(b, device) for b in batches_of(data, sample, training.batch_size, lm.tokenizer)]
    method = heads.importance if sparsity > 0 or options.always_score else "none"
    start = time.perf_counter()
    removed = removed_fraction(heads, sparsity)
    removing = removed > 0
    means = HeadContextMeans(lm.model, lm.head_map, lm.prefix)
    with count_flops() as scoring_flops, means if removing and heads.compensate == "mean" else nullcontext():
        scores, loss_before = score_heads(
            lm.model, lm.head_map, sample_batches, method,
            special_ids=lm.tokenizer.all_special_ids if heads.exclude_special_tokens else [],
            prefix=lm.prefix, generator=gen,
        )
    scoring_seconds = time.perf_counter() - start
    scope, floor = heads.scope, heads.min_heads_per_block
    ranking = scores
    if heads.selection == "sample" and sparsity > 0:
        draw = torch.Generator().manual_seed(derived_seed(options.seed, round_, client_id, Stream.HEAD_SAMPLING))
        ranking = sampled_scores(scores, heads.temperature, draw)
    if heads.schedule == "rolling" and sparsity > 0:
        blocks, heads_per_block = scores.shape
        kept = rolling_heads_mask(blocks, heads_per_block, sparsity, round_, client_id,  # trained and uploaded
                                  shared=heads.rolling_window == "shared")
    elif heads.schedule == "coverage" and sparsity > 0:
        counts = torch.zeros(scores.shape, dtype=torch.int64) if head_counts is None else head_counts
        kept = coverage_heads_mask(scores.cpu(), counts.cpu(), sparsity, heads.coverage_pool)
    else:
        kept = kept_heads_mask(ranking, sparsity, scope, floor)  # trained and uploaded
    # in the client's autograd graph: the kept heads and, in mixed mode, the best-scored of the others
    computed = kept if removed >= sparsity else kept_heads_mask(ranking, removed, scope, floor) | kept

    # heads computed without autograd: every pruned head (sparse_backward), the frozen ones (mixed, no autograd)
    if heads.mode == "sparse_backward":
        side = ~computed
    elif heads.mode == "mixed" and not heads.frozen_autograd:
        side, computed = computed & ~kept, kept
    else:
        side = torch.zeros_like(kept)

    work = copy.deepcopy(lm.model)
    handles: list = []
    if not bool(computed.all()):
        head_means = means.means() if heads.compensate == "mean" else None
        prune_heads_(work, lm.head_map, computed, lm.prefix, head_means)
        if bool(side.any()):  # the side heads come back as no-grad side computations
            handles += attach_frozen_heads(work, copy.deepcopy(lm.model), lm.head_map, computed, lm.prefix, side)
        if heads.scale_kept:
            handles += scale_kept_context(work, lm.head_map, computed, lm.prefix)
    on_device = {n: p.detach() for n, p in work.named_parameters() if p.requires_grad}
    frozen = _frozen_rows(on_device, kept, computed, lm) if bool((computed & ~kept).any()) else None
    checkpointed = enable_activation_checkpointing_(work) if options.checkpointing_of(client_id) else None
    torch.manual_seed(derived_seed(options.seed, round_, client_id, Stream.DROPOUT))
    result = train_local(work, data, training, lm.tokenizer, gen, frozen, checkpointed)
    for handle in handles:
        if getattr(handle, "training_only", False):  # the HeteroFL scaler acts during training only
            handle.remove()
    with torch.no_grad():
        work.eval()
        loss_after = sum(float(work(**b).loss) * len(b["labels"]) for b in sample_batches) / len(sample)
    for handle in handles:
        handle.remove()
    tensors = trainable_state(work)  # head-sliced tensors hold the computed heads
    if not bool(computed.equal(kept)):  # only the trained heads' slices travel
        if not bool(computed.all()):
            tensors = scatter_kept(tensors, computed, lm.layout, global_state)  # back to full shape first
        tensors = gather_kept(tensors, kept, lm.layout)
    quantized, new_residual = None, None
    if options.upload_bits < 32:  # the delta from what was received, quantised, with error feedback
        rounding = torch.Generator().manual_seed(derived_seed(options.seed, round_, client_id, Stream.QUANTIZATION))
        quantized, tensors, new_residual = compress(tensors, global_state, residual, kept.cpu(), lm.layout,
                                                    options.upload_bits, rounding)
    return ClientUpdate(
        client_id=client_id,
        num_examples=len(data),
        kept_heads=kept,
        head_scores=scores.clamp(0, 1),
        tensors=tensors,
        loss_before=loss_before,
        loss_after=loss_after,
        train_loss=result.mean_loss,
        stats={
            "sparsity": sparsity,
            "steps": result.steps,
            "train_flops": result.flops,
            "scoring_flops": scoring_flops[0],
            "peak_memory_bytes": result.peak_memory_bytes,
        },
        timings={"train_seconds": result.seconds, "scoring_seconds": scoring_seconds},
        upload_bits=options.upload_bits,
        quantized=quantized,
        residual=new_residual,
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    *,
    task: str = "classification",
    generation: GenerationSection | None = None,
) -> dict[str, float]:
    """Mean loss of `model` on `data` (eval mode, no dropout), with accuracy for classification; for a
    text-to-text task given `generation`, also the generated text's scores (`generation.metrics`)."""
    model.eval()
    loss_sum, correct, tokens = 0.0, 0, 0
    for i in range(0, len(data), batch_size):
        rows = data[i : i + batch_size]
        rows.pop("references", None)
        batch = to_device(collate(rows, tokenizer), device_of(model))
        out = model(**batch)
        if task == "classification":
            loss_sum += float(out.loss) * len(batch["labels"])
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        else:  # token-level mean, as the model's loss is
            n = int((batch["labels"] != IGNORE).sum())
            loss_sum, tokens = loss_sum + float(out.loss) * n, tokens + n
    if task == "classification":
        return {"eval_loss": loss_sum / len(data), "accuracy": correct / len(data)}
    result = {"eval_loss": loss_sum / max(tokens, 1)}
    if generation is not None:
        predictions = generate_texts(model, data, tokenizer, batch_size, task, generation)
        result.update(score_generations(predictions, data["references"], generation.metrics))
    return result


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module,
    data: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    task: str,
    generation: GenerationSection,
) -> list[str]:
    """Greedy (num_beams 1) or beam-search generations for every row of `data`, decoded without special tokens."""
    model.eval()
    texts: list[str] = []
    for i in range(0, len(data), batch_size):
        batch = to_device(prompts_batch(data[i : i + batch_size], tokenizer, task), device_of(model))
        generate = cast(Callable[..., torch.Tensor], model.generate)  # the transformers / peft model's own
        out = generate(**batch, max_new_tokens=generation.max_new_tokens, num_beams=generation.num_beams,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id)  # (B, T_out)
        if task == "causal_lm":
            out = out[:, batch["input_ids"].shape[1]:]  # drop the (left-padded) prompt
        texts.extend(t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True))
    return texts
