"""What travels: the server's global state down, each client's update up, serialised with safetensors.

The byte counts of the run are the lengths of these serialised payloads, not estimates.

An update may travel deflated (`federated.upload_deflate`): DEFLATED followed by zlib's level-9 stream of the
safetensors bytes. The server inflates it to at most MAX_INFLATION times the bytes it received, and to at most
`max_bytes` where it knows what a legitimate update can weigh (a Flower server: twice the state it sent + 1 MiB,
`update_size_limit`): a legitimate update inflates by well under 2x (float32 values hardly compress; a quantised
upload by about 1.3x), so a payload that would inflate further (a zlib bomb) is refused before it fills the
server's memory.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedhead.federated.compression import BITS, dequantize
from fedhead.federated.state import State

KEPT = "__kept_heads__"
SCALE = "::scale"  # a quantised tensor's per-row scales travel as <name>::scale
SCORES = "__head_scores__"
# a deflated update starts with these bytes; a safetensors file starts with its header's length (8 bytes, little
# endian), which would read here as about 3e18 bytes: the two cannot be confused
DEFLATED = b"fedhead-deflate\x00"
MAX_INFLATION = 64


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
    # federated.upload_bits < 32: `tensors` are the deltas x^ from the received values (fedhead.federated.compression),
    # sent as `quantized` (name -> packed values, per-row scales); the server adds them to what it sent
    upload_bits: int = 32
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    residual: State | None = None  # error feedback: the client's state for its next round, never sent


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


def encode_update(update: ClientUpdate, deflate: bool = False) -> bytes:
    """Serialise a client update: tensors (a quantised upload: packed values and SCALE-suffixed per-row scales),
    kept mask and scores as safetensors, the scalars as its metadata; with `deflate`, DEFLATED + those bytes
    deflated (zlib, level 9)."""
    if update.quantized is not None:
        tensors = {}
        for name, (packed, scale) in update.quantized.items():
            tensors[name], tensors[name + SCALE] = packed.contiguous(), scale.contiguous()
    else:
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
    if update.quantized is not None:
        meta["upload_bits"] = update.upload_bits
        meta["shapes"] = {name: list(update.tensors[name].shape) for name in update.quantized}
    blob = st_save(tensors, metadata={"fedhead": json.dumps(meta)})
    return DEFLATED + zlib.compress(blob, 9) if deflate else blob


def update_size_limit(down: int) -> int:
    """The most bytes a legitimate update to a state payload of `down` bytes can inflate to: its tensors are at most
    the state's (kept slices of it, or their quantised deltas), with a mask, scores and scalars beside them."""
    return 2 * down + 2**20


def inflated(blob: bytes, max_bytes: int | None = None) -> bytes:
    """A payload's safetensors bytes: `blob` itself, or a deflated update inflated (ValueError when the stream is
    broken, unfinished, or would inflate beyond MAX_INFLATION times its length or beyond `max_bytes`)."""
    if not blob.startswith(DEFLATED):
        return blob
    stream = zlib.decompressobj()
    limit = MAX_INFLATION * len(blob) if max_bytes is None else min(MAX_INFLATION * len(blob), max_bytes)
    try:
        out = stream.decompress(blob[len(DEFLATED):], limit)
    except zlib.error as err:
        raise ValueError(f"not a fedhead client update: broken deflate stream ({err})") from None
    if stream.unconsumed_tail:
        raise ValueError(f"not a fedhead client update: inflates beyond {limit} bytes (from {len(blob)})")
    if not stream.eof or stream.unused_data:
        raise ValueError("not a fedhead client update: the deflate stream is cut short or followed by other bytes")
    return out


def decode_update(blob: bytes, max_bytes: int | None = None) -> ClientUpdate:
    """Inverse of `encode_update`; raises ValueError on a payload that is not a fedhead update.

    The scalars are returned as the client wrote them, not converted: a data size of 3.7 or true, or a client id
    of "2", must reach the server's checks (`validation.check_update`) as what it is, to be refused there. A
    deflated update (`encode_update(..., deflate=True)`) is inflated first, to at most `max_bytes` (`inflated`)."""
    blob = inflated(blob, max_bytes)
    tensors = dict(st_load(blob))
    raw = _metadata(blob).get("fedhead")
    if raw is None or KEPT not in tensors or SCORES not in tensors:
        raise ValueError("not a fedhead client update")
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise ValueError("the update's metadata is not a JSON object")
    kept = tensors.pop(KEPT).bool()
    scores = tensors.pop(SCORES)
    bits = meta.get("upload_bits", 32)
    if bits != 32:
        tensors = _dequantized(tensors, bits, meta.get("shapes"))
    stats = meta.get("stats", {})
    if not isinstance(stats, dict):
        raise ValueError(f"the update's stats are not a JSON object ({type(stats).__name__})")
    return ClientUpdate(
        client_id=meta["client_id"],
        num_examples=meta["num_examples"],
        kept_heads=kept,
        head_scores=scores,
        tensors=tensors,
        loss_before=meta["loss_before"],
        loss_after=meta["loss_after"],
        train_loss=meta["train_loss"],
        stats=dict(stats),
        upload_bits=bits,
    )


def _dequantized(wire: State, bits: object, shapes: object) -> State:
    """The deltas x^ of a quantised upload (fedhead.federated.compression); ValueError when the parts do not fit."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"not a fedhead client update: upload_bits {bits!r} is none of {BITS}")
    if not isinstance(shapes, dict):
        raise ValueError("not a fedhead client update: a quantised upload without its tensors' shapes")
    names = [n for n in wire if not n.endswith(SCALE)]
    if set(wire) != set(names) | {n + SCALE for n in names} or set(shapes) != set(names):
        raise ValueError("not a fedhead client update: quantised values, scales and shapes do not match")
    out = {}
    for name in names:
        shape = shapes[name]
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31
                                                  for d in shape):
            raise ValueError(f"not a fedhead client update: shape of {name} is {shape!r}")
        out[name] = dequantize(wire[name], wire[name + SCALE], bits, tuple(shape))
    return out
