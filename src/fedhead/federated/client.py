"""The client update: global state + local data + the options of its round (`ClientOptions`) in, a ClientUpdate out.

One round on client c, in the named steps of `client_update`:

1. `_score`: score the heads of the received global model on up to `heads.samples` local examples (this forward
   also gives the global model's loss on the client's data, and with `heads.compensate = "mean"` the heads' mean
   contexts);
2. `_plan`: keep the top heads at the client's sparsity (or its schedule's heads), then decode `heads.mode` into
   the heads its working copy computes with and without autograd (`fedhead.heads.plan.head_plan`, whose docstring
   tabulates the modes);
3. `_working_copy`: copy the model and slice the planned heads out of it;
4. `_train`: train the kept heads with AdamW (`fedhead.federated.local_training`), the computed but untrained
   heads frozen, then `_loss_after`: the trained model's loss on the scoring sample;
5. `_package`: the kept-head slices and the shared tensors, quantised with error feedback when
   `federated.upload_bits < 32`.

Every random choice is drawn from (seed, round, client), so a client's update does not depend on which other clients
ran before it.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial

import datasets
import torch

from fedhead.config import Config, HeadsSection
from fedhead.data.batching import batches_of, to_device
from fedhead.federated.accounting import count_flops
from fedhead.federated.compression import compress
from fedhead.federated.local_training import LocalTraining, TrainResult, frozen_rows_of, train_local
from fedhead.federated.payload import ClientUpdate
from fedhead.federated.state import State, load_state_, trainable_state
from fedhead.heads.importance import score_heads
from fedhead.heads.mean_context import HeadContextMeans
from fedhead.heads.plan import HeadPlan, head_plan
from fedhead.heads.pruning import coverage_heads_mask, kept_heads_mask, rolling_heads_mask, sampled_scores
from fedhead.models.loading import LoadedModel, device_of, enable_activation_checkpointing_
from fedhead.models.slicing import attach_frozen_heads, gather_kept, prune_heads_, scale_kept_context, scatter_kept
from fedhead.seeds import Stream, derived_seed


@dataclass(frozen=True)
class ClientOptions:
    """What a client's round depends on, and nothing else of the run's config."""

    heads: HeadsSection  # how the client scores, picks and prunes its heads
    training: LocalTraining  # how it trains the kept heads
    seed: int  # every random draw of the round derives from (seed, round, client)
    always_score: bool = False  # the server weighs heads by their scores even when nothing is pruned
    tier_local_steps: tuple[int, ...] | None = None  # client c: tier_local_steps[c % len] steps
    checkpointing: tuple[bool, ...] = (False,)  # client c: activation checkpointing if checkpointing[c % len]
    upload_bits: int = 32  # 8 / 4 / 3 / 2: quantised upload with error feedback (fedhead.federated.compression)
    tier_batch_size: tuple[int, ...] | None = None  # client c: batches of tier_batch_size[c % len] examples
    upload_deflate: bool = False  # the update's payload is deflated (fedhead.federated.payload.encode_update)
    tier_micro_batch_size: tuple[int, ...] | None = None  # client c: micro-batches of tier_micro_batch_size[c % len]

    @classmethod
    def from_config(cls, cfg: Config) -> ClientOptions:
        fed = cfg.federated
        always = fed.aggregation == "head_weighted" and fed.aggregation_weights != "data_size"
        ckpt = fed.activation_checkpointing
        return cls(cfg.heads, LocalTraining.from_config(fed), cfg.seed, always,
                   tuple(fed.tier_local_steps) if fed.tier_local_steps else None,
                   tuple(ckpt) if isinstance(ckpt, list) else (ckpt,), fed.upload_bits,
                   tuple(fed.tier_batch_size) if fed.tier_batch_size else None, fed.upload_deflate,
                   tuple(fed.micro_batch_size) if isinstance(fed.micro_batch_size, list) else None)

    def training_of(self, client_id: int) -> LocalTraining:
        """How `client_id` trains: its tier's local steps, batch size and micro-batch size when tier_local_steps /
        tier_batch_size / a list of micro_batch_size are set."""
        training = self.training
        if self.tier_local_steps is not None:
            training = replace(training, local_steps=self.tier_local_steps[client_id % len(self.tier_local_steps)])
        if self.tier_batch_size is not None:
            training = replace(training, batch_size=self.tier_batch_size[client_id % len(self.tier_batch_size)])
        if self.tier_micro_batch_size is not None:
            micro = self.tier_micro_batch_size[client_id % len(self.tier_micro_batch_size)]
            training = replace(training, micro_batch_size=micro)
        if training.micro_batch_size is not None and training.micro_batch_size >= training.batch_size:
            training = replace(training, micro_batch_size=None)  # micro-batches of the whole batch: none
        return training

    def checkpointing_of(self, client_id: int) -> bool:
        """Whether `client_id` trains with activation checkpointing."""
        return self.checkpointing[client_id % len(self.checkpointing)]


@dataclass
class _Scoring:
    """What the scoring step measured on the client's sample of `size` examples (`batches`, on the model's device)."""

    scores: torch.Tensor  # [blocks, heads], the received model's head importance
    loss_before: float  # the received model's loss on the sample
    batches: list[dict[str, torch.Tensor]]
    size: int
    means: HeadContextMeans | None  # heads.compensate = "mean" and the client prunes: the heads' mean contexts
    flops: int
    seconds: float


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
    training, sparsity = options.training_of(client_id), options.heads.sparsity_of(client_id, round_)
    seed = partial(derived_seed, options.seed, round_, client_id)  # stream -> this round's seed of that stream
    load_state_(lm.model, global_state)
    gen = torch.Generator().manual_seed(seed(Stream.CLIENT_DATA))  # the sample, the scoring's, the batch order
    scoring = _score(lm, data, options, sparsity, training.micro_batch_size or training.batch_size, gen)
    plan = _plan(scoring.scores, options.heads, sparsity, round_, client_id, head_counts, seed(Stream.HEAD_SAMPLING))
    work, handles = _working_copy(lm, plan, options.heads.scale_kept, scoring.means)
    result = _train(lm, work, plan, data, training, gen, options.checkpointing_of(client_id), seed(Stream.DROPOUT))
    loss_after = _loss_after(work, handles, scoring)
    tensors, quantized, new_residual = _package(lm, work, plan, global_state, options.upload_bits, residual,
                                                seed(Stream.QUANTIZATION))
    return ClientUpdate(
        client_id=client_id,
        num_examples=len(data),
        kept_heads=plan.kept,
        head_scores=scoring.scores.clamp(0, 1),
        tensors=tensors,
        loss_before=scoring.loss_before,
        loss_after=loss_after,
        train_loss=result.mean_loss,
        stats={
            "sparsity": sparsity,
            "steps": result.steps,
            "train_flops": result.flops,
            "scoring_flops": scoring.flops,
            "peak_memory_bytes": result.peak_memory_bytes,
        },
        timings={"train_seconds": result.seconds, "scoring_seconds": scoring.seconds},
        upload_bits=options.upload_bits,
        quantized=quantized,
        residual=new_residual,
    )


def _score(lm: LoadedModel, data: datasets.Dataset, options: ClientOptions, sparsity: float, batch_size: int,
           gen: torch.Generator) -> _Scoring:
    """Step 1: the received model's head scores (`heads.importance`; 'none' when nothing is pruned and the server
    does not weigh by scores) and loss on up to `heads.samples` examples drawn with `gen`."""
    heads = options.heads
    sample = torch.randperm(len(data), generator=gen)[: heads.samples].tolist()
    device = device_of(lm.model)
    batches = [to_device(b, device) for b in batches_of(data, sample, batch_size, lm.tokenizer)]
    method = heads.importance if sparsity > 0 or options.always_score else "none"
    # the removed heads' mean contexts, for the bias that stands in for them (unused if the plan removes none)
    means = HeadContextMeans(lm.model, lm.head_map, lm.prefix) if heads.compensate == "mean" and sparsity > 0 else None
    start = time.perf_counter()
    with count_flops() as flops, means if means is not None else nullcontext():
        scores, loss_before = score_heads(
            lm.model, lm.head_map, batches, method,
            special_ids=lm.tokenizer.all_special_ids if heads.exclude_special_tokens else [],
            prefix=lm.prefix, generator=gen,
        )
    return _Scoring(scores, loss_before, batches, len(sample), means, flops[0], time.perf_counter() - start)


def _plan(scores: torch.Tensor, heads: HeadsSection, sparsity: float, round_: int, client_id: int,
          head_counts: torch.Tensor | None, sampling_seed: int) -> HeadPlan:
    """Step 2: the kept heads (by `heads.schedule`; 'importance': the top of `scores`, or of a sample of them drawn
    from `sampling_seed` with `heads.selection = "sample"`), then what `heads.mode` computes (`head_plan`)."""
    ranking = scores
    if heads.selection == "sample" and sparsity > 0:
        ranking = sampled_scores(scores, heads.temperature, torch.Generator().manual_seed(sampling_seed))
    if heads.schedule == "rolling" and sparsity > 0:
        blocks, heads_per_block = scores.shape
        kept = rolling_heads_mask(blocks, heads_per_block, sparsity, round_, client_id,
                                  shared=heads.rolling_window == "shared")
    elif heads.schedule == "coverage" and sparsity > 0:
        counts = torch.zeros(scores.shape, dtype=torch.int64) if head_counts is None else head_counts
        kept = coverage_heads_mask(scores.cpu(), counts.cpu(), sparsity, heads.coverage_pool)
    else:
        kept = kept_heads_mask(ranking, sparsity, heads.scope, heads.min_heads_per_block)
    return head_plan(heads, sparsity, kept, ranking)


def _working_copy(lm: LoadedModel, plan: HeadPlan, scale_kept: bool,
                  means: HeadContextMeans | None) -> tuple[torch.nn.Module, list]:
    """Step 3: a copy of the received model that computes `plan.computed` heads (the others sliced out, their mean
    context in the output bias when `means` were recorded) and `plan.side` heads without autograd; with the hooks
    it got (side heads, the HeteroFL scaler with `scale_kept`), which `_loss_after` removes."""
    work = copy.deepcopy(lm.model)
    handles: list = []
    if not bool(plan.computed.all()):
        prune_heads_(work, lm.head_map, plan.computed, lm.prefix, means.means() if means is not None else None)
        if bool(plan.side.any()):  # the side heads come back as no-grad side computations
            handles += attach_frozen_heads(work, copy.deepcopy(lm.model), lm.head_map, plan.computed, lm.prefix,
                                           plan.side)
        if scale_kept:
            handles += scale_kept_context(work, lm.head_map, plan.computed, lm.prefix)
    return work, handles


def _train(lm: LoadedModel, work: torch.nn.Module, plan: HeadPlan, data: datasets.Dataset, training: LocalTraining,
           gen: torch.Generator, checkpointing: bool, dropout_seed: int) -> TrainResult:
    """Step 4: train the working copy (`train_local`): the kept heads' slices change, the computed but not kept
    heads' slices stay as received; dropout draws from `dropout_seed`, the batch order from `gen`."""
    frozen = frozen_rows_of(work, plan.kept, plan.computed, lm.layout) if bool((plan.computed & ~plan.kept).any()) \
        else None
    checkpointed = enable_activation_checkpointing_(work) if checkpointing else None
    torch.manual_seed(dropout_seed)
    return train_local(work, data, training, lm.tokenizer, gen, frozen, checkpointed)


@torch.no_grad()
def _loss_after(work: torch.nn.Module, handles: list, scoring: _Scoring) -> float:
    """The trained working copy's mean loss on the scoring sample (eval mode, the training-only HeteroFL scaler
    removed first); every hook of `handles` is removed after it."""
    for handle in handles:
        if getattr(handle, "training_only", False):  # the HeteroFL scaler acts during training only
            handle.remove()
    work.eval()
    loss = sum(float(work(**b).loss) * len(b["labels"]) for b in scoring.batches) / scoring.size
    for handle in handles:
        handle.remove()
    return loss


def _package(lm: LoadedModel, work: torch.nn.Module, plan: HeadPlan, global_state: State, upload_bits: int,
             residual: State | None, rounding_seed: int,
             ) -> tuple[State, dict[str, tuple[torch.Tensor, torch.Tensor]] | None, State | None]:
    """Step 5: what travels: the kept heads' slices of the head-sliced tensors and the shared tensors; with
    `upload_bits` < 32 the deltas from `global_state`, quantised with error feedback (`compress`, rounding drawn
    from `rounding_seed`). Returns (tensors, quantized or None, the new residual or None)."""
    tensors = trainable_state(work)  # head-sliced tensors hold the computed heads
    if not bool(plan.computed.equal(plan.kept)):  # only the trained heads' slices travel
        if not bool(plan.computed.all()):
            tensors = scatter_kept(tensors, plan.computed, lm.layout, global_state)  # back to full shape first
        tensors = gather_kept(tensors, plan.kept, lm.layout)
    if upload_bits >= 32:
        return tensors, None, None
    rounding = torch.Generator().manual_seed(rounding_seed)
    quantized, deltas, new_residual = compress(tensors, global_state, residual, plan.kept.cpu(), lm.layout,
                                               upload_bits, rounding)
    return deltas, quantized, new_residual
