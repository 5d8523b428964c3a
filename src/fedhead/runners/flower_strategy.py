"""fedhead's server as a Flower `Strategy`: client selection among the connected nodes, screening, head-weighted
aggregation, server optimisers and DP by `fedhead.federated.server` (`plan_round` in configure_train,
`close_round` in aggregate_train), over Flower messages.

Use it as flwr's `FedAvg` is used, from `strategy.start(grid=..., initial_arrays=..., num_rounds=...,
evaluate_fn=...)` in a ServerApp, with `fedhead.runners.flower_client.train_reply` in the ClientApp (README,
"Your own Flower app"); fedhead's run loop (`fedhead run --engine flower`, deployments) drives the same
`configure_train` / `aggregate_train` with checkpoints and a run directory (`flower_app.run_round`).

Arrays in and out are the global trainable state as an `ArrayRecord` of named tensors (LoRA adapters and the task
head: `ArrayRecord(trainable_state(model))`, `result.arrays.to_torch_state_dict()`). What travels to and from the
nodes is fedhead's own safetensors payload (`flower_client.payload_record`), so the bytes recorded are those of
the real messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedhead.config import Config
from fedhead.federated.evaluation import evaluate
from fedhead.federated.payload import encode_state
from fedhead.federated.selection import ClientStats
from fedhead.federated.server import Reply, RoundPlan, close_round, plan_round
from fedhead.federated.state import State, load_state_
from fedhead.federated.validation import MAX_LOSS, receive_update
from fedhead.loop import server_options
from fedhead.models import HeadLayout, LoadedModel
from fedhead.runners.flower_client import failure, payload_of, payload_record, send_and_receive
from fedhead.runners.flower_nodes import DATA_ERROR, NODE_CONFIG_ERROR, NodeTable

log = logging.getLogger("flwr")


@dataclass
class _Round:
    """What configure_train sent, for aggregate_train."""

    state: State
    plan: RoundPlan
    sent: dict[int, int]  # node id -> client id
    messages: dict[int, Message]  # node id -> its train message (the grid sets its message_id when it pushes it)
    down: int  # bytes of the state payload each node was sent


class FedHeadStrategy(Strategy):
    """fedhead's server round behind Flower's strategy contract.

    Args:
        cfg: the run's options (`federated`, `robust`, `privacy`, `seed`; `partition.num_clients` = N, the client
            ids selected among); sent to the nodes, so that fedhead's ClientApp can build the run's model.
        layout: the head layout of the model the clients train (`LoadedModel.layout`).
        known_sizes: client id -> data size, for nodes that serve a partition of a data.train the server also
            has (an update claiming another size is rejected); default none known.
        round_timeout: seconds a round waits for replies (also the messages' time to live), default 3600.
        node_wait: seconds configure_train waits for clients_per_round (first round) or min_clients usable
            nodes, default 600.

    Server-side state: `stats` (client statistics), `rng` (selection), `moments` (server optimiser), `nodes`
    (node id -> client id, `flower_nodes.NodeTable`) and `history` (fedhead's full metrics line of each round).
    """

    def __init__(self, cfg: Config, layout: HeadLayout, *, known_sizes: dict[int, int] | None = None,
                 round_timeout: float = 3600.0, node_wait: float = 600.0) -> None:
        self.cfg, self.layout = cfg, layout
        self.options = server_options(cfg)
        self.known_sizes = dict(known_sizes or {})
        self.round_timeout, self.node_wait = round_timeout, node_wait
        self.config_json = cfg.model_dump_json()
        self.nodes = NodeTable(cfg.partition.num_clients)
        self.stats, self.rng = ClientStats(), np.random.default_rng(cfg.seed)
        self.moments: State = {}
        self.history: list[dict[str, Any]] = []
        self._waited = False
        self._round: _Round | None = None

    def summary(self) -> None:
        """Log the strategy's settings."""
        fed = self.cfg.federated
        log.info("\t├── fedhead: selection %s, aggregation %s, %d of %d clients a round (min %d), sparsity %s",
                 fed.selection, fed.aggregation, fed.clients_per_round, self.cfg.partition.num_clients,
                 fed.min_clients, self.cfg.heads.tiers or self.cfg.heads.sparsity)

    # --- Strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Open the round (`federated.server.plan_round`): select among the connected nodes (new nodes are asked
        which client they serve), and send each the global state (and the coverage head counts).

        Args:
            server_round: the round, from 1.
            arrays: the global trainable state (named tensors).
            config: entries added to every train message's "config" (with fedhead-config, server-round,
                client-id).
            grid: the Grid of the ServerApp.
        Returns:
            One train message per selected node: "arrays" (fedhead's payload of the state), "config".
        """
        t0 = time.perf_counter()
        state = arrays.to_torch_state_dict()
        down = encode_state(state)
        clients = self._wait_for_nodes(grid)
        plan = plan_round(clients, self.cfg.federated, self.cfg.heads, self.cfg.seed, server_round, self.rng,
                          self.stats, self.layout, self._global_losses(grid, down, server_round, clients, config),
                          started=t0)
        sent = {clients[c]: c for c in plan.selection.clients}
        messages = {n: self._message(down, n, c, server_round, "train", config, plan.head_counts)
                    for n, c in sent.items()}
        self._round = _Round(state, plan, sent, messages, len(down))
        return list(messages.values())

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the updates, record the nodes that failed (no reply, several replies, an error, a reply to
        another round's or another kind of message, a bad payload), and close the round
        (`federated.server.close_round`: screen, record client statistics, aggregate, server optimiser or DP).

        A reply belongs to the train message it answers (`reply_to_message_id`: the ids the grid gave the messages
        `configure_train` returned when it pushed them), not to its source: when a node is unreachable Flower's
        SuperLink answers in its place (source node 1, error 5 "Node Unavailable"), and that reason is the one
        recorded for the node. Replies to no train message of this round, or from a node other than the
        message's destination or the SuperLink, are logged and ignored.

        Returns:
            The next global state (named tensors; the current one kept below `federated.min_clients` good
            updates) and the round's totals (bytes_down, bytes_up, train_flops, scoring_flops, clients,
            train_loss). fedhead's full metrics line (per client, rejected, failed) is appended to `history`.
        """
        assert self._round is not None, "configure_train first"
        r, self._round = self._round, None
        partition_clients = {c for n, c in r.sent.items() if n in self.nodes.partition_nodes}
        by_node, stray = replies_by_node(replies, r.messages)
        failed: list[dict[str, Any]] = []

        def answered() -> Iterator[Reply]:  # decoded when the server round reads it, folded and let go
            for node, client in r.sent.items():
                reply, why = self._decode(by_node.get(node, []), node, client, r.down, server_round)
                if reply is not None:
                    yield reply
                else:
                    log.warning("round %d: client %d (node %d) dropped: %s", server_round, client, node, why)
                    failed.append({"client": client, "node": node, "reason": why})

        if stray:
            log.warning("round %d: %d reply(ies) that answer no train message of this round ignored (from node(s) "
                        "%s)", server_round, len(stray), sorted({m.metadata.src_node_id for m in stray}))
        known = {c: self.known_sizes[c] for c in r.sent.values() if c in partition_clients and c in self.known_sizes}
        result = close_round(r.plan, r.state, answered(), self.stats, self.moments, self.layout, self.options,
                             known_sizes=known, failed=failed, bytes_down=r.down * len(r.sent))
        self.moments = result.moments
        metrics = result.metrics
        self.history.append(metrics)
        scalars = {k: metrics[k] for k in ("bytes_down", "bytes_up", "train_flops", "scoring_flops")}
        scalars["clients"] = len(metrics["clients"])
        if metrics["train_loss"] is not None:
            scalars["train_loss"] = metrics["train_loss"]
        return ArrayRecord(result.state), MetricRecord(scalars)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No federated evaluation: the server evaluates the global model (`evaluate_fn` of `start`, or
        fedhead's run loop on data.eval)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see configure_evaluate)."""
        return None

    # --- nodes and messages

    def _wait_for_nodes(self, grid: Grid) -> dict[int, int]:
        """{client id: node id} of the usable connected nodes, after waiting up to node_wait s for
        clients_per_round of them (the first round) or min_clients (later rounds); new nodes are queried."""
        fed = self.cfg.federated
        want = fed.min_clients if self._waited else fed.clients_per_round
        deadline = time.monotonic() + self.node_wait
        while True:
            new = self.nodes.update(set(grid.get_node_ids()))
            if new:
                queries = [Message(RecordDict(), n, "query", ttl=self.round_timeout) for n in new]
                answers = send_and_receive(grid, queries, min(self.round_timeout, 300.0))
                for n in new:
                    self.nodes.assign(n, answers.get(n))
            clients = self.nodes.clients()
            if len(clients) >= want or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        self._waited = True
        if not clients:
            raise RuntimeError(f"no usable node connected after {self.node_wait:.0f} s; once nodes are up, the run "
                               "continues after its last checkpoint with run config resume=true")
        return clients

    def _message(self, down: bytes, node: int, client: int, round_: int, kind: str, config: ConfigRecord,
                 counts: torch.Tensor | None = None) -> Message:
        conf = ConfigRecord({**dict(config.items()), "fedhead-config": self.config_json, "server-round": round_,
                             "client-id": client})
        if counts is not None:  # heads.schedule = "coverage": the server's per-head training counts, flat
            conf["head-counts"] = [int(n) for n in counts.flatten()]
        content = RecordDict({"arrays": payload_record(down), "config": conf})
        return Message(content, node, kind, group_id=str(round_), ttl=self.round_timeout)

    def _global_losses(self, grid: Grid, down: bytes, round_: int, clients: dict[int, int],
                       config: ConfigRecord) -> Callable[[list[int]], dict[int, float]]:
        """The loss of the global model on each candidate's data (evaluate messages; power_of_choice)."""
        def losses(candidates: list[int]) -> dict[int, float]:
            messages = [self._message(down, clients[c], c, round_, "evaluate", config) for c in candidates]
            replies = send_and_receive(grid, messages, self.round_timeout)
            out = {}
            for c in candidates:
                reply = replies.get(clients[c])
                if reply is not None and failure(reply) is None:
                    try:
                        loss = reply.content["metrics"]["eval_loss"]
                    except Exception:  # noqa: BLE001, S112 - a bad answer counts as no answer
                        continue
                    if isinstance(loss, int | float) and not isinstance(loss, bool) and 0 <= loss <= MAX_LOSS:
                        out[c] = float(loss)  # NaN, inf or a huge loss would steer power_of_choice: no answer
            return out
        return losses

    def _decode(self, received: list[Message], node: int, client: int, down: int,
                round_: int) -> tuple[Reply | None, str]:
        """The decoded reply of `node` (sent to `client`) to this round's train message, or None and why it does
        not count (no reply, several, an error, a reply to another message, a bad payload)."""
        if len(received) > 1:
            return None, f"{len(received)} replies to one train message"
        if not received:
            return None, f"no reply within round-timeout ({self.round_timeout:g} s)"
        reply = received[0]
        why = failure(reply)
        if why is not None:
            if reply.error.code in (DATA_ERROR, NODE_CONFIG_ERROR):
                self.nodes.exclude(node, why)  # it cannot serve this run until it reconnects
            return None, why
        kind, group = reply.metadata.message_type, reply.metadata.group_id
        if (kind, group) != (MessageType.TRAIN, str(round_)):
            return None, f"not a reply to this round's train message ({kind[:20]!r} message of round {group[:20]!r})"
        try:
            blob = payload_of(reply.content["update"])
        except Exception as err:  # noqa: BLE001 - whatever a node sends, the server goes on
            return None, f"bad payload: {type(err).__name__}: {err}"
        update, problem = receive_update(blob)
        if update is None:
            problem = problem or "undecodable"
            return None, problem if problem.startswith("bad payload") else f"bad payload: {problem}"
        try:  # reported, not trusted: the server round keeps known keys with sane values only
            reported = dict(reply.content["metrics"].items())
        except Exception:  # noqa: BLE001 - a reply without metrics still counts
            reported = {}
        return Reply(client, update, down, len(blob), reported), ""


def replies_by_node(replies: Iterable[Message], sent: dict[int, Message]) -> tuple[dict[int, list[Message]],
                                                                                 list[Message]]:
    """({node: the replies to the message sent to it}, the other replies), by the message each reply answers.

    Args:
        replies: the replies pulled for the round.
        sent: node id -> the message sent to it, pushed (its `metadata.message_id` set by the grid).
    Returns:
        Each node's replies: those whose `reply_to_message_id` is its message's id and whose source is the node
        or Flower's SuperLink (which answers for an unreachable node, or for a message whose time to live ran
        out); and the replies that answer no message in `sent` or come from another node.
    """
    node_of = {m.metadata.message_id: n for n, m in sent.items() if m.metadata.message_id}
    by_node: dict[int, list[Message]] = {}
    stray: list[Message] = []
    for m in replies:
        node = node_of.get(m.metadata.reply_to_message_id)
        if node is not None and m.metadata.src_node_id in (node, SUPERLINK_NODE_ID):
            by_node.setdefault(node, []).append(m)
        else:
            stray.append(m)
    return by_node, stray


def central_evaluation(lm: LoadedModel, data: datasets.Dataset, cfg: Config
                       ) -> Callable[[int, ArrayRecord], MetricRecord]:
    """An `evaluate_fn` for `Strategy.start`: loss and the task's metrics of the global model on `data`."""
    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_state_(lm.model, arrays.to_torch_state_dict())
        metrics = evaluate(lm.model, data, lm.tokenizer, cfg.federated.eval_batch_size, task=lm.task,
                           generation=cfg.generation)
        return MetricRecord({name: value for name, value in metrics.items()})
    return evaluate_fn
