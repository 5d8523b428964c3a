"""fedhead on Flower: a ServerApp whose strategy delegates to fedhead's core, and a ClientApp that runs
`client_update` on its node's partition. The same app runs on Flower's simulation engine (`fedhead run
--engine flower`) and on a real deployment (`flower-superlink` + one `flower-supernode` per device, `flwr run`).

What travels (Flower Message API; every payload is fedhead's own safetensors bytes, carried unchanged as one
`Array` of an `ArrayRecord`, so the bytes recorded are the lengths of the real messages' payloads, exactly as in
the in-process engine):

    query     server -> node   (nothing)                      node -> server   ConfigRecord "node": partition-id,
                                                                               num-partitions (its node config)
    train     server -> node   ArrayRecord "state": payload = encode_state(global trainable state)
                               ConfigRecord "fedhead": config (JSON), round, partition-id
              node -> server   ArrayRecord "update": payload = encode_update(kept-head slices + shared tensors)
                               MetricRecord "timings": seconds measured on the node
    evaluate  server -> node   as train (power_of_choice only)  node -> server MetricRecord "loss": eval_loss of
                                                                               the global model on its sample

Selection happens in `configure_train`, among the nodes that are connected (`grid.get_node_ids()`), with
`fedhead.federated.selection.select_clients` over their partition ids (a node's partition id comes from its
node config: `--node-config "partition-id=i num-partitions=n"` in deployment, set by the simulation engine
otherwise). A node that fails (error reply, e.g. it went offline or its ClientApp raised) or does not answer
within `round-timeout` is dropped from that round and listed under `failed` in the round's metrics line (client,
node, reason); the round completes with the rest. With fewer than `federated.min_clients` good updates the
global state is kept (`skipped`), as in the in-process engine: the server's side of a round is the same
`finish_round`.

Run config of the app (`flwr run APP --run-config 'key=value ...'`): `config` (a fedhead TOML or config.json on
the SuperLink machine; empty: RUN_DIR/config.json), `run-dir` (empty: OUT/RUN_NAME of the config), `resume`,
`round-timeout` (seconds a round waits for replies), `node-wait` (seconds the first round waits until
`clients_per_round` nodes are connected).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedhead.config import Config, load_config
from fedhead.federated.payload import decode_state, encode_state
from fedhead.federated.selection import ClientStats, Selection, select_clients
from fedhead.federated.state import State
from fedhead.federated.validation import receive_update
from fedhead.runners.flower_client import _failure, payload_of, payload_record, send_and_receive
from fedhead.runners.local import Received, Simulation, drive_rounds, finish_round
from fedhead.runners.run_dir import RunDir

log = logging.getLogger("flwr")  # shown by `flwr run --stream` and in the SuperLink's log

server_app = ServerApp()


# ----------------------------------------------------------------------------------------------- server side


def select_among(available: list[int], sim: Simulation, round_: int, rng: np.random.Generator, stats: ClientStats,
                 global_loss_of: Callable[[list[int]], dict[int, float]]) -> Selection:
    """`select_clients` over the partition ids in `available` (sorted): positions in, partition ids out.

    With every partition connected this is `select_clients` over all clients, draw for draw, so the Flower
    engine picks what the in-process engine picks."""
    fed = sim.cfg.federated
    pos = {c: i for i, c in enumerate(available)}
    view = ClientStats(**{name: {pos[c]: v for c, v in getattr(stats, name).items() if c in pos}
                          for name in ("last_round", "loss_global", "loss_local", "kept_heads")})

    def losses(positions: list[int]) -> dict[int, float]:
        by_client = global_loss_of([available[p] for p in positions])
        return {p: by_client.get(available[p], -math.inf) for p in positions}

    s = select_clients(fed.selection, len(available), min(fed.clients_per_round, len(available)), round_, rng, view,
                       exploration=fed.exploration, candidates_d=fed.power_of_choice_d, global_loss_of=losses)
    return Selection([available[p] for p in s.clients], {available[p]: v for p, v in s.priorities.items()}, s.reason)


@dataclass
class _Round:
    """What configure_train sent, for aggregate_train."""

    state: State
    selection: Selection
    sent: dict[int, int]  # node id -> partition id
    down: int  # bytes of the state payload each node was sent
    t0: float


class FedHeadStrategy(Strategy):
    """Selection, aggregation and accounting by fedhead's core, over Flower messages.

    The server-side state (client statistics, selection RNG, the node <-> partition map) lives here; the
    in-process engine's bookkeeping (`finish_round`) turns the replies into the next state and a metrics line.
    """

    def __init__(self, sim: Simulation, *, round_timeout: float = 3600.0, node_wait: float = 600.0) -> None:
        self.sim = sim
        self.round_timeout = round_timeout
        self.node_wait = node_wait
        self.config_json = sim.cfg.model_dump_json()
        self.stats = ClientStats()
        self.rng = np.random.default_rng(sim.cfg.seed)
        self.partition_of: dict[int, int | None] = {}  # node id -> partition id (None: unusable node)
        self.waited = False
        self.last_metrics: dict[str, Any] = {}
        self._round: _Round | None = None

    # --- nodes

    def connected(self, grid: Grid) -> dict[int, int]:
        """{partition id: node id} of the connected nodes; asks new nodes for their partition."""
        nodes = set(grid.get_node_ids())
        # forget nodes that left: a node restarted for the same partition comes back with a new id
        self.partition_of = {n: p for n, p in self.partition_of.items() if n in nodes}
        new = sorted(nodes - set(self.partition_of))
        if new:
            messages = [Message(RecordDict(), n, "query", ttl=self.round_timeout) for n in new]
            replies = send_and_receive(grid, messages, min(self.round_timeout, 300.0))
            for n in new:  # a node that fails here stays unused while it is connected
                why = _failure(replies.get(n))
                if why is None:
                    try:
                        node = replies[n].content["node"]
                        pid, count = int(node["partition-id"]), int(node["num-partitions"])
                    except Exception as err:  # noqa: BLE001 - whatever a node answers, the server goes on
                        why, pid, count = f"bad reply: {type(err).__name__}: {err}", -1, -1
                if why is None:
                    if count != self.sim.cfg.partition.num_clients or not 0 <= pid < count:
                        why = f"partition {pid} of {count} does not fit partition.num_clients"
                    elif pid in self.partition_of.values():
                        why = f"partition {pid} is already served by another node"
                self.partition_of[n] = pid if why is None else None
                if why is not None:
                    log.warning("node %d is not used: %s", n, why)
        return {p: n for n, p in sorted(self.partition_of.items()) if p is not None}

    def wait_for_nodes(self, grid: Grid) -> dict[int, int]:
        """The connected partitions, after waiting up to node_wait s for clients_per_round of them (the first
        round) or for min_clients of them (later rounds). RuntimeError when none is connected."""
        fed = self.sim.cfg.federated
        want = fed.min_clients if self.waited else fed.clients_per_round
        deadline = time.monotonic() + self.node_wait
        while True:
            available = self.connected(grid)
            if len(available) >= want or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        self.waited = True
        if not available:
            raise RuntimeError(f"no usable node connected after {self.node_wait:.0f} s; once nodes are up, the run "
                               "continues after its last checkpoint with run config resume=true")
        return available

    def _global_losses(self, grid: Grid, state_record: ArrayRecord, round_: int,
                       nodes: dict[int, int]) -> Callable[[list[int]], dict[int, float]]:
        def losses(clients: list[int]) -> dict[int, float]:
            messages = [self._message(state_record, nodes[c], c, round_, "evaluate") for c in clients]
            replies = send_and_receive(grid, messages, self.round_timeout)
            return {c: float(replies[nodes[c]].content["loss"]["eval_loss"]) for c in clients
                    if _failure(replies.get(nodes[c])) is None}
        return losses

    def _message(self, state_record: ArrayRecord, node: int, client: int, round_: int, kind: str) -> Message:
        conf = ConfigRecord({"config": self.config_json, "round": round_, "partition-id": client})
        content = RecordDict({"state": state_record, "fedhead": conf})
        return Message(content, node, kind, group_id=str(round_), ttl=self.round_timeout)

    # --- Strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Select among the connected nodes and send each the global state (fedhead's payload bytes)."""
        t0 = time.perf_counter()
        down = payload_of(arrays)
        nodes = self.wait_for_nodes(grid)
        selection = select_among(sorted(nodes), self.sim, server_round, self.rng, self.stats,
                                 self._global_losses(grid, arrays, server_round, nodes))
        sent = {nodes[c]: c for c in selection.clients}
        self._round = _Round(decode_state(down), selection, sent, len(down), t0)
        return [self._message(arrays, n, c, server_round, "train") for n, c in sent.items()]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the updates, drop the failed nodes, aggregate with fedhead's core; the full metrics line is
        kept in `last_metrics`."""
        assert self._round is not None, "configure_train first"
        r = self._round
        by_node = {m.metadata.src_node_id: m for m in replies}
        received: list[Received] = []
        failed: list[dict[str, Any]] = []
        for node, client in r.sent.items():
            reply = by_node.get(node)
            why = _failure(reply)
            if why is None:
                try:
                    blob = payload_of(reply.content["update"])
                except Exception as err:  # noqa: BLE001 - whatever a node sends, the server goes on
                    blob, why = b"", f"bad payload: {type(err).__name__}: {err}"
                update, problem = receive_update(blob) if why is None else (None, why)
                if update is not None and update.client_id != client:
                    update, problem = None, f"bad payload: update of client {update.client_id}"
                if update is None:
                    why = problem if problem.startswith("bad payload") else f"bad payload: {problem}"
                else:
                    try:  # reported, not trusted: the server round keeps known keys with sane values only
                        timings = dict(reply.content["timings"].items())
                    except Exception:  # noqa: BLE001 - a reply without timings still counts
                        timings = {}
                    received.append((update, timings, r.down, len(blob)))
            if why is not None:
                log.warning("round %d: client %d (node %d) dropped: %s", server_round, client, node, why)
                failed.append({"client": client, "node": node, "reason": why})
        # validation, client statistics, aggregation (or the state kept below federated.min_clients), metrics
        state, metrics = finish_round(self.sim, r.state, server_round, self.stats, r.selection, received,
                                      r.down * len(r.sent), r.t0, failed)
        self.last_metrics = metrics
        self._round = None
        scalars = {k: metrics[k] for k in ("bytes_down", "bytes_up", "train_flops", "scoring_flops")}
        if metrics["train_loss"] is not None:
            scalars["train_loss"] = metrics["train_loss"]
        return payload_record(encode_state(state)), MetricRecord(scalars)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No federated evaluation: the server evaluates the global model on the held-out set."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        fed = self.sim.cfg.federated
        log.info("\t├── fedhead: selection %s, aggregation %s, %d of %d clients a round (min %d)",
                 fed.selection, fed.aggregation, fed.clients_per_round, self.sim.cfg.partition.num_clients,
                 fed.min_clients)

    # --- one round for the shared run loop

    def run_round(self, grid: Grid, state: State, round_: int, rng: np.random.Generator,
                  stats: ClientStats) -> tuple[State, dict[str, Any]]:
        """configure_train, the messages, aggregate_train: (next state, metrics line)."""
        self.rng, self.stats = rng, stats  # the run loop's (checkpointed) selection RNG and statistics
        messages = list(self.configure_train(round_, payload_record(encode_state(state)), ConfigRecord(), grid))
        replies = send_and_receive(grid, messages, self.round_timeout)
        arrays, _ = self.aggregate_train(round_, replies.values())
        return decode_state(payload_of(arrays)), self.last_metrics


def server_options(run_config: dict[str, Any]) -> tuple[Config, Path, bool, float, float]:
    """(config, run directory, resume, round timeout, node wait) from the app's run config."""
    config, run_dir = str(run_config.get("config", "")), str(run_config.get("run-dir", ""))
    resume = bool(run_config.get("resume", False))
    if config:
        cfg = (Config.model_validate_json(Path(config).read_text()) if config.endswith(".json")
               else load_config(config))
    elif run_dir:
        cfg = Config.model_validate_json((Path(run_dir) / "config.json").read_text())
    else:
        raise ValueError("the run config needs 'config' (a fedhead config file) or 'run-dir' (with config.json)")
    path = Path(run_dir) if run_dir else Path(cfg.out) / (cfg.run_name or "run")
    return (cfg, path, resume, float(run_config.get("round-timeout", 3600.0)),
            float(run_config.get("node-wait", 600.0)))


def serve(grid: Grid, cfg: Config, run_dir: str | Path, *, resume: bool = False, round_timeout: float = 3600.0,
          node_wait: float = 600.0) -> dict[str, Any]:
    """The whole run on the server: the in-process engine's run loop with rounds over Flower messages."""
    start = time.perf_counter()
    sim = Simulation.setup(cfg)
    strategy = FedHeadStrategy(sim, round_timeout=round_timeout, node_wait=node_wait)
    strategy.summary()

    def round_fn(state: State, round_: int, rng: np.random.Generator, stats: ClientStats):
        return strategy.run_round(grid, state, round_, rng, stats)

    def on_round(m: dict[str, Any]) -> None:
        keys = ("selected", "train_loss", cfg.metric, "eval_loss", "failed", "rejected", "skipped")
        log.info("fedhead round %d: %s", m["round"], {k: m[k] for k in keys if k in m})

    return drive_rounds(sim, RunDir(run_dir), round_fn, resume=resume, start=start, on_round=on_round)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, run_dir, resume, round_timeout, node_wait = server_options(dict(context.run_config))
    log.info("fedhead: run directory %s", run_dir.resolve())
    summary = serve(grid, cfg, run_dir, resume=resume, round_timeout=round_timeout, node_wait=node_wait)
    log.info("fedhead: done, final %s %s", summary.get("metric"), summary.get("final_score"))
