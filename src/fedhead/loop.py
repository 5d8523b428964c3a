"""The run loop every engine shares, below the drivers: the run context (`RunContext`; `Simulation` holds model,
data, client partitions, the server optimiser's moments and the clients' error-feedback residuals), the server
round's options (`server_options`), and `drive_rounds`: run directory, resume, the rounds (a driver's round
function), evaluation with its extras (pruned model, tail average), checkpoints, the adapter and the summary
(`summarize`).

Drivers only move bytes over it: the in-process engine (`runners/local.py`) trains each selected client in this
process, the Flower ServerApp (`runners/flower_app.py`) and `FedHeadStrategy.start` (`runners/flower_start.py`,
whose run context evaluates through the user's `evaluate_fn`) send messages to nodes; each hands `drive_rounds` a
function that runs one round.

Resuming: every round ends with an atomic checkpoint (`fedhead.run_dir.Checkpoint`) of the global state, the
server optimiser's moments, the clients' residuals, the client statistics, the selection RNG and the tail
average. `resume=True` continues after the last checkpoint; because each client's randomness is derived from
(seed, round, client), the resumed run ends with the same metrics as an uninterrupted one (timings aside).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import datasets
import numpy as np
import torch

from fedhead.config import Config, ConfigError
from fedhead.data import label_histograms, partition_indices
from fedhead.data.tasks import TaskData, class_labels, load_task_data
from fedhead.federated.client import ClientOptions
from fedhead.federated.client_round import client_round
from fedhead.federated.evaluation import evaluate
from fedhead.federated.payload import decode_update
from fedhead.federated.selection import ClientStats
from fedhead.federated.server import Reply, RoundPlan, ServerOptions
from fedhead.federated.server_optimizer import ServerOptimizer
from fedhead.federated.state import State, load_state_, state_misfit, trainable_state
from fedhead.federated.tail_average import TailAverage
from fedhead.heads.pruning import consensus_heads_mask
from fedhead.models import LoadedModel
from fedhead.models.headwise import is_headwise, standard_lora_
from fedhead.models.loading import load_tokenizer
from fedhead.models.slicing import prune_heads_
from fedhead.run_dir import LABELS, PARTITION, SUMMARY, Checkpoint, RunDir
from fedhead.run_metrics import client_head_masks, tail_mean
from fedhead.trained import build_run_model

log = logging.getLogger("fedhead")


class RunContext(Protocol):
    """What `drive_rounds` needs from a driver besides its round function.

    Attributes:
        cfg: the run's options.
        server_moments: the server optimiser's state (checkpointed; the round function updates it).
        residuals: client id -> error-feedback residual, for clients that live in this process (checkpointed).
        brings_own_data: devices train on their own data (the server holds no partition): partition.json records
            the sizes they report.
    """

    cfg: Config
    server_moments: State
    residuals: dict[int, State]

    @property
    def brings_own_data(self) -> bool: ...

    def initial_state(self) -> State:
        """The global trainable state before round 1."""
        ...

    def partition_record(self) -> dict[str, Any]:
        """partition.json: label names, partition sizes, label histograms."""
        ...

    def evaluate(self, state: State, round_: int) -> dict[str, Any]:
        """Loss and the task's metrics of the global model `state` after `round_` (0: before training); nothing
        when there is nothing to evaluate on."""
        ...

    def evaluate_pruned(self, metrics: list[dict[str, Any]]) -> dict[str, Any]:
        """`heads.eval_pruned` on the global model last evaluated (`evaluate`), from the metrics lines so far."""
        ...

    def save_model(self, state: State, rd: RunDir) -> None:
        """The final global model, at the end of the run."""
        ...


@dataclass
class Simulation:
    """Everything a run needs in memory: model, data, client partitions."""

    cfg: Config
    lm: LoadedModel
    data: TaskData
    parts: list[np.ndarray]
    server_moments: State = field(default_factory=dict)  # the server optimiser's state, checkpointed
    # federated.upload_bits < 32: each client's error-feedback residual, which a real client keeps (checkpointed)
    residuals: dict[int, State] = field(default_factory=dict)

    @classmethod
    def setup(cls, cfg: Config, *, training_data: bool = True) -> Simulation:
        """Model, data and partitions of `cfg`. training_data=False (a Flower server whose devices bring their
        own data): data.train is not read, no partitions; the labels come from data.labels or data.eval."""
        torch.set_num_threads(cfg.threads or torch.get_num_threads())
        tokenizer = load_tokenizer(cfg)
        read = cfg if training_data else cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": None})})
        data = load_task_data(read, tokenizer)
        lm = build_run_model(cfg, data.num_labels, tokenizer)
        return cls(cfg, lm, data, client_partitions(cfg, data))

    @property
    def brings_own_data(self) -> bool:
        return not self.parts

    @functools.cached_property
    def options(self) -> ServerOptions:
        """The server round's options (`server_options`), built once."""
        return server_options(self.cfg)

    def initial_state(self) -> State:
        return trainable_state(self.lm.model)

    def partition_record(self) -> dict[str, Any]:
        labels = class_labels(self.data)
        hist = None if labels is None else label_histograms(labels, self.parts, self.data.num_labels)
        return {"label_names": self.data.label_names, "sizes": [len(p) for p in self.parts], "label_histograms": hist}

    def evaluate(self, state: State, round_: int) -> dict[str, Any]:
        """The global model `state`, loaded into the model (it stays loaded), on the evaluation set."""
        load_state_(self.lm.model, state)
        return self.evaluate_global()

    def save_model(self, state: State, rd: RunDir) -> None:
        """The adapter (headwise LoRA saved as the equivalent standard peft LoRA of rank U * r_h, which peft can
        load) and its labels, in rd/adapter."""
        load_state_(self.lm.model, state)
        model = self.lm.model
        if is_headwise(model):
            model = copy.deepcopy(model)
            standard_lora_(model)
        model.save_pretrained(str(rd.adapter_dir))
        (rd.adapter_dir / LABELS).write_text(json.dumps(self.data.label_names))

    def evaluate_global(self) -> dict[str, float]:
        """Loss and the task's metrics of the model as loaded (the global model) on the evaluation set (nothing
        when there is none: a Flower server without data.eval or training data only aggregates)."""
        if self.data.eval is None:
            return {}
        return evaluate(self.lm.model, self.data.eval, self.lm.tokenizer, self.cfg.federated.eval_batch_size,
                        task=self.lm.task, generation=self.cfg.generation)

    def evaluate_pruned(self, metrics: list[dict[str, Any]]) -> dict[str, Any]:
        """`heads.eval_pruned`: the global model (as loaded) pruned to the consensus of the client head masks in
        the last `heads.eval_pruned_window` rounds of `metrics` (`consensus_heads_mask`, per block), scored on
        the evaluation set; its metrics as pruned_<name>, and pruned_kept_heads. The loaded model is untouched.
        Nothing when there is no evaluation set or no client update in the window yet."""
        heads = self.cfg.heads
        if heads.eval_pruned is None or self.data.eval is None:
            return {}
        try:
            kept, scores = client_head_masks(metrics, heads.eval_pruned_window)
        except ConfigError:
            return {}
        mask = consensus_heads_mask(kept, scores, heads.eval_pruned)
        work = copy.deepcopy(self.lm.model)
        prune_heads_(work, self.lm.head_map, mask, self.lm.prefix)
        result = evaluate(work, self.data.eval, self.lm.tokenizer, self.cfg.federated.eval_batch_size,
                          task=self.lm.task, generation=self.cfg.generation)
        return {**{f"pruned_{k}": v for k, v in result.items()}, "pruned_kept_heads": int(mask.sum())}

    def client_data(self, client: int) -> datasets.Dataset:
        if self.data.train is None:
            raise ValueError("no training data: this simulation's devices bring their own")
        return self.data.train.select(self.parts[client])

    @functools.cached_property
    def client_options(self) -> ClientOptions:
        """What a client's round depends on (`ClientOptions.from_config`), built once."""
        return ClientOptions.from_config(self.cfg)

    def client_reply(self, plan: RoundPlan, client: int) -> Reply:
        """Client `client`'s answer to the round `plan`, trained in this process as a device would
        (`client_round`: the plan's payload in, the update's bytes out), decoded as the server receives it; the
        client's error-feedback residual stays here, as on its device."""
        start = time.perf_counter()
        answer = client_round(self.lm, plan.down, self.client_data(client), self.client_options, client,
                              plan.round_, plan.head_counts, self.residuals.get(client))
        if answer.residual is not None:
            self.residuals[client] = answer.residual
        update = decode_update(answer.payload)
        return Reply(client, update, len(plan.down), len(answer.payload), answer.timings,
                     seconds_in_read=time.perf_counter() - start)

    def global_losses(self, state: State, clients: list[int]) -> dict[int, float]:
        """Loss of the global model on each client's data (power-of-choice candidates report it)."""
        load_state_(self.lm.model, state)
        sample = self.cfg.federated.power_of_choice_samples
        return {
            c: evaluate(self.lm.model, self.client_data(c).select(range(min(sample, len(self.parts[c])))),
                        self.lm.tokenizer, self.cfg.federated.eval_batch_size, task=self.lm.task)["eval_loss"]
            for c in clients
        }


def client_partitions(cfg: Config, data: TaskData) -> list[np.ndarray]:
    """Each client's indices into `data.train`: `partition_indices` over the class labels (free text: one
    class), none without training data. A Flower node in partition form draws the same ones."""
    if data.train is None:
        return []
    labels = class_labels(data)
    return partition_indices(labels if labels is not None else [0] * len(data.train), cfg.partition, cfg.seed)


def server_options(cfg: Config) -> ServerOptions:
    """The server round's options from the run's config."""
    fed, robust, dp = cfg.federated, cfg.robust, cfg.privacy
    return ServerOptions(
        aggregation=fed.aggregation, weighting=fed.aggregation_weights, trim_fraction=robust.trim_fraction,
        max_norm=robust.max_update_norm, norm_action=robust.norm_action, outlier_factor=robust.outlier_factor,
        min_clients=fed.min_clients, max_examples=fed.max_examples, unverified_sizes=robust.unverified_sizes,
        optimizer=ServerOptimizer(fed.server_optimizer, fed.server_learning_rate, fed.server_momentum,
                                  fed.server_beta1, fed.server_beta2, fed.server_tau),
        dp_noise_multiplier=dp.noise_multiplier if dp.enabled else None, dp_clipping_norm=dp.clipping_norm,
        dp_delta=dp.delta, dp_sample_rate=fed.clients_per_round / cfg.partition.num_clients)


RoundFn = Callable[[State, int, np.random.Generator, ClientStats], tuple[State, dict[str, Any]]]


def drive_rounds(
    sim: RunContext,
    rd: RunDir,
    round_fn: RoundFn,
    *,
    resume: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
    start: float | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """The run loop shared by every engine: run directory, resume, rounds (`round_fn`), evaluation, checkpoints,
    adapter and summary. `round_fn(state, round, rng, stats)` returns the next state and the round's metrics."""
    cfg = sim.cfg
    start = time.perf_counter() if start is None else start
    state = sim.initial_state()
    stats, rng, first = ClientStats(), np.random.default_rng(cfg.seed), 1
    window = cfg.federated.tail_average_rounds
    tail = TailAverage.for_run(cfg.federated.rounds, window)
    found = rd.newest_checkpoint() if resume else None
    if resume and found is None:
        log.warning("no checkpoint in %s: starting from round 1", rd.path)
    if found is not None:
        path, saved = found
        state, sim.server_moments, sim.residuals = saved.state, saved.server_moments, saved.residuals
        misfit = state_misfit(state, sim.initial_state())
        if misfit is not None:
            raise ConfigError(f"the checkpoint of {rd.path} does not fit the run's config: {misfit}")
        rd.accept_config(cfg, saved.round, pinned=saved.config)
        rd.accept_metrics(saved.round)
        tail = TailAverage.resumed(saved.tail_average, cfg.federated.rounds, window)
        stats = saved.client_stats
        rng.bit_generator.state = saved.rng
        first = saved.round + 1
        rd.truncate_metrics(saved.round)
        to_go = (f"rounds {first} to {cfg.federated.rounds} to go" if first <= cfg.federated.rounds
                 else "no round to go (the summary is written again)")
        log.info("resuming %s from %s after round %d: %s", rd.path, path.name, saved.round, to_go)
    else:
        rd.create(cfg.model_dump_json(indent=2), overwrite=overwrite or resume)
        rd.metrics_file.unlink(missing_ok=True)
        rd.write_json(PARTITION, sim.partition_record())
        initial = sim.evaluate(state, 0)
        rd.append_metrics({"round": 0, **initial})
        if on_round:
            on_round({"round": 0, **initial})
    if found is not None and first > cfg.federated.rounds:
        rd.commit_config(cfg)  # nothing left to run: the summary is rewritten below
    for round_ in range(first, cfg.federated.rounds + 1):
        state, metrics = round_fn(state, round_, rng, stats)
        if tail is not None:
            tail.add(round_, state)
        if round_ % cfg.federated.eval_every == 0 or round_ == cfg.federated.rounds:
            t = time.perf_counter()
            metrics.update(sim.evaluate(state, round_))
            metrics["seconds_eval"] = time.perf_counter() - t
            if cfg.heads.eval_pruned is not None:  # reads the metrics log: only when asked for
                metrics.update(sim.evaluate_pruned([*rd.metrics(), metrics]))
        if round_ == cfg.federated.rounds and tail is not None:
            metrics.update(evaluate_tail_average(sim, tail, state))
        rd.append_metrics(metrics)
        if sim.brings_own_data:  # devices train on their own data: partition.json records the sizes they report
            record_reported_sizes(rd, metrics)
        rd.save_checkpoint(Checkpoint(
            round=round_, state=state, rng=dict(rng.bit_generator.state), client_stats=stats,
            config=cfg.model_dump(mode="json"),  # pinned: a resume refuses a config.json edited since
            server_moments=sim.server_moments, residuals=sim.residuals, tail_average=tail,
            tail_average_complete=tail is not None and tail.complete(round_) and round_ == cfg.federated.rounds))
        if found is not None and round_ == first:
            rd.commit_config(cfg)
        if on_round:
            on_round(metrics)
        if stop_after is not None and round_ >= stop_after and round_ < cfg.federated.rounds:
            return {"stopped_after": round_}
    return _finish(sim, state, rd, time.perf_counter() - start)


def record_reported_sizes(rd: RunDir, metrics: dict[str, Any]) -> None:
    """Merge the training-set sizes the round's clients reported (`num_examples` of the accepted updates) into
    partition.json's "reported_sizes" ({client id: size}, the last report of each client), for a run whose server
    holds no training data ("sizes" stays empty: the server cannot check what a device says it has)."""
    reported = {str(c["client"]): c["num_examples"] for c in metrics.get("clients", []) if "num_examples" in c}
    if not reported:
        return
    partition = rd.read_json(PARTITION) if rd.partition_file.is_file() else {}
    sizes = {**partition.get("reported_sizes", {}), **reported}
    partition["reported_sizes"] = dict(sorted(sizes.items(), key=lambda item: int(item[0])))
    rd.write_json(PARTITION, partition)


def evaluate_tail_average(sim: RunContext, tail: TailAverage, state: State) -> dict[str, Any]:
    """federated.tail_average_rounds, at the last round: the metrics of the tail-averaged model (the mean of the
    last rounds' global states) as tail_average_<name>; nothing, with a warning, when the run did not see every
    round of the window (e.g. it was resumed from a checkpoint written without the running sum)."""
    rounds = sim.cfg.federated.rounds
    if not tail.complete(rounds):
        log.warning("the tail average over rounds %d-%d is incomplete (%d of them seen): not evaluated",
                    tail.start, rounds, tail.count)
        return {"tail_average_rounds_seen": tail.count}
    return {f"tail_average_{k}": v for k, v in sim.evaluate(tail.mean(state), rounds).items()}


def _finish(sim: RunContext, state: State, rd: RunDir, seconds: float) -> dict[str, Any]:
    sim.save_model(state, rd)
    summary = summarize(rd.metrics(), sim.cfg.metric)
    summary["seconds_total_last_session"] = seconds
    rd.write_json(SUMMARY, summary)
    return summary


def summarize(metrics: list[dict[str, Any]], metric: str = "accuracy") -> dict[str, Any]:
    """Totals and final values of a run's metrics lines; `metric` is the run's headline score (its initial,
    final and best values are also written as `*_accuracy` when it is accuracy). `tail_mean_score` is the mean
    of the last TAIL evaluations: with few label-skewed clients a round, one evaluation swings by points."""
    rounds = [m for m in metrics if m.get("round", 0) > 0]
    evaluated = [m for m in metrics if metric in m]
    scores = {
        "initial": evaluated[0][metric] if evaluated else None,
        "final": evaluated[-1][metric] if evaluated else None,
        "best": max((m[metric] for m in evaluated), default=None),
    }
    scores["tail_mean"] = tail_mean(metrics, metric)
    summary: dict[str, Any] = {"rounds": len(rounds), "metric": metric}
    summary.update({f"{k}_score": v for k, v in scores.items()})
    if rounds and f"tail_average_{metric}" in rounds[-1]:  # federated.tail_average_rounds: the averaged model
        summary["tail_average_score"] = rounds[-1][f"tail_average_{metric}"]
    pruned = [m for m in evaluated if f"pruned_{metric}" in m]
    if pruned:  # heads.eval_pruned: the pruned deployment's final and tail-mean scores beside the whole model's
        summary["pruned_final_score"] = pruned[-1][f"pruned_{metric}"]
        summary["pruned_tail_mean_score"] = tail_mean(metrics, f"pruned_{metric}")
        summary["pruned_kept_heads"] = pruned[-1]["pruned_kept_heads"]
    if metric == "accuracy":
        summary.update({f"{k}_accuracy": v for k, v in scores.items()})
    summary.update({
        "final_eval_loss": evaluated[-1]["eval_loss"] if evaluated else None,
        "bytes_down": sum(m["bytes_down"] for m in rounds),
        "bytes_up": sum(m["bytes_up"] for m in rounds),
        "train_flops": sum(m["train_flops"] for m in rounds),
        "scoring_flops": sum(m["scoring_flops"] for m in rounds),
        "seconds_clients": sum(m["seconds_clients"] for m in rounds),
    })
    return summary
