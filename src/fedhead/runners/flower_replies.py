"""What a node's reply to a train message counts as: which node it answers (`replies_by_node`, by the message it
replies to) and the update it carries, or why it does not count (`decode_train_reply`: no reply, several, an error,
a reply to another message, a bad payload). Whatever a node sends, the server goes on."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, MessageType
from flwr.common.constant import SUPERLINK_NODE_ID

from fedhead.federated.payload import update_size_limit
from fedhead.federated.server import Reply
from fedhead.federated.validation import receive_update
from fedhead.runners.flower_client import failure, payload_of


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


def decode_train_reply(received: list[Message], client: int, down: int, round_: int,
                       round_timeout: float) -> tuple[Reply | None, str]:
    """The decoded reply of the node sent `client`'s train message of `round_`, or None and why it does not count.

    Args:
        received: the node's replies to its train message (`replies_by_node`).
        client: the client id the node was sent.
        down: bytes of the state payload the node was sent.
        round_: the round.
        round_timeout: seconds the round waited (for the reason of a missing reply).
    """
    if len(received) > 1:
        return None, f"{len(received)} replies to one train message"
    if not received:
        return None, f"no reply within round-timeout ({round_timeout:g} s)"
    reply = received[0]
    why = failure(reply)
    if why is not None:
        return None, why
    kind, group = reply.metadata.message_type, reply.metadata.group_id
    if (kind, group) != (MessageType.TRAIN, str(round_)):
        return None, f"not a reply to this round's train message ({kind[:20]!r} message of round {group[:20]!r})"
    try:
        blob = payload_of(reply.content["update"])
    except Exception as err:  # noqa: BLE001 - whatever a node sends, the server goes on
        return None, f"bad payload: {type(err).__name__}: {err}"
    update, problem = receive_update(blob, update_size_limit(down))
    if update is None:
        problem = problem or "undecodable"
        return None, problem if problem.startswith("bad payload") else f"bad payload: {problem}"
    try:  # reported, not trusted: the server round keeps known keys with sane values only
        reported = dict(reply.content["metrics"].items())
    except Exception:  # noqa: BLE001 - a reply without metrics still counts
        reported = {}
    return Reply(client, update, down, len(blob), reported), ""
