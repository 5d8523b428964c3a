"""fedhead on Flower: the app's pieces (node identities, the node table, device data checks, the strategy and
the ClientApp over an in-process loop of messages), equivalence with the in-process engine on Flower's simulation
engine, a real loopback deployment whose SuperNodes each train on their own file (flower-superlink + two
flower-supernode processes + `flwr run`), and a SuperNode killed mid-round. Every process listens on 127.0.0.1
only and is stopped by its pid (its session) in a finally.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER as flwr_logger
from flwr.server.superlink.linkstate.utils import (
    NODE_UNAVAILABLE_ERROR_REASON,
    create_message_error_unavailable_res_message,
)
from flwr.supercore.task_identity import TaskIdentity

from fedhead.config import ConfigError
from fedhead.data import loading
from fedhead.data.loading import DataError
from fedhead.data.tasks import load_device_data
from fedhead.federated.payload import decode_state
from fedhead.federated.selection import ClientStats, select_among
from fedhead.federated.state import trainable_state
from fedhead.models.loading import load_tokenizer
from fedhead.run_dir import RunDir
from fedhead.runners import flower_engine as fe
from fedhead.runners import flower_node
from fedhead.runners.flower_app import RunRefused, main, nodes_config
from fedhead.runners.flower_client import (
    RESIDUAL,
    client_app,
    payload_of,
    payload_record,
)
from fedhead.runners.flower_node import NodeIdentity, forget_runs, node_data, node_identity
from fedhead.runners.flower_nodes import DATA_ERROR, NODE_CONFIG_ERROR, NodeTable
from fedhead.runners.flower_start import ThroughFlower, central_evaluation
from fedhead.runners.flower_strategy import FedHeadStrategy
from fedhead.runners.local import Simulation, run_simulation
from fedhead.trained import starting_state
from tests.conftest import MNLI_TRAIN, ROOT, tiny_config, write_tiny_toml

LABELS = ["contradiction", "entailment", "neutral"]


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------------------------- fast: the pieces


def test_payload_travels_unchanged():
    blob = bytes(range(256)) * 3
    record = payload_record(blob)
    assert payload_of(record) == blob
    assert record.count_bytes() == len(blob) + len("payload")  # the Array's data is the payload itself


def test_node_identity_from_node_config():
    assert node_identity({"partition-id": 1, "num-partitions": 3}) == NodeIdentity(1, 3)
    assert node_identity({"data": "/d/local.jsonl", "client-id": 4}) == NodeIdentity(4, None, "/d/local.jsonl")
    assert node_identity({"data": "/d/local.jsonl"}) == NodeIdentity(None, None, "/d/local.jsonl")
    for bad, message in [({}, "serves no data"), ({"partition-id": 3, "num-partitions": 3}, r"not in \[0, 3\)"),
                         ({"partition-id": 0}, "needs num-partitions"), ({"data": " "}, "data= is empty"),
                         ({"data": "/d/x.jsonl", "client-id": -1}, "non-negative integer"),
                         ({"data": "/d/x.jsonl", "client-id": "a"}, "non-negative integer")]:
        with pytest.raises(ValueError, match=message):
            node_identity(bad)


@pytest.fixture
def task_identity():
    """Flower messages can be built outside a Flower process once the task's identity is set."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def _answer(node: int, record: dict | None = None, error: Error | None = None) -> Message:
    query = Message(RecordDict(), node, "query")
    if error is not None:
        return Message(error, reply_to=query)
    return Message(RecordDict({"node": ConfigRecord(record or {})}), reply_to=query)


def test_node_table_gives_each_node_one_client_id(task_identity):
    # Prepare
    table = NodeTable(num_clients=3)
    # Execute: explicit ids, numbered nodes, and nodes that cannot serve the run
    table.update({10, 11, 12, 13, 14, 15, 16})
    assigned = {
        10: table.assign(10, _answer(10, {"client-id": 1})),  # device with client-id=1
        11: table.assign(11, _answer(11)),  # device without client-id: the lowest free id
        12: table.assign(12, _answer(12, {"client-id": 1})),  # id 1 is taken
        13: table.assign(13, _answer(13, {"client-id": 2, "num-clients": 4})),  # partition of another split
        14: table.assign(14, _answer(14, error=Error(NODE_CONFIG_ERROR, "serves no data"))),
        15: table.assign(15, _answer(15, error=Error(2, "No query function registered"))),  # a user's app
        16: table.assign(16, None),  # no answer
    }
    # Assert
    assert assigned == {10: 1, 11: 0, 12: None, 13: None, 14: None, 15: 2, 16: None}
    assert table.clients() == {0: 11, 1: 10, 2: 15}
    # a node that left frees its id; a new node takes it; a partition node of the right split is known as one
    assert table.update({10, 15, 20, 21}) == [20, 21]
    assert table.assign(20, _answer(20)) == 0
    assert table.assign(21, _answer(21, {"client-id": 0, "num-clients": 3})) is None  # 0 is held by node 20
    table.exclude(20, "error 4001: data: labels not in data.labels")
    assert table.clients() == {1: 10, 2: 15}
    table.update({10, 15, 22})
    assert table.assign(22, _answer(22, {"client-id": 0, "num-clients": 3})) == 0 and table.partition_nodes == {22}
    # the SuperLink's answer for a node that never answered (it stopped sending heartbeats) is no answer
    fresh = NodeTable(num_clients=3)
    fresh.update({23})
    assert fresh.assign(23, _answer(23, error=Error(5, "Error: Node Unavailable"))) is None and fresh.clients() == {}


def test_config_without_training_data_needs_labels(tiny_bert_dir, tmp_path):
    with pytest.raises(ConfigError, match="data.labels is required without data.train"):
        tiny_config(tiny_bert_dir, tmp_path, data={"train": "", "eval": ""})
    with pytest.raises(ConfigError, match="repeats a value"):
        tiny_config(tiny_bert_dir, tmp_path, data={"labels": ["a", "a"]})
    cfg = tiny_config(tiny_bert_dir, tmp_path, data={"train": "", "eval": "", "labels": [0, 1]})
    assert cfg.data.train is None and cfg.data.labels == ["0", "1"]


def _write_records(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _mnli(count: int, labels: set[str] | None = None) -> list[dict]:
    """The first `count` MultiNLI training pairs (with one of `labels`)."""
    rows = [json.loads(line) for line in MNLI_TRAIN.read_text().splitlines()[:400]]
    return [r for r in rows if labels is None or r["label"] in labels][:count]


def test_device_data_is_checked_against_the_run_config(tiny_bert_dir, tmp_path):
    # Prepare
    cfg = tiny_config(tiny_bert_dir, tmp_path, data={"train": "", "labels": LABELS})
    tokenizer = load_tokenizer(cfg)
    good = _write_records(tmp_path / "good.jsonl", _mnli(7))
    no_field = _write_records(tmp_path / "no_field.jsonl", [{"premise": "a", "label": "neutral"}])
    odd_label = _write_records(tmp_path / "odd.jsonl", [{"premise": "a", "hypothesis": "b", "label": "maybe"}])
    # Execute, Assert
    rows = load_device_data(cfg, str(good), tokenizer)
    assert len(rows) == 7 and rows["labels"] == [LABELS.index(r["label"]) for r in _mnli(7)]
    with pytest.raises(DataError, match="field 'hypothesis' not found"):
        load_device_data(cfg, str(no_field), tokenizer)
    with pytest.raises(DataError, match=r"odd.jsonl: labels not in data.labels: \['maybe'\]"):
        load_device_data(cfg, str(odd_label), tokenizer)
    with pytest.raises(DataError, match="data file not found"):
        load_device_data(cfg, str(tmp_path / "elsewhere.jsonl"), tokenizer)
    with pytest.raises(DataError, match="has no data.labels"):
        load_device_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": None})}), str(good),
                         tokenizer)


class LoopGrid:
    """The part of Flower's Grid a strategy uses, delivering each message to a ClientApp in this process with
    the node config of its node and the node's context of run `run_id`, kept between messages (as a SuperNode
    would)."""

    def __init__(self, app: ClientApp, node_configs: dict[int, dict], run_id: int = 1) -> None:
        self.app, self.node_configs, self.run_id, self.replies = app, node_configs, run_id, {}
        self.contexts: dict[int, Context] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.replies)}-{i}"  # set by the SuperLink in Flower
            self.replies[msg.metadata.message_id] = self.answer(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def answer(self, msg: Message) -> Message:
        """The reply of the message's node: its ClientApp's."""
        node = msg.metadata.dst_node_id
        if node not in self.contexts:
            self.contexts[node] = Context(run_id=self.run_id, node_id=node, node_config=self.node_configs[node],
                                          state=RecordDict(), run_config={})
        return self.app(msg, self.contexts[node])

    def pull_messages(self, ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def test_strategy_start_device_local_nodes_train_their_own_files_and_a_misfit_is_recorded(
        tiny_bert_dir, tmp_path, task_identity):
    # Prepare: a server without training data; two devices with files of different sizes and label mixes, and one
    # whose file has a label the run does not know
    cfg = tiny_config(tiny_bert_dir, tmp_path, data={"train": "", "labels": LABELS, "eval_size": 16},
                      partition={"num_clients": 3}, federated={"clients_per_round": 3, "selection": "loss_gap"})
    a = _write_records(tmp_path / "a" / "local.jsonl", _mnli(12, {"entailment", "neutral"}))
    b = _write_records(tmp_path / "b" / "local.jsonl", _mnli(20, {"contradiction"}))
    bad = _write_records(tmp_path / "c" / "local.jsonl", [{"premise": "x", "hypothesis": "y", "label": "maybe"}])
    sim = Simulation.setup(cfg, training_data=False)
    strategy = FedHeadStrategy(nodes_config(cfg, sim), sim.lm.layout, node_wait=0.0)
    grid = LoopGrid(client_app, {7: {"data": str(a), "client-id": 0}, 8: {"data": str(b), "client-id": 1},
                                 9: {"data": str(bad)}})
    initial = trainable_state(sim.lm.model)
    # Execute: Flower's own run loop over the strategy's contract, with central evaluation
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=2,
                            evaluate_fn=central_evaluation(sim.lm, sim.data.eval, cfg))
    # Assert
    assert sim.parts == [] and sim.data.train is None and sim.data.label_names == LABELS
    first, second = strategy.history
    assert first["selected"] == [0, 1, 2] and second["selected"] == [0, 1]  # the misfit is not selected again
    for line in (first, second):
        assert {c["client"]: c["num_examples"] for c in line["clients"]} == {0: 12, 1: 20}
    assert [(f["client"], f["node"]) for f in first["failed"]] == [(2, 9)] and second["failed"] == []
    assert first["failed"][0]["reason"] == f"error {DATA_ERROR}: data: {bad}: labels not in data.labels: ['maybe']"
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2] and result.evaluate_metrics_clientapp == {}
    assert all(set(m) == {"eval_loss", "accuracy"} for m in result.evaluate_metrics_serverapp.values())
    assert [m["clients"] for m in result.train_metrics_clientapp.values()] == [2, 2]
    final = result.arrays.to_torch_state_dict()
    assert final.keys() == initial.keys() and not all(torch.equal(final[k], initial[k]) for k in initial)


def test_warm_started_devices_build_the_source_model_and_one_without_the_source_is_recorded(
        tiny_bert_dir, tmp_path, task_identity):
    """model.init_from in a deployment: the server and every device rebuild the source run's adapter (a frozen A
    never travels, so a device must read it); a device that cannot read the source answers error 4000."""
    # Prepare: a 1-round source run; a warm-started device run with A frozen and two device files
    source_dir = tmp_path / "source"
    run_simulation(tiny_config(tiny_bert_dir, tmp_path, federated={"rounds": 1, "local_steps": 1,
                                                                    "learning_rate": 5e-3}), source_dir)
    cfg = tiny_config(tiny_bert_dir, tmp_path, model={"init_from": str(source_dir)}, lora={"freeze_a": True},
                      data={"train": "", "labels": LABELS, "eval_size": 16}, partition={"num_clients": 2},
                      federated={"clients_per_round": 2}, run_name="warm")
    a = _write_records(tmp_path / "a" / "local.jsonl", _mnli(12))
    b = _write_records(tmp_path / "b" / "local.jsonl", _mnli(12, {"neutral"}))
    nodes = {7: {"data": str(a), "client-id": 0}, 8: {"data": str(b), "client-id": 1}}
    sim = Simulation.setup(cfg, training_data=False)
    source = starting_state(source_dir)
    initial = trainable_state(sim.lm.model)
    # Execute: one round; then the source moves away and a fresh device process tries again
    strategy = FedHeadStrategy(nodes_config(cfg, sim), sim.lm.layout, node_wait=0.0)
    strategy.start(grid=LoopGrid(client_app, nodes), initial_arrays=ArrayRecord(initial), num_rounds=1)
    device = node_data(1, cfg.model_dump_json(), node_identity(nodes[7])).lm.model
    source_dir.rename(tmp_path / "moved")
    forget_runs()
    again = FedHeadStrategy(nodes_config(cfg, sim), sim.lm.layout, node_wait=0.0)
    again.start(grid=LoopGrid(client_app, nodes), initial_arrays=ArrayRecord(initial), num_rounds=1)
    # Assert: the server's start and the device's frozen A are the source's; without it, both devices fail
    assert initial.keys() < source.keys() and all(torch.equal(initial[k], source[k]) for k in initial)
    frozen_a = {n: p for n, p in device.named_parameters() if ".lora_A." in n}
    assert frozen_a and all(torch.equal(p, source[n]) for n, p in frozen_a.items())
    assert strategy.history[0]["failed"] == [] and len(strategy.history[0]["clients"]) == 2
    reasons = [f["reason"] for f in again.history[0]["failed"]]
    assert len(reasons) == 2 and all(r.startswith(f"error {NODE_CONFIG_ERROR}: ") and "model.init_from" in r
                                     and "no such run directory" in r for r in reasons)


def test_coverage_schedule_counts_travel_with_the_train_messages(tiny_bert_dir, tmp_path, task_identity):
    """heads.schedule = "coverage" on Flower: the strategy sends its per-head training counts with each train
    message and the ClientApp keeps, per block, a head least trained before the round (pool 1, k = 1 of 4)."""
    # Prepare
    cfg = tiny_config(tiny_bert_dir, tmp_path, data={"train": "", "labels": LABELS, "eval_size": 16},
                      partition={"num_clients": 2}, federated={"clients_per_round": 2, "local_steps": 1},
                      heads={"sparsity": 0.75, "schedule": "coverage", "coverage_pool": 1.0})
    a = _write_records(tmp_path / "a" / "local.jsonl", _mnli(12))
    b = _write_records(tmp_path / "b" / "local.jsonl", _mnli(12))
    sim = Simulation.setup(cfg, training_data=False)
    strategy = FedHeadStrategy(nodes_config(cfg, sim), sim.lm.layout, node_wait=0.0)
    grid = LoopGrid(client_app, {7: {"data": str(a), "client-id": 0}, 8: {"data": str(b), "client-id": 1}})
    # Execute
    strategy.start(grid=grid, initial_arrays=ArrayRecord(trainable_state(sim.lm.model)), num_rounds=3)
    # Assert
    counts = torch.zeros(2, 4, dtype=torch.int64)
    for line in strategy.history:
        assert len(line["clients"]) == 2
        for c in line["clients"]:
            assert all(counts[h // 4, h % 4] == counts[h // 4].min() for h in c["kept_heads"])
        for c in line["clients"]:
            counts.view(-1)[c["kept_heads"]] += 1
    assert torch.equal(counts, strategy.stats.head_count_matrix(2, 4))
    assert int(counts.max() - counts.min()) <= 2


def test_strategy_start_drops_the_in_process_engines_clients_evaluates_on_its_cadence_and_refuses_eval_pruned(
        tiny_bert_dir, tmp_path, task_identity):
    # Prepare: simulated dropouts (robust.dropout_probability), evaluation every 2 of 3 rounds; the same run on the
    # in-process engine; partition nodes over the server's own data
    cfg = tiny_config(tiny_bert_dir, tmp_path, partition={"num_clients": 3}, robust={"dropout_probability": 0.5},
                      federated={"clients_per_round": 3, "rounds": 3, "eval_every": 2, "local_steps": 1})
    local = run_simulation(cfg, tmp_path / "local")
    sim = Simulation.setup(cfg)
    strategy = FedHeadStrategy(nodes_config(cfg, sim), sim.lm.layout, node_wait=0.0, run_dir=tmp_path / "start",
                               known_sizes={c: len(p) for c, p in enumerate(sim.parts)})
    grid = LoopGrid(client_app, {10 + i: {"partition-id": i, "num-partitions": 3} for i in range(3)})
    # Execute
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(trainable_state(sim.lm.model)), num_rounds=3,
                            evaluate_fn=central_evaluation(sim.lm, sim.data.eval, cfg))
    # Assert: the same clients drop out in each round, the same evaluations, the run directory of a run
    a, b = _metrics(tmp_path / "local"), _metrics(tmp_path / "start")
    dropped = [sorted(f["client"] for f in m["failed"]) for m in a[1:]]
    assert any(dropped) and dropped == [sorted(f["client"] for f in m["failed"]) for m in b[1:]]
    assert all(f["reason"] == "dropped out (simulated failure)" for m in b[1:] for f in m["failed"])
    assert [m.get("selected") for m in a] == [m.get("selected") for m in b]
    assert sorted(result.evaluate_metrics_serverapp) == [0, 2, 3] and "accuracy" not in b[1]
    assert np.isclose(result.evaluate_metrics_serverapp[3]["eval_loss"], a[3]["eval_loss"], rtol=1e-4)
    assert local["rounds"] == 3 and (tmp_path / "start" / "summary.json").is_file()
    # a run directory that holds a run is continued with resume=True only; an option start cannot honour is
    # refused before any round
    with pytest.raises(ConfigError, match=r"holds another run: continue it with FedHeadStrategy\(.*resume=True\)"):
        FedHeadStrategy(cfg, sim.lm.layout, node_wait=0.0, run_dir=tmp_path / "start").start(
            grid=grid, initial_arrays=ArrayRecord(trainable_state(sim.lm.model)), num_rounds=3)
    pruned = tiny_config(tiny_bert_dir, tmp_path, heads={"sparsity": 0.5, "eval_pruned": 0.5})
    with pytest.raises(ConfigError, match="heads.eval_pruned needs the model on the server"):
        FedHeadStrategy(pruned, sim.lm.layout, node_wait=0.0).start(
            grid=grid, initial_arrays=ArrayRecord(trainable_state(sim.lm.model)), num_rounds=1)


class FreshProcessGrid(LoopGrid):
    """A LoopGrid whose every message finds a fresh ClientApp process, as on Flower's deployment engine (a
    flwr-clientapp process per message): nothing loaded is kept, only the node's context."""

    def __init__(self, app: ClientApp, node_configs: dict[int, dict]) -> None:
        super().__init__(app, node_configs)
        self.kinds: list[str] = []  # the message type of each message answered

    def answer(self, msg: Message) -> Message:
        forget_runs()
        self.kinds.append(msg.metadata.message_type)
        return super().answer(msg)


def test_a_node_loads_once_per_run_and_answers_as_a_fresh_process_would(tiny_bert_dir, tmp_path, task_identity,
                                                                        monkeypatch):
    """A node builds the run's model and loads its rows once per run, not once per message, and reads no
    evaluation set; every reply equals the one a fresh process gives (the kept model is reset from each
    message's payload, the error-feedback residual stays in context.state). Three partitions served by one
    process, train_sparse, an 8-bit upload and power-of-choice's evaluate messages, two rounds (4 trainings on
    3 nodes: one node at least carries its residual into a second round)."""
    # Prepare: nodes in partition form; the node side's model builds and record reads counted
    cfg = tiny_config(tiny_bert_dir, tmp_path, partition={"num_clients": 3},
                      heads={"sparsity": 0.5, "mode": "train_sparse"},
                      federated={"rounds": 2, "clients_per_round": 2, "local_steps": 1, "upload_bits": 8,
                                 "selection": "power_of_choice", "power_of_choice_d": 3,
                                 "power_of_choice_samples": 8})
    sim = Simulation.setup(cfg)
    nodes = {10 + c: {"partition-id": c, "num-partitions": 3} for c in range(3)}
    builds: list[int] = []
    reads: list[str] = []
    build, read = flower_node.build_run_model, loading.load_records
    monkeypatch.setattr(flower_node, "build_run_model", lambda *a: builds.append(1) or build(*a))
    monkeypatch.setattr(loading, "load_records", lambda source, split: reads.append(source) or read(source, split))

    def run(grid: LoopGrid) -> tuple[list[dict], dict[str, torch.Tensor]]:
        strategy = FedHeadStrategy(nodes_config(cfg, sim), sim.lm.layout, node_wait=0.0)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(trainable_state(sim.lm.model)),
                                num_rounds=2)
        return strategy.history, result.arrays.to_torch_state_dict()

    def replies(history: list[dict]) -> list[dict]:  # all but the timings
        def timeless(d: dict) -> dict:
            return {k: v for k, v in d.items() if "seconds" not in k}
        return [timeless(line) | {"clients": [timeless(c) for c in line["clients"]]} for line in history]

    # Execute: the run with the node's process kept; the same run with a fresh process per message; a new run
    forget_runs()
    kept_grid, fresh_grid = LoopGrid(client_app, nodes), FreshProcessGrid(client_app, nodes)
    kept_history, kept = run(kept_grid)
    kept_builds, kept_reads = len(builds), list(reads)
    fresh_history, fresh = run(fresh_grid)
    fresh_builds = len(builds) - kept_builds
    node = node_data(2, nodes_config(cfg, sim).model_dump_json(), NodeIdentity(0, 3))
    # Assert: one build and one read of data.train for the whole run, against one per message in fresh processes
    assert kept_builds == 1 and kept_reads == [cfg.data.train]
    assert fresh_builds == fresh_grid.kinds.count("train") + fresh_grid.kinds.count("evaluate") == 2 * (2 + 3)
    assert cfg.data.eval not in reads and node.data["input_ids"] == sim.client_data(0)["input_ids"]
    assert len(builds) == kept_builds + fresh_builds + 1  # a new run builds its own
    # the replies are the fresh processes' exactly
    assert all(line["clients"] and "kept_heads" in line["clients"][0] for line in kept_history)
    assert replies(kept_history) == replies(fresh_history)
    assert kept.keys() == fresh.keys() and all(torch.equal(kept[k], fresh[k]) for k in kept)
    assert set(kept_history[0]["selected"]) & set(kept_history[1]["selected"])  # a residual carried over
    trained = {10 + c["client"] for line in kept_history for c in line["clients"]}
    for grid in (kept_grid, fresh_grid):
        assert {n for n, c in grid.contexts.items() if RESIDUAL in c.state} == trained


class DyingNodeGrid(LoopGrid):
    """A LoopGrid whose node `dead` is gone from round `from_round` on: its messages are answered as Flower's
    SuperLink answers those of a node that stopped sending heartbeats (with Flower's own function)."""

    def __init__(self, app: ClientApp, node_configs: dict[int, dict], dead: int, from_round: int) -> None:
        super().__init__(app, node_configs)
        self.dead, self.from_round = dead, from_round

    def answer(self, msg: Message) -> Message:
        gone = msg.metadata.group_id.isdigit() and int(msg.metadata.group_id) >= self.from_round
        if msg.metadata.dst_node_id == self.dead and gone:
            return create_message_error_unavailable_res_message(msg.metadata, "node_unavail")
        return super().answer(msg)


def test_a_node_that_dies_mid_run_is_dropped_with_the_reason_flower_gives(tiny_bert_dir, tmp_path, task_identity,
                                                                          caplog):
    """Rules out attributing replies by their source: Flower's SuperLink answers for a dead node (source node 1),
    and the dead node was recorded as "timeout" while the SuperLink's reply was blamed on a "node 1"."""
    # Prepare: two devices; the second one's SuperNode dies after round 1
    cfg = tiny_config(tiny_bert_dir, tmp_path, data={"train": "", "labels": LABELS, "eval_size": 16},
                      partition={"num_clients": 2}, federated={"clients_per_round": 2, "local_steps": 1})
    a = _write_records(tmp_path / "a" / "local.jsonl", _mnli(12))
    b = _write_records(tmp_path / "b" / "local.jsonl", _mnli(12))
    sim = Simulation.setup(cfg, training_data=False)
    strategy = FedHeadStrategy(nodes_config(cfg, sim), sim.lm.layout, node_wait=0.0)
    grid = DyingNodeGrid(client_app, {7: {"data": str(a), "client-id": 0}, 8: {"data": str(b), "client-id": 1}},
                         dead=8, from_round=2)
    # Execute
    strategy.start(grid=grid, initial_arrays=ArrayRecord(trainable_state(sim.lm.model)), num_rounds=2)
    # Assert: round 2 records Flower's reason for the dead node, and no reply is left unattributed
    first, second = strategy.history
    assert first["failed"] == [] and len(first["clients"]) == 2
    assert second["failed"] == [{"client": 1, "node": 8, "reason": f"error 5: {NODE_UNAVAILABLE_ERROR_REASON}"}]
    assert [c["client"] for c in second["clients"]] == [0]
    assert "answer no train message" not in caplog.text


class FlowerLog(logging.Handler):
    """The lines Flower's logger prints, formatted as its console handler formats them (no traceback unless the
    record carries one)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(self.format(record).splitlines())


@pytest.fixture
def flower_log():
    handler = FlowerLog()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    fedhead_log = logging.getLogger("fedhead")
    saved = (fedhead_log.level, fedhead_log.propagate)
    yield handler
    logger.removeHandler(handler)
    for h in [h for h in fedhead_log.handlers if isinstance(h, ThroughFlower)]:
        fedhead_log.removeHandler(h)
    fedhead_log.level, fedhead_log.propagate = saved


def test_server_app_on_devices_refuses_a_second_run_in_one_line_and_resumes_saying_from_where(
        tiny_bert_dir, tmp_path, task_identity, flower_log):
    """fedhead's ServerApp (`flower_app.main`, as `flwr run` calls it) over two in-process device nodes: a run of
    2 rounds records the sizes the devices report in partition.json; the same `flwr run` again is refused in one
    line naming the run-config key resume=true (not fedhead run's --resume / --overwrite), without a traceback in
    what Flower logs; with resume=true and 3 rounds the run goes on, saying which checkpoint and round it
    continues from."""
    # Prepare: a server without training data; devices with 12 and 20 records
    cfg = tiny_config(tiny_bert_dir, tmp_path, data={"train": "", "labels": LABELS, "eval_size": 16},
                      partition={"num_clients": 2}, federated={"clients_per_round": 2, "local_steps": 1})
    a = _write_records(tmp_path / "a" / "local.jsonl", _mnli(12))
    b = _write_records(tmp_path / "b" / "local.jsonl", _mnli(20))
    nodes = {7: {"data": str(a), "client-id": 0}, 8: {"data": str(b), "client-id": 1}}
    (tmp_path / "server.json").write_text(cfg.model_dump_json())
    longer = cfg.model_copy(update={"federated": cfg.federated.model_copy(update={"rounds": 3})})
    (tmp_path / "server3.json").write_text(longer.model_dump_json())
    run_dir = tmp_path / "deployed"

    def flwr_run(config: str, **keys) -> None:
        run_config = {"config": str(tmp_path / config), "run-dir": str(run_dir), "node-wait": 0.0, **keys}
        main(LoopGrid(client_app, nodes), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                  run_config=run_config))

    # Execute, Assert: the first run; the device-reported sizes
    flwr_run("server.json")
    partition = json.loads((run_dir / "partition.json").read_text())
    assert partition["sizes"] == [] and partition["reported_sizes"] == {"0": 12, "1": 20}
    # the same command again: refused in one line; Flower logs it (its own call) without a traceback
    with pytest.raises(RunRefused) as refused:
        flwr_run("server.json")
    assert "resume=true" in str(refused.value) and "--resume" not in str(refused.value)
    assert "--overwrite" not in str(refused.value) and "\n" not in str(refused.value)
    flower_log.lines.clear()
    flwr_logger.log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=refused.value)
    assert flower_log.lines == [f"ERROR: ServerApp raised an exception: {refused.value}"]
    assert [m["round"] for m in _metrics(run_dir)] == [0, 1, 2]  # untouched
    # resume=true with 3 rounds: one more round, after a line saying from where
    flower_log.lines.clear()
    flwr_run("server3.json", resume=True)
    resumed = f"INFO: resuming {run_dir} from checkpoint.safetensors after round 2: rounds 3 to 3 to go"
    assert flower_log.lines.count(resumed) == 1, flower_log.lines
    assert [m["round"] for m in _metrics(run_dir)] == [0, 1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 3


def test_flower_log_lines_are_printed_once():
    """Rules out every log line of the ServerApp printed twice under `flwr run --stream` (Flower's format, then
    the root logger's handler that Opacus' import adds with logging.basicConfig)."""
    code = ("import logging\n"
            "from fedhead.runners import flower_app\n"
            "from fedhead.federated.privacy import epsilon_spent\n"
            "epsilon_spent(1.0, 0.5, 3, 1e-5)  # imports Opacus\n"
            "flower_app.show_fedhead_logs_through_flower()\n"
            "logging.getLogger('flwr').info('flower says this once')\n"
            "logging.getLogger('fedhead').info('fedhead says this once')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    printed = done.stdout + done.stderr
    assert printed.count("flower says this once") == 1 and printed.count("fedhead says this once") == 1, printed


def guide_connection_snippet(port: int = 9093) -> str:
    """docs/deployment.md's shell lines that add the SuperLink connection to $FLWR_HOME/config.toml (from
    `mkdir -p "$FLWR_HOME"` to the end of its here-document), for a SuperLink on 127.0.0.1:port."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    start = text.index('mkdir -p "$FLWR_HOME"')
    end = text.index("\nEOF2\n", start) + len("\nEOF2\n")
    return text[start:end].replace("127.0.0.1:9093", f"127.0.0.1:{port}")


def add_guide_connection(home: Path, port: int) -> None:
    subprocess.run(["bash", "-c", guide_connection_snippet(port)], env={**os.environ, "FLWR_HOME": str(home)},
                   check=True)


def test_the_guides_connection_snippet_adds_the_table_once(tmp_path):
    """Rules out the guide's `cat >> ~/.flwr/config.toml` that, run twice, repeated the table (every later `flwr`
    command then failed to read the file) and wrote to the real home."""
    import tomllib

    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    assert "$FLWR_HOME/config.toml" in guide_connection_snippet() and "~/.flwr" not in guide_connection_snippet()
    fresh, flowers = tmp_path / "fresh", tmp_path / "flowers"  # no config.toml yet; Flower's default one
    flowers.mkdir()
    (flowers / "config.toml").write_text(DEFAULT_FLOWER_CONFIG_TOML)
    for home in (fresh, flowers):
        for _ in range(2):
            add_guide_connection(home, 9093)
        config = tomllib.loads((home / "config.toml").read_text())
        assert config["superlink"]["loopback"] == {"address": "127.0.0.1:9093", "insecure": True}
    assert config["superlink"]["default"] == "local"  # Flower's own entries are kept


def test_selection_among_connected_partitions(tiny_bert_dir, tmp_path):
    cfg = tiny_config(tiny_bert_dir, tmp_path, federated={"selection": "loss_gap", "clients_per_round": 2})
    stats = ClientStats()
    for c, gap in [(1, 0.5), (2, 0.1), (4, 0.9), (5, 2.0)]:
        stats.record(c, 1, 1.0 + gap, 1.0, [0])
    # partitions 0 and 3 are not connected: only 1, 2, 4, 5 compete; 5 and 4 have the largest loss gaps
    s = select_among([1, 2, 4, 5], cfg.federated, 2, np.random.default_rng(0), stats, lambda cs: {})
    assert s.clients == [4, 5] and set(s.priorities) == {4, 5}
    # every partition connected: exactly the in-process engine's draw
    from fedhead.federated.selection import select_clients

    cfg.federated.selection = "random"
    s = select_among(list(range(6)), cfg.federated, 1, np.random.default_rng(3), stats, lambda cs: {})
    assert s.clients == select_clients("random", 6, 2, 1, np.random.default_rng(3), stats).clients
    # fewer partitions connected than clients_per_round: all of them
    s = select_among([2], cfg.federated, 1, np.random.default_rng(3), stats, lambda cs: {})
    assert s.clients == [2]


# --------------------------------------------------------------------- slow: simulation engine equals in-process


LEVERS = {"federated": {"selection": "random", "aggregation": "fedavg", "upload_bits": 3, "tier_local_steps": [2, 1],
                        "tier_batch_size": [4, 2], "upload_deflate": True, "micro_batch_size": [4, 1],
                        "activation_checkpointing": [False, True], "clients_per_round": 4, "rounds": 3},
          "lora": {"layers": [1]}, "heads": {"sparsity": 0.5, "mode": "train_sparse"},
          "partition": {"num_clients": 4}}


@pytest.mark.slow
@pytest.mark.parametrize("options", ["heads", "levers"])
def test_flower_simulation_engine_equals_in_process_engine(tiny_bert_dir, tmp_path, options):
    # heads: pruning, head-weighted aggregation, power-of-choice; levers: a 3-bit deflated upload whose error-feedback
    # residual each node keeps between rounds (every client in every round), per-tier steps and checkpointing,
    # LoRA in the top block
    sections = LEVERS if options == "levers" else {
        "heads": {"sparsity": 0.5}, "federated": {"selection": "power_of_choice", "power_of_choice_samples": 8,
                                                  "aggregation": "head_weighted"}}
    cfg = tiny_config(tiny_bert_dir, tmp_path, **sections)
    local = run_simulation(cfg, tmp_path / "local")
    seen = []
    flower = fe.run_flower(cfg, tmp_path / "flower", on_round=lambda m: seen.append(m["round"]))
    rounds = list(range(cfg.federated.rounds + 1))
    assert seen == rounds
    assert sorted(p.name for p in (tmp_path / "flower").iterdir()) == \
        sorted(p.name for p in (tmp_path / "local").iterdir())
    assert flower.keys() == local.keys()
    a, b = _metrics(tmp_path / "local"), _metrics(tmp_path / "flower")
    assert [m["round"] for m in b] == rounds
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        assert x.get("selected") == y.get("selected")
        assert x.get("bytes_down") == y.get("bytes_down")
        if cfg.federated.upload_deflate and "bytes_up" in x:  # deflated, a payload's length depends on its values'
            assert y["bytes_up"] == pytest.approx(x["bytes_up"], rel=0.01)  # last bits (threads, below)
        else:  # safetensors bytes: the length depends on the shapes and the metadata only
            assert x.get("bytes_up") == y.get("bytes_up")
        # Tolerance: both engines run the same float32 code on the same inputs and the payloads travel as bit-exact
        # copies, so the metrics come out equal here; the only thing that may differ is the number of torch
        # threads in Flower's Ray worker, which reorders float32 sums (relative error ~1e-7 per operation).
        # rtol 1e-4 is far above that and far below any real difference; accuracy may move by one example.
        assert np.allclose(x["eval_loss"], y["eval_loss"], rtol=1e-4, atol=1e-6)
        assert np.allclose(x["accuracy"], y["accuracy"], atol=1 / cfg.data.eval_size + 1e-9)
    assert all(m["failed"] == [] for m in b[1:])
    la = decode_state((tmp_path / "local" / "checkpoint.safetensors").read_bytes())
    lb = decode_state((tmp_path / "flower" / "checkpoint.safetensors").read_bytes())
    la = {k: v for k, v in la.items() if not k.startswith("client_residual/")}  # the nodes keep theirs
    assert all(torch.allclose(la[k], lb[k], rtol=1e-4, atol=1e-6) for k in la)


# ------------------------------------------------- slow: the README's own Flower app, through Strategy.start

USER_APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "my-fedhead-app"
version = "1.0.0"
dependencies = ["flwr>=1.42,<2"]

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "my_app:server_app"
clientapp = "my_app:client_app"

[tool.flwr.app.config]
config = ""
data-dir = ""
out = ""
"""


def readme_flower_app() -> str:
    """The Python block of the README's section "Your own Flower app"."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```python\n# my_app.py") + len("```python\n")
    return text[start:text.index("```", start)]


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (the SuperLink starts the simulation in a session of its own)."""
    import psutil

    root = psutil.Process(pid)
    for proc in [*root.children(recursive=True), root]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)


def _run_readme_app(tmp_path: Path, name: str, run_config: dict, kill_after_round: int | None = None) -> str:
    """`flwr run` of the README's app (tmp_path/app) on Flower's simulation engine with two simulated SuperNodes,
    in a SuperLink of its own; with `kill_after_round`, the SuperLink and everything it started are killed
    (SIGKILL) as soon as that round's checkpoint is in the run directory. Returns the run's log."""
    home, port = tmp_path / f"flower-home-{name}", fe.free_port()
    fe.write_connection(home, "sim", port)
    env = fe.flower_env(home)
    link = fe.start([fe.executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                     "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
                    env, home / "superlink.log")
    try:
        fe.wait_for_port(port, 60, link, home / "superlink.log")
        path = fe.write_run_config(tmp_path / f"run_config-{name}.toml", run_config)
        cpus = fe.simulation_cpus()
        run = fe.start([fe.executable("flwr"), "run", str(tmp_path / "app"), "sim", "--run-config", str(path),
                        "--federation-config", f"num-supernodes=2 client-resources-num-cpus={cpus} "
                        f"client-resources-num-gpus=0.0 init-args-num-cpus={cpus}", "--stream"],
                       env, home / "flwr-run.log")
        try:
            if kill_after_round is None:
                run.wait(timeout=420)
            else:
                run_dir, deadline = RunDir(run_config["out"]), time.monotonic() + 420
                while time.monotonic() < deadline and run.poll() is None:
                    found = run_dir.newest_checkpoint() if run_dir.checkpoint_file.exists() else None
                    if found is not None and found[1].round >= kill_after_round:
                        break
                    time.sleep(0.05)
                _kill_tree(link.pid)  # the SuperLink and the simulation it runs (its own session), mid-round
                assert found is not None and found[1].round == kill_after_round, "killed too late"
        finally:
            fe.stop(run)
    finally:
        fe.stop(link)
    return (home / "flwr-run.log").read_text(errors="replace")


@pytest.mark.slow
def test_readme_flower_app_killed_after_round_2_resumes_to_the_uninterrupted_runs_state(tiny_bert_dir, tmp_path):
    # Prepare: the README's app file and a pyproject naming its apps; a config without data.train, 3 rounds,
    # evaluation every 2 rounds and a tail average over the last 2; one file per partition, of different sizes
    app = tmp_path / "app"
    app.mkdir()
    (app / "my_app.py").write_text(readme_flower_app())
    (app / "pyproject.toml").write_text(USER_APP_PYPROJECT)
    data_dir = tmp_path / "data"
    for i, count in enumerate((20, 30)):
        _write_records(data_dir / f"{i}.jsonl", _mnli(count))
    config = write_tiny_toml(tmp_path / "user.toml", tiny_bert_dir, data={"train": "", "labels": LABELS},
                             partition={"num_clients": 2}, heads={"sparsity": 0.5},
                             federated={"clients_per_round": 2, "selection": "loss_gap", "rounds": 3,
                                        "aggregation": "head_weighted", "eval_every": 2, "tail_average_rounds": 2,
                                        "local_steps": 4})
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    # Execute: the app killed after round 2's checkpoint, the same `flwr run` again, and an uninterrupted run
    _run_readme_app(tmp_path, "killed", {"config": str(config), "data-dir": str(data_dir), "out": str(killed)},
                    kill_after_round=2)
    resumed_log = _run_readme_app(tmp_path, "resumed", {"config": str(config), "data-dir": str(data_dir),
                                                       "out": str(killed)})
    log = _run_readme_app(tmp_path, "whole", {"config": str(config), "data-dir": str(data_dir), "out": str(whole)})
    # Assert: Strategy.start ran fedhead's strategy with central evaluation at rounds 0, 2 and 3 and the tail
    # average, and the app saved a trained adapter
    assert "Starting FedHeadStrategy strategy" in log and "fedhead: selection loss_gap" in log, log[-6000:]
    assert "[ROUND 3/3]" in log and "dropped" not in log  # both nodes trained in every round
    assert "resuming" in resumed_log and "after round 2: rounds 3 to 3 to go" in resumed_log, resumed_log[-6000:]
    a, b = _metrics(killed), _metrics(whole)
    assert [m["round"] for m in a] == [m["round"] for m in b] == [0, 1, 2, 3]
    assert [sorted(k for k in m if k in ("accuracy", "eval_loss")) for m in b] == [["accuracy", "eval_loss"], [],
                                                                                ["accuracy", "eval_loss"],
                                                                                ["accuracy", "eval_loss"]]
    for x, y in zip(a, b, strict=True):
        assert x.get("selected") == y.get("selected") and x.get("bytes_up") == y.get("bytes_up")
        assert np.allclose(x.get("eval_loss", 0.0), y.get("eval_loss", 0.0), rtol=1e-4, atol=1e-6)
    assert "tail_average_accuracy" in b[-1] and "tail_average_accuracy" in a[-1]
    assert np.isclose(a[-1]["tail_average_eval_loss"], b[-1]["tail_average_eval_loss"], rtol=1e-4, atol=1e-6)
    ka, kb = (decode_state((d / "checkpoint.safetensors").read_bytes()) for d in (killed, whole))
    assert ka.keys() == kb.keys() and all(torch.allclose(ka[k], kb[k], rtol=1e-4, atol=1e-6) for k in ka)
    trained = decode_state((whole / "adapter" / "adapter_model.safetensors").read_bytes())
    assert any("lora_B" in k and bool(v.abs().sum() > 0) for k, v in trained.items())  # B starts at zero
    assert (killed / "adapter" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------ slow: a loopback deployment


class Deployment:
    """flower-superlink and SuperNodes on 127.0.0.1 free ports, in a private Flower home."""

    def __init__(self, home: Path) -> None:
        self.home, self.procs, self.nodes = home, [], []
        self.port = fe.free_port()
        self.env = fe.flower_env(home)
        add_guide_connection(home, self.port)  # the guide's lines
        self.app = fe.write_app(home / "app")

    def start_superlink(self) -> None:
        link = fe.start([fe.executable("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                         "--host", "127.0.0.1", "--port", str(self.port)], self.env, self.home / "superlink.log")
        self.procs.append(link)
        fe.wait_for_port(self.port, 60, link, self.home / "superlink.log")

    def start_supernode(self, node_config: str) -> subprocess.Popen:
        node = fe.start([fe.executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                         "--host", "127.0.0.1", "--port", str(fe.free_port()), "--node-config", node_config],
                        self.env, self.home / f"supernode{len(self.nodes)}.log")
        self.procs.append(node)
        self.nodes.append(node)
        return node

    def flwr_run(self, run_config: dict, name: str = "flwr-run") -> subprocess.Popen:
        """`flwr run APP loopback --run-config FILE --stream`, its output in NAME.log."""
        path = fe.write_run_config(self.home / f"{name}.toml", run_config)
        proc = fe.start([fe.executable("flwr"), "run", str(self.app), "loopback", "--run-config", str(path),
                         "--stream"], self.env, self.home / f"{name}.log")
        self.procs.append(proc)
        return proc

    def flwr_ls(self) -> list[dict]:
        """`flwr ls loopback --format json`: the runs of the SuperLink."""
        done = subprocess.run([fe.executable("flwr"), "ls", "loopback", "--format", "json"], env=self.env,
                              capture_output=True, text=True, timeout=120, check=True)
        return json.loads(done.stdout)["runs"]

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            fe.stop(proc)

    def logs(self) -> str:
        return "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in self.home.glob("*.log"))


@contextmanager
def deployment(node_configs: list[str]):
    """A SuperLink and one SuperNode per node config (`--node-config`), all stopped at the end."""
    home = Path(tempfile.mkdtemp(prefix="fedhead-deploy-"))
    d = Deployment(home)
    try:
        d.start_superlink()
        for node_config in node_configs:
            d.start_supernode(node_config)
        yield d
    finally:
        d.stop_all()
    for proc in d.procs:
        assert proc.poll() is not None, proc.args
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # nothing of its session is left


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
def test_deployment_on_loopback_devices_train_on_their_own_files_and_a_killed_one_is_dropped(tiny_bert_dir,
                                                                                              tmp_path):
    """Two SuperNodes on 127.0.0.1, each with its own file in a temporary directory of its own; the server's
    config names no training file; the commands of docs/deployment.md. Round 1: each client trains on exactly its
    own records. Round 2: device 1 is killed (SIGKILL of its SuperNode's process group) while it trains; the round
    completes with device 0 and the dead one is listed under `failed` with the reason Flower gives (node
    unavailable), nothing of round 1 is rewritten and the run finishes. The same `flwr run` again is refused in
    one line (no traceback) and `flwr ls` shows it failed; with device 1 back, `resume=true` and a config of 3
    rounds the run goes on from its checkpoint, saying so."""
    # Prepare: files of different sizes and label mixes; the server never learns where the devices' data is
    rows = [_mnli(30, {"entailment", "neutral"}), _mnli(50, {"contradiction", "neutral"})]
    files = [_write_records(Path(tempfile.mkdtemp(prefix=f"fedhead-device{i}-")) / "local.jsonl", r)
             for i, r in enumerate(rows)]
    node_configs = [f'data="{f}" client-id={i}' for i, f in enumerate(files)]
    cfg = tiny_config(tiny_bert_dir, tmp_path, data={"train": "", "labels": LABELS}, partition={"num_clients": 2},
                      heads={"sparsity": 0.5}, federated={"clients_per_round": 2, "selection": "loss_gap"})
    config_path, longer_path = tmp_path / "server.json", tmp_path / "server3.json"
    config_path.write_text(cfg.model_dump_json())
    longer_path.write_text(cfg.model_copy(update={"federated": cfg.federated.model_copy(update={"rounds": 3})})
                           .model_dump_json())
    run_dir = tmp_path / "deployed"
    # round-timeout above Flower's node liveness (a dead SuperNode is noticed 37-60 s after it died), so that the
    # dead node's reason is Flower's
    run_config = {"config": str(config_path), "run-dir": str(run_dir), "round-timeout": 150.0, "node-wait": 120.0}
    # Execute: the commands of docs/deployment.md, a kill in round 2, the same command again, a resume
    try:
        with deployment(node_configs) as d:
            run = d.flwr_run(run_config)
            deadline = time.monotonic() + 300
            while len(_metrics(run_dir)) < 2 and time.monotonic() < deadline and run.poll() is None:
                time.sleep(0.2)
            before = _metrics(run_dir)
            assert [m["round"] for m in before] == [0, 1], d.logs()
            victim = d.nodes[1]
            until = time.monotonic() + 20  # kill it while its ClientApp process trains round 2, if seen in time
            while not _children(victim.pid) and time.monotonic() < until:
                time.sleep(0.1)
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(timeout=10)
            run.wait(timeout=300)
            assert run.returncode == 0, d.logs()
            assert (run_dir / "summary.json").exists(), d.logs()
            finished = _metrics(run_dir)
            again = d.flwr_run(run_config, "flwr-run-again")
            again.wait(timeout=300)
            runs = d.flwr_ls()
            d.start_supernode(node_configs[1])  # device 1 is back
            resumed = d.flwr_run({**run_config, "config": str(longer_path), "resume": True}, "flwr-run-resume")
            resumed.wait(timeout=400)
            logs = {name: (d.home / f"{name}.log").read_text(errors="replace")
                    for name in ("flwr-run", "flwr-run-again", "flwr-run-resume")}
            assert (run_dir / "summary.json").exists(), d.logs()
    finally:
        for f in files:
            f.unlink()
            f.parent.rmdir()
    # Assert: round 1 trained each client on exactly its own file's records
    assert [m["round"] for m in finished] == [0, 1, 2]
    assert finished[:2] == before  # nothing of the earlier rounds is lost or rewritten
    first = finished[1]
    assert first["selected"] == [0, 1] and first["failed"] == [] and first["rejected"] == [] and "accuracy" in first
    assert {c["client"]: c["num_examples"] for c in first["clients"]} == {0: 30, 1: 50}
    assert all(len(c["kept_heads"]) == 4 and c["bytes_up"] > 0 for c in first["clients"])  # half of 2 x 4 heads
    assert first["bytes_down"] == 2 * first["clients"][0]["bytes_down"]
    # round 2: the killed device is dropped with Flower's reason, the other one's update is aggregated
    second = finished[2]
    assert second["selected"] == [0, 1]
    assert [(f["client"], f["reason"]) for f in second["failed"]] == [
        (1, f"error 5: {NODE_UNAVAILABLE_ERROR_REASON}")], second["failed"]
    assert {c["client"]: c["num_examples"] for c in second["clients"]} == {0: 30} and "skipped" not in second
    assert math.isfinite(second["eval_loss"]) and "answer no train message" not in logs["flwr-run"]
    # every fedhead line once in the stream
    assert logs["flwr-run"].count("fedhead round 2:") == 1, logs["flwr-run"][-3000:]
    # the same command again: one line naming resume=true, no traceback; Flower records the run as failed
    refusals = [line for line in logs["flwr-run-again"].splitlines() if "holds another run" in line]
    assert len(refusals) == 1 and "resume=true" in refusals[0], logs["flwr-run-again"][-3000:]
    assert "Traceback" not in logs["flwr-run-again"] and "--overwrite" not in logs["flwr-run-again"]
    assert [r["status"] for r in sorted(runs, key=lambda r: r["pending-at"])] == [
        "finished:completed", "finished:failed"], runs
    # resumed with 3 rounds: the line saying from where, round 3 with both devices
    assert f"resuming {run_dir} from checkpoint.safetensors after round 2: rounds 3 to 3 to go" in logs[
        "flwr-run-resume"], logs["flwr-run-resume"][-3000:]
    metrics = _metrics(run_dir)
    assert [m["round"] for m in metrics] == [0, 1, 2, 3] and metrics[:3] == finished
    assert {c["client"]: c["num_examples"] for c in metrics[3]["clients"]} == {0: 30, 1: 50}
    partition = json.loads((run_dir / "partition.json").read_text())
    assert partition["label_names"] == LABELS and partition["sizes"] == []  # the server holds no training data
    assert partition["reported_sizes"] == {"0": 30, "1": 50}  # what the devices said
    assert not any(str(f.parent) in (run_dir / name).read_text() for f in files
                   for name in ("config.json", "metrics.jsonl"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["bytes_up"] == sum(m["bytes_up"] for m in metrics[1:])
