"""fedhead's ClientApp: each node runs `client_update` on its partition and answers with the serialised update
(the message contract is in `fedhead.runners.flower_app`'s docstring). Also the message plumbing both sides use:
fedhead's safetensors bytes carried unchanged as one `Array` of an `ArrayRecord`, pushing messages and pulling
their replies, and why a reply does not count.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedhead.config import Config
from fedhead.federated.client import client_update, evaluate
from fedhead.federated.payload import decode_state, encode_update
from fedhead.federated.state import State, load_state_
from fedhead.runners.local import Simulation

PAYLOAD = "payload"
STYPE = "safetensors"  # the Array holds fedhead's safetensors bytes as they are
PULL_INTERVAL = 0.5  # seconds between two pulls of replies

client_app = ClientApp()


def payload_record(blob: bytes) -> ArrayRecord:
    """An ArrayRecord carrying `blob` unchanged (one uint8 Array)."""
    return ArrayRecord({PAYLOAD: Array(dtype="uint8", shape=(len(blob),), stype=STYPE, data=blob)})


def payload_of(record: ArrayRecord) -> bytes:
    """The bytes `payload_record` put into the record."""
    return bytes(record[PAYLOAD].data)


_LOADED: dict[str, Simulation] = {}  # config JSON -> model, tokenizer, data, partitions: built once per process


def _loaded(config_json: str) -> Simulation:
    if config_json not in _LOADED:
        _LOADED.clear()
        _LOADED[config_json] = Simulation.setup(Config.model_validate_json(config_json))
    return _LOADED[config_json]


def node_partition(node_config: dict[str, Any], num_clients: int | None = None) -> tuple[int, int]:
    """(partition id, number of partitions) from a node's config; ValueError when missing or inconsistent."""
    if "partition-id" not in node_config:
        raise ValueError("this node has no partition-id: start the SuperNode with "
                         "--node-config 'partition-id=I num-partitions=N'")
    pid = int(node_config["partition-id"])
    n = int(node_config.get("num-partitions", num_clients or pid + 1))
    if num_clients is not None and n != num_clients:
        raise ValueError(f"node has num-partitions={n} but the run has partition.num_clients={num_clients}")
    if not 0 <= pid < n:
        raise ValueError(f"partition-id {pid} is not in [0, {n})")
    return pid, n


def _job(msg: Message, context: Context) -> tuple[Simulation, int, int, State]:
    """The loaded run, this node's partition, the round and the received global state of a train/evaluate."""
    conf = msg.content["fedhead"]
    sim = _loaded(str(conf["config"]))
    pid, _ = node_partition(dict(context.node_config), sim.cfg.partition.num_clients)
    if int(conf["partition-id"]) != pid:
        raise ValueError(f"message for partition {conf['partition-id']} reached the node of partition {pid}")
    return sim, pid, int(conf["round"]), decode_state(payload_of(msg.content["state"]))


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds."""
    pid, n = node_partition(dict(context.node_config))
    return Message(RecordDict({"node": ConfigRecord({"partition-id": pid, "num-partitions": n})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """fedhead's client update on this node's partition; answers with the serialised update."""
    sim, pid, round_, state = _job(msg, context)
    update = client_update(sim.lm, state, sim.client_data(pid), sim.cfg, pid, round_)
    content = RecordDict({"update": payload_record(encode_update(update)), "timings": MetricRecord(update.timings)})
    return Message(content, reply_to=msg)


@client_app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Loss of the received global model on this node's scoring sample (power_of_choice candidates)."""
    sim, pid, _, state = _job(msg, context)
    load_state_(sim.lm.model, state)
    data = sim.client_data(pid)
    sample = data.select(range(min(sim.cfg.heads.samples, len(data))))
    loss = evaluate(sim.lm.model, sample, sim.lm.tokenizer, sim.cfg.federated.eval_batch_size)["eval_loss"]
    return Message(RecordDict({"loss": MetricRecord({"eval_loss": loss})}), reply_to=msg)


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> dict[int, Message]:
    """Push `messages`, pull replies until all are in or `timeout` seconds passed: {destination node: reply}."""
    if not messages:
        return {}
    ids = {mid: m.metadata.dst_node_id for mid, m in zip(grid.push_messages(messages), messages, strict=True)}
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    while ids and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(ids)):
            node = ids.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                replies[node] = reply
        if ids:
            time.sleep(PULL_INTERVAL)
    return replies


def _failure(reply: Message | None) -> str | None:
    """Why a reply does not count (None when it carries content)."""
    if reply is None:
        return "timeout"
    if reply.has_error():
        lines = (reply.error.reason or "").strip().splitlines()
        return f"error {reply.error.code}: {lines[-1][:300] if lines else 'no reason given'}"
    return None
