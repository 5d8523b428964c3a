"""What travels: the server's global state down, each client's update up, serialised with safetensors.

The byte counts of the run are the lengths of these serialised payloads, not estimates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedhead.federated.state import State

KEPT = "__kept_heads__"
SCORES = "__head_scores__"


@dataclass
class ClientUpdate:
    """A client's upload: kept-head slices of head-sliced tensors, shared tensors, scores and statistics.

    tensors: head-sliced tensors hold only the rows (q/k/v LoRA B) or columns (o LoRA A) of the kept heads,
    block order preserved; kept_heads: bool [blocks, heads]; head_scores: [blocks, heads] in [0, 1];
    loss_before: loss of the received global model on the client's sample; loss_after: of its trained model.
    """

    client_id: int
    num_examples: int
    kept_heads: torch.Tensor
    head_scores: torch.Tensor
    tensors: State
    loss_before: float
    loss_after: float
    train_loss: float
    stats: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # measured locally, not part of the payload


def encode_state(state: State, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a state (tensor dict) with safetensors, with optional string metadata."""
    return st_save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)


def decode_state(blob: bytes) -> State:
    """Inverse of `encode_state`."""
    return dict(st_load(blob))


def _metadata(blob: bytes) -> dict[str, str]:
    header_len = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + header_len]).get("__metadata__", {}) or {}


def decode_state_with_metadata(blob: bytes) -> tuple[State, dict[str, str]]:
    """A state and the metadata it was saved with."""
    return decode_state(blob), _metadata(blob)


def encode_update(update: ClientUpdate) -> bytes:
    """Serialise a client update: tensors, kept mask and scores as safetensors, the scalars as its metadata."""
    tensors = {k: v.contiguous() for k, v in update.tensors.items()}
    tensors[KEPT] = update.kept_heads.to(torch.uint8).contiguous()
    tensors[SCORES] = update.head_scores.to(torch.float32).contiguous()
    meta = {
        "client_id": update.client_id,
        "num_examples": update.num_examples,
        "loss_before": update.loss_before,
        "loss_after": update.loss_after,
        "train_loss": update.train_loss,
        "stats": update.stats,
    }
    return st_save(tensors, metadata={"fedhead": json.dumps(meta)})


def decode_update(blob: bytes) -> ClientUpdate:
    """Inverse of `encode_update`; raises ValueError on a payload that is not a fedhead update."""
    tensors = dict(st_load(blob))
    raw = _metadata(blob).get("fedhead")
    if raw is None or KEPT not in tensors or SCORES not in tensors:
        raise ValueError("not a fedhead client update")
    meta = json.loads(raw)
    kept = tensors.pop(KEPT).bool()
    scores = tensors.pop(SCORES)
    return ClientUpdate(
        client_id=int(meta["client_id"]),
        num_examples=int(meta["num_examples"]),
        kept_heads=kept,
        head_scores=scores,
        tensors=tensors,
        loss_before=float(meta["loss_before"]),
        loss_after=float(meta["loss_after"]),
        train_loss=float(meta["train_loss"]),
        stats=dict(meta.get("stats", {})),
    )
