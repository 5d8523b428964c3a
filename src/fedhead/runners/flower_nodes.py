"""Which client each Flower node is: the server's table of connected SuperNodes and the client ids they serve.

A client id is what fedhead's selection, loss-gap and head statistics and every client's random draws are keyed
by: an integer in [0, N), N = `partition.num_clients` (the clients the run selects among). A node gets one from
its answer to the server's `query` message (fedhead's ClientApp answers from its node config, see
`flower_node.node_identity`):

- partition form (`--node-config "partition-id=i num-partitions=n"`, and every node of Flower's simulation
  engine): client i of n; n must equal N. The server may know its data size (it has the same data.train).
- device-local form with `client-id=i` (`--node-config "data=/path/local.jsonl client-id=i"`): client i, the same
  across restarts of the node and of the server, so its statistics and its random draws follow it. Recommended.
- device-local form without `client-id`, or a ClientApp that answers no queries (a user's own app): the server
  numbers it with the lowest id in [0, N) that no connected node holds. The number is stable while the node stays
  connected; a node that reconnects has a new Flower node id and may get another number, and a number freed by
  a node that left goes to the next new node together with the statistics of its previous holder (corrected the
  next time the new holder trains).

A node is not used (logged, never selected) when its id is outside [0, N) or held by another connected node,
when its answer is not an integer client-id (and num-clients) in a "node" record, when all N ids are held, when
it did not answer the query (or the SuperLink answered in its place), when fedhead's ClientApp says its node
config cannot serve the run, and, after a reply saying that its data does not fit the run's config, until it
reconnects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.common.constant import ErrorCode

log = logging.getLogger("flwr")

NODE_CONFIG_ERROR = 4000  # error code of a reply: the node's config cannot serve this run
DATA_ERROR = 4001  # error code of a reply: the node's data does not fit the run's config (fields, labels)
# error codes of the replies Flower's SuperLink gives in a node's place: the message expired or was lost, its
# reply expired, the node stopped sending heartbeats (flwr.common.constant.ErrorCode)
FLOWER_UNAVAILABLE = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE)


@dataclass
class NodeTable:
    """Connected node id -> client id (None: connected but not used), for a run of `num_clients` clients."""

    num_clients: int
    client_of: dict[int, int | None] = field(default_factory=dict)
    partition_nodes: set[int] = field(default_factory=set)  # nodes serving a partition of the shared data.train

    def update(self, connected: set[int]) -> list[int]:
        """Forget the nodes that left (their ids become free); the connected nodes not seen yet, sorted."""
        self.client_of = {n: c for n, c in self.client_of.items() if n in connected}
        self.partition_nodes &= connected
        return sorted(connected - set(self.client_of))

    def assign(self, node: int, reply: Message | None) -> int | None:
        """Give `node` its client id from its answer to the query (see the module docstring); None when the
        node is not used (the reason is logged)."""
        why, client, partition = None, None, False
        if reply is None:
            why = "no answer to the query"
        elif reply.has_error():
            if reply.error.code == NODE_CONFIG_ERROR:
                why = f"node config: {reply.error.reason}"
            elif reply.error.code in FLOWER_UNAVAILABLE:  # the SuperLink answered: the node never did
                why = f"no answer to the query (error {reply.error.code}: {reply.error.reason})"
        else:
            try:
                node_record = reply.content["node"]
                client = _integer(node_record, "client-id")
                count = _integer(node_record, "num-clients")
            except Exception as err:  # noqa: BLE001 - whatever a node answers, the server goes on
                why = f"bad answer to the query: {type(err).__name__}: {err}"
            else:
                partition = count is not None
                if partition and count != self.num_clients:
                    why = f"partition {client} of {count} does not fit partition.num_clients = {self.num_clients}"
        if why is None:
            client, why = self._check_or_number(client)
        self.client_of[node] = client if why is None else None
        if why is None and partition:
            self.partition_nodes.add(node)
        if why is not None:
            log.warning("node %d is not used: %s", node, why)
        return self.client_of[node]

    def _check_or_number(self, client: int | None) -> tuple[int | None, str | None]:
        held = {c: n for n, c in self.client_of.items() if c is not None}
        if client is None:  # numbered by the server: the lowest free id
            free = [c for c in range(self.num_clients) if c not in held]
            if not free:
                return None, (f"all {self.num_clients} client ids (partition.num_clients) are held by connected "
                              "nodes; start the node with --node-config 'client-id=I'")
            return free[0], None
        if not 0 <= client < self.num_clients:
            return None, f"client id {client} is not in [0, {self.num_clients}) (partition.num_clients)"
        if client in held:
            return None, f"client id {client} is already served by node {held[client]}"
        return client, None

    def exclude(self, node: int, reason: str) -> None:
        """Stop using `node` until it reconnects (e.g. its data does not fit the run's config)."""
        if self.client_of.get(node) is not None:
            log.warning("node %d (client %s) is not used any more: %s", node, self.client_of[node], reason)
        self.client_of[node] = None
        self.partition_nodes.discard(node)

    def clients(self) -> dict[int, int]:
        """{client id: node id} of the connected nodes in use."""
        return {c: n for n, c in sorted(self.client_of.items()) if c is not None}


def _integer(record: Any, key: str) -> int | None:
    """record[key] when it is an integer (not a bool, a float or a string of digits), None when absent."""
    if key not in record:
        return None
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} {str(value)[:40]!r} is not an integer")
    return value
