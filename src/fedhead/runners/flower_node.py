"""What a Flower node is and what it loads: its identity from its node config, and the run's model and its
client's training rows, loaded once per run in a ClientApp process and kept for its next messages.

A node serves one client, chosen by its node config (`flower-supernode --node-config '...'`; values are TOML,
so a path is quoted):

    data="/path/local.jsonl" [client-id=I]   device-local: trains on that file only (any format data.train
                                               accepts), checked against the run's config (fields, data.labels)
    partition-id=I num-partitions=N          partition I of the run's data.train (simulations and demos)

Flower's simulation engine keeps its worker processes for the run; its deployment engine starts a ClientApp process
per message (flwr 1.42), which loads them again.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedhead.config import Config
from fedhead.data.tasks import load_device_data, load_task_data
from fedhead.loop import client_partitions
from fedhead.models import LoadedModel
from fedhead.models.loading import load_tokenizer
from fedhead.trained import build_run_model


@dataclass(frozen=True)
class NodeIdentity:
    """What a node's config says it serves (see the module docstring)."""

    client_id: int | None  # None: the server numbers the node
    num_clients: int | None = None  # partition form: num-partitions
    data: str | None = None  # device-local form: the node's own training file


def node_identity(node_config: dict[str, Any]) -> NodeIdentity:
    """This node's identity from its node config; ValueError (one line) when it serves no client."""
    def integer(key: str) -> int:
        value = node_config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"node config {key}={value!r} is not a non-negative integer")
        return value

    if "data" in node_config:
        path = str(node_config["data"]).strip()
        if not path:
            raise ValueError("node config data= is empty: give the path of this device's training file")
        return NodeIdentity(integer("client-id") if "client-id" in node_config else None, None, path)
    if "partition-id" in node_config:
        if "num-partitions" not in node_config:
            raise ValueError("node config partition-id needs num-partitions (partition.num_clients)")
        pid, n = integer("partition-id"), integer("num-partitions")
        if pid >= n:
            raise ValueError(f"node config partition-id {pid} is not in [0, {n})")
        return NodeIdentity(pid, n)
    raise ValueError("this node serves no data: start the SuperNode with --node-config 'data=\"/path/local.jsonl\"' "
                     "(or 'partition-id=I num-partitions=N' for a demo)")


@dataclass
class NodeData:
    """What this node trains: the run's config and model, and its client's rows."""

    cfg: Config
    lm: LoadedModel
    data: datasets.Dataset


@dataclass(frozen=True)
class NodeRows:
    """A node's training rows as loaded: its own file's (device-local form), or the run's data.train with every
    client's partition (partition form: one load serves every partition a process is asked for)."""

    train: datasets.Dataset
    num_labels: int  # the size of the classifier the model is built with
    parts: list[np.ndarray] | None = None  # partition form: each client's indices into `train`

    def of(self, client: int) -> datasets.Dataset:
        """Client `client`'s rows: its partition, or the whole file."""
        return self.train if self.parts is None else self.train.select(self.parts[client])


ROWS_KEPT = 4  # nodes' rows a process keeps loaded: one in a SuperNode's ClientApp process, more in a test's grid


def node_data(run_id: int, config_json: str, identity: NodeIdentity) -> NodeData:
    """The run's model and this node's rows, loaded once per run in this process and kept for its next messages
    (one run's model, `ROWS_KEPT` nodes' rows): its own file (device-local form, with the run's labels) or its
    partition of data.train. No evaluation set is read: a node evaluates (power-of-choice) on its training rows.

    Keeping the model is safe because every message loads the received global state into it before use
    (`client_update`, `evaluate_reply`) and trains a copy of it; the error-feedback residual lives in the
    node's `context.state`. Where this process serves one message only (Flower's deployment engine starts a
    ClientApp process per message), the loads are paid per message.

    Args:
        run_id: Flower's run id (`context.run_id`): a new run loads again, even with the same config.
        config_json: the run's config as the message carries it.
        identity: what the node serves (`node_identity`).
    Raises:
        DataError: the data does not fit the run's config.
        ValueError: partition form in a run without data.train; ConfigError (a ValueError): the model cannot be
            built (e.g. model.init_from names no run).
    """
    cfg, _ = run_settings(run_id, config_json)
    rows = node_rows(run_id, config_json, identity.data)
    lm = run_model(run_id, config_json, rows.num_labels)
    return NodeData(cfg, lm, rows.of(int(identity.client_id or 0)))


@functools.lru_cache(maxsize=1)
def run_settings(run_id: int, config_json: str) -> tuple[Config, PreTrainedTokenizerBase]:
    """The run's config and tokenizer, read once per run; sets this process's torch threads (`threads`)."""
    cfg = Config.model_validate_json(config_json)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    return cfg, load_tokenizer(cfg)


@functools.lru_cache(maxsize=ROWS_KEPT)
def node_rows(run_id: int, config_json: str, source: str | None) -> NodeRows:
    """The training rows of the node whose own file is `source` (None: partition form, data.train and its
    partitions, `client_partitions`); DataError when they do not fit the run's config, ValueError when the run
    has no data.train to partition."""
    cfg, tokenizer = run_settings(run_id, config_json)
    if source is not None:
        return NodeRows(load_device_data(cfg, source, tokenizer), len(cfg.data.labels or []))
    data = load_task_data(cfg, tokenizer, held_out=False)
    if data.train is None:
        raise ValueError("the run has no data.train to partition: start this node with its own file "
                         "(--node-config 'data=\"/path/local.jsonl\"')")
    return NodeRows(data.train, data.num_labels, client_partitions(cfg, data))


@functools.lru_cache(maxsize=1)
def run_model(run_id: int, config_json: str, num_labels: int) -> LoadedModel:
    """The run's model (`build_run_model`), built once per run: the process keeps one."""
    cfg, tokenizer = run_settings(run_id, config_json)
    return build_run_model(cfg, num_labels, tokenizer)


def forget_runs() -> None:
    """Drop every run this process keeps loaded (what a fresh ClientApp process starts from)."""
    for cache in (run_settings, node_rows, run_model):
        cache.cache_clear()
