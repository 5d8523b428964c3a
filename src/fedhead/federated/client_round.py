"""A client's round as bytes, the one step every engine runs on a device: the payload it received in, its
serialised update out (`client_update` between `decode_state` and `encode_update`).

The in-process engine calls it for each client of a round (`fedhead.loop.Simulation.client_reply`), a Flower
node for each train message (`fedhead.runners.flower_client.train_reply`); what travels, and so what the run
counts, is the same bytes in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import torch

from fedhead.federated.client import ClientOptions, client_update
from fedhead.federated.payload import decode_state, encode_update
from fedhead.federated.state import State
from fedhead.models.loading import LoadedModel


@dataclass
class ClientReply:
    """What a client answers: its update's payload, the examples it trained on and its timings (reported to the
    server), and its new error-feedback residual, which stays on the device (None: no quantised upload)."""

    payload: bytes
    num_examples: int
    timings: dict[str, Any]
    residual: State | None


def client_round(lm: LoadedModel, received: bytes, data: datasets.Dataset, options: ClientOptions,
                 client_id: int, round_: int, head_counts: torch.Tensor | None = None,
                 residual: State | None = None) -> ClientReply:
    """Client `client_id`'s round `round_` on `data`, from the global state's payload `received` (`encode_state`
    bytes); the arguments after `data` are `client_update`'s."""
    update = client_update(lm, decode_state(received), data, options, client_id, round_, head_counts, residual)
    payload = encode_update(update, deflate=options.upload_deflate)
    return ClientReply(payload, update.num_examples, update.timings, update.residual)
