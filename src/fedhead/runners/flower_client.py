"""fedhead's ClientApp, the client-side helpers a Flower user calls in their own ClientApp, and the message
plumbing both sides use (the message contract is in `fedhead.runners.flower_app`'s docstring).

A node serves one client, chosen by its node config (`flower_node`: device-local `data=...`, or
`partition-id=I num-partitions=N`).

A ClientApp process loads the run's model and its node's training rows once per run and keeps them for the next
messages (`flower_node.node_data`); no evaluation set is read on a node.

fedhead's safetensors bytes (an update deflated with federated.upload_deflate) travel unchanged as one `Array` of
an `ArrayRecord`.
"""

from __future__ import annotations

import time
from typing import Any

import datasets
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedhead.config import Config
from fedhead.data.loading import DataError
from fedhead.federated.client import ClientOptions
from fedhead.federated.client_round import client_round
from fedhead.federated.evaluation import evaluate
from fedhead.federated.payload import decode_state, encode_state
from fedhead.federated.state import load_state_
from fedhead.models import LoadedModel
from fedhead.runners.flower_node import node_data, node_identity
from fedhead.runners.flower_nodes import DATA_ERROR, NODE_CONFIG_ERROR

PAYLOAD = "payload"
STYPE = "safetensors"  # the Array holds fedhead's payload bytes as they are (safetensors, or a deflated update)
PULL_INTERVAL = 0.5  # seconds between two pulls of replies

client_app = ClientApp()


def payload_record(blob: bytes) -> ArrayRecord:
    """An ArrayRecord carrying `blob` unchanged (one uint8 Array)."""
    return ArrayRecord({PAYLOAD: Array(dtype="uint8", shape=(len(blob),), stype=STYPE, data=blob)})


def payload_of(record: object) -> bytes:
    """The bytes `payload_record` put into the record; ValueError for any other record (other or more arrays,
    an array of numbers rather than fedhead's bytes as they are), whose extra bytes would travel uncounted."""
    if not isinstance(record, ArrayRecord) or list(record.keys()) != [PAYLOAD]:
        raise ValueError(f"expected an ArrayRecord holding one array {PAYLOAD!r}")
    array = record[PAYLOAD]
    if (array.stype, array.dtype, list(array.shape)) != (STYPE, "uint8", [len(array.data)]):
        raise ValueError(f"array {PAYLOAD!r} is not {STYPE} bytes (stype {array.stype!r}, dtype {array.dtype!r}, "
                         f"shape {list(array.shape)[:4]})")
    return bytes(array.data)


# ------------------------------------------------------------------------ helpers for any ClientApp


RESIDUAL = "fedhead-residual"  # the node's error-feedback residual (federated.upload_bits), in its context.state


def train_reply(msg: Message, lm: LoadedModel, data: datasets.Dataset, cfg: Config | None = None,
                node_state: RecordDict | None = None) -> Message:
    """fedhead's client round for a train message of `FedHeadStrategy`, on `data` (tokenised training rows, e.g.
    from `fedhead.data.tasks.load_device_data`): score the heads of the received global model, prune, train the
    kept heads' LoRA slices, and answer with the serialised update.

    Args:
        msg: the train message (its "arrays" hold the global state, its "config" the round and client id).
        lm: the LoRA model of the run (`fedhead.trained.build_run_model`), as the server built it.
        data: this client's training rows.
        cfg: the run's options; None: the config the message carries (the server's).
        node_state: where the node keeps its state between rounds (Flower's `context.state`): with
            federated.upload_bits < 32 its error-feedback residual is read from and written back there (None: no
            residual is kept, each round starts without one).
    Returns:
        The reply: "update" (ArrayRecord, the update's payload) and "metrics" (num-examples and timings).
    """
    conf = msg.content["config"]
    cfg = cfg or Config.model_validate_json(str(conf["fedhead-config"]))
    counts = None
    if "head-counts" in conf:  # heads.schedule = "coverage": how often the server has seen each head trained
        counts = torch.tensor(config_ints(conf, "head-counts"), dtype=torch.int64).view(
            lm.head_map.num_blocks, lm.head_map.num_heads)
    residual = None
    if node_state is not None and RESIDUAL in node_state:
        residual = decode_state(payload_of(node_state[RESIDUAL]))
    answer = client_round(lm, payload_of(msg.content["arrays"]), data, ClientOptions.from_config(cfg),
                          config_int(conf, "client-id"), config_int(conf, "server-round"), counts, residual)
    if node_state is not None and answer.residual is not None:
        node_state[RESIDUAL] = payload_record(encode_state(answer.residual))
    metrics = MetricRecord({**answer.timings, "num-examples": answer.num_examples})
    return Message(RecordDict({"update": payload_record(answer.payload), "metrics": metrics}), reply_to=msg)


def config_int(conf: object, key: str) -> int:
    """`conf[key]` (`conf` a ConfigRecord) as an int; ValueError naming the key for a value that is not a number."""
    value = _config(conf)[key]
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"config {key!r}: expected an integer, got {type(value).__name__}")
    return int(value)


def config_ints(conf: object, key: str) -> list[int]:
    """`conf[key]` (`conf` a ConfigRecord) as a list of ints; ValueError naming the key for anything else."""
    value = _config(conf)[key]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"config {key!r}: expected a list of integers")
    return [int(v) for v in value]


def _config(conf: object) -> ConfigRecord:
    if not isinstance(conf, ConfigRecord):
        raise ValueError(f"expected the message's config as a ConfigRecord, got {type(conf).__name__}")
    return conf


def evaluate_reply(msg: Message, lm: LoadedModel, data: datasets.Dataset, cfg: Config | None = None) -> Message:
    """The loss of the received global model on the first `federated.power_of_choice_samples` rows of `data`
    (what power-of-choice selection ranks candidates by), answered as MetricRecord "metrics": eval_loss,
    num-examples."""
    cfg = cfg or Config.model_validate_json(str(msg.content["config"]["fedhead-config"]))
    load_state_(lm.model, decode_state(payload_of(msg.content["arrays"])))
    sample = data.select(range(min(cfg.federated.power_of_choice_samples, len(data))))
    loss = evaluate(lm.model, sample, lm.tokenizer, cfg.federated.eval_batch_size, task=lm.task)["eval_loss"]
    return Message(RecordDict({"metrics": MetricRecord({"eval_loss": loss, "num-examples": len(sample)})}),
                   reply_to=msg)


def query_reply(msg: Message, context: Context) -> Message:
    """Answer the server's query with this node's client id and, in partition form, the number of partitions
    (`flower_nodes.NodeTable` turns it into the node's client id); an error when the node config is unusable."""
    try:
        identity = node_identity(dict(context.node_config))
    except ValueError as err:
        return Message(Error(NODE_CONFIG_ERROR, str(err)), reply_to=msg)
    record = ConfigRecord()
    if identity.client_id is not None:
        record["client-id"] = identity.client_id
    if identity.num_clients is not None:
        record["num-clients"] = identity.num_clients
    return Message(RecordDict({"node": record}), reply_to=msg)


# ------------------------------------------------------------------------------- fedhead's ClientApp


def _serve(msg: Message, context: Context, reply: Any) -> Message:
    """`reply(msg, lm, data, cfg)` on this node's data, or an error reply naming what does not fit."""
    try:
        identity = node_identity(dict(context.node_config))
        conf = msg.content["config"]
        if identity.client_id is not None and config_int(conf, "client-id") != identity.client_id:
            raise ValueError(f"message for client {config_int(conf, 'client-id')} reached the node of client "
                             f"{identity.client_id}")
        node = node_data(context.run_id, str(conf["fedhead-config"]), identity)
    except DataError as err:
        return Message(Error(DATA_ERROR, f"data: {err}"), reply_to=msg)
    except ValueError as err:
        return Message(Error(NODE_CONFIG_ERROR, str(err)), reply_to=msg)
    return reply(msg, node.lm, node.data, node.cfg)


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this node serves."""
    return query_reply(msg, context)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """fedhead's client update on this node's data; answers with the serialised update."""
    return _serve(msg, context, lambda m, lm, data, cfg: train_reply(m, lm, data, cfg, context.state))


@client_app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Loss of the received global model on this node's scoring sample (power_of_choice candidates)."""
    return _serve(msg, context, evaluate_reply)


# ------------------------------------------------------------------------------------ message plumbing


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


def failure(reply: Message | None) -> str | None:
    """Why a reply does not count (None when it carries content)."""
    if reply is None:
        return "timeout"
    if reply.has_error():
        lines = (reply.error.reason or "").strip().splitlines()
        return f"error {reply.error.code}: {lines[-1][:300] if lines else 'no reason given'}"
    return None
