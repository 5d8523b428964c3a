"""`FedHeadStrategy.start` with fedhead's whole behaviour: the run context (`StartedRun`) under which fedhead's run
loop (`fedhead.loop.drive_rounds`) drives the strategy when a user's own ServerApp calls `start` (README, "Your own
Flower app"), and what `start` returns.

Under `start`, as under fedhead's own ServerApp, every round is checkpointed in the strategy's run directory and a
strategy built with `resume=True` continues after the last checkpoint (same metrics as an uninterrupted run:
selection RNG, client statistics, server-optimiser moments and the tail average's running sum are checkpointed);
`federated.eval_every` sets the rounds the user's `evaluate_fn` is called at (and always the last);
`federated.tail_average_rounds` evaluates the mean of the last rounds' global models through the same
`evaluate_fn` (as tail_average_<name>); `robust.dropout_probability` drops the same clients as the in-process
engine. `heads.eval_pruned` needs the model on the server (fedhead's ServerApp has it, `start` does not): refused.

The server holds no model and no data here: the global state is what `initial_arrays` gave, evaluation is the
user's `evaluate_fn`, the devices keep their own error-feedback residuals, and the final model is `Result.arrays`
(the user saves it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import datasets
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

from fedhead.config import Config, ConfigError
from fedhead.federated.evaluation import evaluate
from fedhead.federated.state import State, load_state_
from fedhead.models import LoadedModel
from fedhead.run_dir import RunDir

log = logging.getLogger("flwr")
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
TRAIN_TOTALS = ("bytes_down", "bytes_up", "train_flops", "scoring_flops")


def started_config(cfg: Config, num_rounds: int) -> Config:
    """The run's config for `start(num_rounds=...)` (num_rounds replaces federated.rounds, validated again);
    ConfigError, in one line, for an option `start` cannot honour."""
    if cfg.heads.eval_pruned is not None:
        raise ConfigError("heads.eval_pruned needs the model on the server: fedhead's ServerApp "
                          "(`fedhead run --engine flower`, fedhead.runners.flower_app) honours it, Strategy.start "
                          "does not; unset it or evaluate the pruned model afterwards (`fedhead evaluate`)")
    data = cfg.model_dump()
    data["federated"]["rounds"] = num_rounds
    return Config.model_validate(data)


def round_totals(metrics: dict[str, Any]) -> MetricRecord:
    """A round's totals as Flower reports them (`aggregate_train`'s MetricRecord): bytes, FLOPs, the number of
    clients whose updates counted and their mean training loss."""
    scalars: dict[str, Any] = {k: metrics[k] for k in TRAIN_TOTALS}
    scalars["clients"] = len(metrics["clients"])
    if metrics.get("train_loss") is not None:
        scalars["train_loss"] = metrics["train_loss"]
    return MetricRecord(scalars)


class StartedRun:
    """The run context (`fedhead.loop.RunContext`) of `FedHeadStrategy.start`.

    Args:
        cfg: the run's options (`started_config`).
        initial: the global trainable state before round 1 (`initial_arrays`).
        evaluate_fn: the user's central evaluation, `evaluate_fn(round, arrays) -> MetricRecord | None`, or None.
    """

    def __init__(self, cfg: Config, initial: State, evaluate_fn: EvaluateFn | None) -> None:
        self.cfg, self.initial, self.evaluate_fn = cfg, initial, evaluate_fn
        self.server_moments: State = {}
        self.residuals: dict[int, State] = {}  # the devices keep their own
        self.final: State | None = None

    @property
    def brings_own_data(self) -> bool:
        return True

    def initial_state(self) -> State:
        return dict(self.initial)

    def partition_record(self) -> dict[str, Any]:
        return {"label_names": self.cfg.data.labels, "sizes": [], "label_histograms": None}

    def evaluate(self, state: State, round_: int) -> dict[str, Any]:
        if self.evaluate_fn is None:
            return {}
        metrics = self.evaluate_fn(round_, ArrayRecord(state))
        return {} if metrics is None else dict(metrics.items())

    def evaluate_pruned(self, metrics: list[dict[str, Any]]) -> dict[str, Any]:
        return {}  # refused by started_config

    def save_model(self, state: State, rd: RunDir) -> None:
        self.final = state  # `Result.arrays`: the user's app saves it

    def result(self, rd: RunDir) -> Result:
        """What `start` returns, from the run's metrics lines (rounds of earlier sessions of a resumed run
        included): the final global state, each round's totals, and the central evaluations."""
        assert self.final is not None, "the run has not finished"
        lines = rd.metrics()
        evaluated = set(lines[0]) - {"round"} if lines else set()  # the names evaluate_fn returned at round 0
        result = Result(arrays=ArrayRecord(self.final))
        for m in lines:
            scores = {k: v for k, v in m.items() if k in evaluated or k.startswith("tail_average_")}
            if scores:
                result.evaluate_metrics_serverapp[m["round"]] = MetricRecord(scores)
            if m["round"] > 0:
                result.train_metrics_clientapp[m["round"]] = round_totals(m)
        return result


def central_evaluation(lm: LoadedModel, data: datasets.Dataset, cfg: Config) -> EvaluateFn:
    """An `evaluate_fn` for `Strategy.start`: loss and the task's metrics of the global model on `data`."""
    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_state_(lm.model, arrays.to_torch_state_dict())
        metrics = evaluate(lm.model, data, lm.tokenizer, cfg.federated.eval_batch_size, task=lm.task,
                           generation=cfg.generation)
        return MetricRecord({name: value for name, value in metrics.items()})
    return evaluate_fn


class ThroughFlower(logging.Handler):
    """Hands fedhead's log records (resume, damaged checkpoints, ...) to Flower's logger, which shows them under
    `flwr run --stream` and in the SuperLink's log."""

    def emit(self, record: logging.LogRecord) -> None:
        log.handle(record)


def route_fedhead_logs_through_flower() -> None:
    """fedhead's INFO and higher records through Flower's logger, once each (a ServerApp's own lines reach the
    user only through Flower's logger)."""
    fedhead_log = logging.getLogger("fedhead")
    if not any(isinstance(h, ThroughFlower) for h in fedhead_log.handlers):
        fedhead_log.addHandler(ThroughFlower())
    fedhead_log.setLevel(logging.INFO)
    fedhead_log.propagate = False
