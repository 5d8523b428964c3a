"""fedhead's server as a Flower `Strategy`: client selection among the connected nodes, screening, head-weighted
aggregation, server optimisers and DP by `fedhead.federated.server` (`plan_round` in configure_train,
`close_round` in aggregate_train), over Flower messages.

Use it as flwr's `FedAvg` is, from `strategy.start(...)` in a ServerApp with `flower_client.train_reply` in the
ClientApp (README, "Your own Flower app"). Either way fedhead's run loop (`fedhead.loop.drive_rounds`) drives
`run_round` with checkpoints, resume, the evaluation cadence and the tail average: `start` with the user's
`evaluate_fn` (`flower_start`), fedhead's ServerApp with the model and data it loads (`flower_app.serve`).

Arrays in and out are the global trainable state as an `ArrayRecord` of named tensors (LoRA adapters and the task
head). What travels to and from the nodes is fedhead's own safetensors payload (`flower_client.payload_record`),
so the bytes recorded are those of the real messages.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedhead.config import Config, ConfigError
from fedhead.federated.payload import encode_state
from fedhead.federated.selection import ClientStats
from fedhead.federated.server import Reply, RoundPlan, close_round, plan_round
from fedhead.federated.state import State
from fedhead.federated.validation import MAX_LOSS
from fedhead.loop import RunContext, drive_rounds, server_options
from fedhead.models import HeadLayout
from fedhead.run_dir import RunDir
from fedhead.runners.flower_client import failure, payload_record, send_and_receive
from fedhead.runners.flower_nodes import DATA_ERROR, NODE_CONFIG_ERROR, NodeTable
from fedhead.runners.flower_replies import decode_train_reply, replies_by_node
from fedhead.runners.flower_start import (
    EvaluateFn,
    StartedRun,
    round_totals,
    route_fedhead_logs_through_flower,
    started_config,
)

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
        run_dir: under `start`, the run directory (checkpoints, metrics.jsonl, summary.json); default none: a
            temporary one, gone when `start` returns.
        resume: under `start`, continue after the last checkpoint in run_dir (none there: from round 1).

    Server-side state: `stats` (client statistics), `rng` (selection), `moments` (server optimiser), `nodes`
    (node id -> client id, `flower_nodes.NodeTable`) and `history` (fedhead's full metrics line of each round).
    """

    def __init__(self, cfg: Config, layout: HeadLayout, *, known_sizes: dict[int, int] | None = None,
                 round_timeout: float = 3600.0, node_wait: float = 600.0, run_dir: str | Path | None = None,
                 resume: bool = False) -> None:
        self.cfg, self.layout = cfg, layout
        self.run_dir, self.resume = run_dir, resume
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

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: EvaluateFn | None = None) -> Result:
        """Flower's `Strategy.start` driven by fedhead's run loop (`flower_start`): checkpoints in run_dir and
        resume, evaluate_fn at round 0, every federated.eval_every rounds and the last, the tail average.

        Args:
            grid: the Grid of the ServerApp.
            initial_arrays: the global trainable state before round 1.
            num_rounds: the rounds (replaces federated.rounds).
            timeout: seconds a round waits for replies (replaces round_timeout).
            train_config: entries added to every train message's "config".
            evaluate_config: unused (no federated evaluation).
            evaluate_fn: central evaluation of the global model, `evaluate_fn(round, arrays)`.
        Returns:
            The final global state, each round's totals and the central evaluations (earlier sessions' rounds of a
            resumed run included). ConfigError before any round for an option `start` cannot honour.
        """
        self.cfg, self.round_timeout = started_config(self.cfg, num_rounds), timeout
        self.config_json = self.cfg.model_dump_json()
        run = StartedRun(self.cfg, initial_arrays.to_torch_state_dict(), evaluate_fn)
        route_fedhead_logs_through_flower()
        log.info("Starting %s strategy:", type(self).__name__)
        self.summary()

        def on_round(m: dict[str, Any]) -> None:
            log.info("[ROUND %d/%d] %s", m["round"], num_rounds, {k: v for k, v in m.items() if k not in (
                "clients", "rejected", "client_timings")})

        with tempfile.TemporaryDirectory(prefix="fedhead-") as scratch:
            rd = RunDir(self.run_dir if self.run_dir is not None else scratch)
            if not self.resume and rd.holds_a_run():
                raise ConfigError(f"{rd.path} holds another run: continue it with FedHeadStrategy(..., resume=True), "
                                  "or give another run_dir")
            drive_rounds(run, rd, lambda state, r, rng, stats: self.run_round(grid, run, state, r, rng, stats,
                                                                              train_config),
                         resume=self.resume, on_round=on_round)
            return run.result(rd)

    def run_round(self, grid: Grid, run: RunContext, state: State, round_: int, rng: np.random.Generator,
                  stats: ClientStats, config: ConfigRecord | None = None) -> tuple[State, dict[str, Any]]:
        """One round of fedhead's run loop (`fedhead.loop.RoundFn`): configure_train, the messages,
        aggregate_train, with the run loop's (checkpointed) selection RNG, client statistics and server-optimiser
        moments. Returns (next state, fedhead's metrics line)."""
        self.rng, self.stats, self.moments = rng, stats, run.server_moments
        messages = list(self.configure_train(round_, ArrayRecord(state), config or ConfigRecord(), grid))
        replies = send_and_receive(grid, messages, self.round_timeout)
        arrays, _ = self.aggregate_train(round_, replies.values())
        run.server_moments = self.moments
        assert arrays is not None
        return arrays.to_torch_state_dict(), self.history[-1]

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
        clients = self._wait_for_nodes(grid)
        plan = plan_round(clients, self.cfg.federated, self.cfg.heads, self.cfg.seed, server_round, self.rng,
                          self.stats, self.layout, self._global_losses(grid, state, server_round, clients, config),
                          state=state, started=t0, dropout_probability=self.cfg.robust.dropout_probability)
        sent = {clients[c]: c for c in plan.sent}
        messages = {n: self._message(plan.down, n, c, server_round, "train", config, plan.head_counts)
                    for n, c in sent.items()}
        self._round = _Round(state, plan, sent, messages, len(plan.down))
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
        failed: list[dict[str, Any]] = []  # besides the clients the plan dropped (robust.dropout_probability)

        def answered() -> Iterator[Reply]:  # decoded when the server round reads it, folded and let go
            for node, client in r.sent.items():
                received = by_node.get(node, [])
                reply, why = decode_train_reply(received, client, r.down, server_round, self.round_timeout)
                if reply is None and len(received) == 1 and received[0].has_error() and \
                        received[0].error.code in (DATA_ERROR, NODE_CONFIG_ERROR):
                    self.nodes.exclude(node, why)  # it cannot serve this run until it reconnects
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
        self.history.append(result.metrics)
        return ArrayRecord(result.state), round_totals(result.metrics)

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

    def _global_losses(self, grid: Grid, state: State, round_: int, clients: dict[int, int],
                       config: ConfigRecord) -> Callable[[list[int]], dict[int, float]]:
        """The loss of the global model `state` on each candidate's data (evaluate messages; power_of_choice)."""
        def losses(candidates: list[int]) -> dict[int, float]:
            down = encode_state(state)
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

