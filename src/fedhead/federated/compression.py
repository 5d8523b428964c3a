"""Quantised upload: a client's update sent as its delta from what it received, quantised per row, with error
feedback.

For one group x of GROUP = 64 consecutive values of a delta (row-major; a tensor's last group may be shorter) and
b bits, with L = 2^(b-1) - 1 levels on each side of 0:

    s   = max_j |x_j| / L                      the group's scale (float32, sent; 0 for an all-zero group)
    q_j = floor(x_j / s + u_j),  u_j ~ U[0, 1)  stochastic rounding, so E[q_j s] = x_j; |q_j| <= L
    x^_j = q_j s                               what the server reads: |x^_j - x_j| < s = max_j |x_j| / L

b = 8 sends q as int8, b = 4 as q + 8 in a nibble (two values a byte), b = 3 as q + 4 in three bits of a nibble (two
a byte, q in -3..3: as many bytes as 4 bits until deflated, `federated.upload_deflate`, which brings seven levels
closer to their entropy than a tight 3-bit packing would, as deflate codes whole bytes), b = 2 as q + 2 in two bits
(four a byte: q in {-1, 0, 1}, ternary). Error feedback (EF-SGD, Seide et al. 2014,
Karimireddy et al. 2019): the client quantises v = delta + e, where e is its residual, and keeps e' = v - x^ for its
next participation, so what rounding loses this round is sent in a later one instead of being lost. The residual
is full-shaped (a head slice the client did not train this round keeps its residual until it trains it again).

The server rebuilds the trained values as received + x^ (`fedhead.federated.server.materialize`) before screening:
everything after it (validation, aggregation, statistics) sees values, as with an unquantised upload.
"""

from __future__ import annotations

import torch

from fedhead.federated.state import State
from fedhead.models.head_map import HeadLayout
from fedhead.models.slicing import gather_kept

BITS = (8, 4, 3, 2)
GROUP = 64  # values that share one scale: float32 scales add 0.5 bits a value


def levels(bits: int) -> int:
    """L = 2^(bits-1) - 1: the largest |q| of a `bits`-bit quantised value."""
    if bits not in BITS:
        raise ValueError(f"upload bits must be one of {BITS}, got {bits}")
    return 2 ** (bits - 1) - 1


def quantize(x: torch.Tensor, bits: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic quantisation of `x` in groups of GROUP consecutive values (see the module docstring): (packed
    values: int8 for 8 bits, else uint8 holding 8 // bits values a byte; float32 scales, one a group)."""
    top = levels(bits)
    flat = x.detach().float().flatten()
    groups = _grouped(flat)  # (groups, GROUP), zero-padded
    scale = groups.abs().amax(dim=1) / top  # (groups,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    noise = torch.rand(groups.shape, generator=generator)
    q = torch.floor(groups / safe[:, None] + noise).clamp_(-top, top).to(torch.int8)
    q = torch.where(scale[:, None] > 0, q, torch.zeros_like(q)).flatten()[: flat.numel()]
    return (q if bits == 8 else pack_bits(q, bits)), scale


def dequantize(packed: torch.Tensor, scale: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """x^ = q s, float32 of `shape`, from `quantize`'s output. Raises ValueError when the parts do not fit."""
    levels(bits)
    numel = int(torch.Size(shape).numel())
    if bits == 8:
        if packed.dtype != torch.int8 or packed.numel() != numel:
            raise ValueError(f"8-bit values: {packed.numel()} int8, expected {numel}")
        q = packed.to(torch.float32)
    else:
        per_byte = 8 // bits
        if packed.dtype != torch.uint8 or packed.numel() != -(-numel // per_byte):
            raise ValueError(f"{bits}-bit values: {packed.numel()} bytes, expected {-(-numel // per_byte)}")
        q = unpack_bits(packed, numel, bits).to(torch.float32)
    if numel and float(q.abs().max()) > levels(bits):
        raise ValueError(f"{bits}-bit values outside [-{levels(bits)}, {levels(bits)}]")
    if scale.dtype != torch.float32 or scale.numel() != -(-numel // GROUP) or not bool(torch.isfinite(scale).all()):
        raise ValueError(f"scales: {scale.numel()} float32 values, expected {-(-numel // GROUP)} finite ones")
    return (_grouped(q) * scale.reshape(-1, 1)).flatten()[:numel].reshape(shape)


def _grouped(flat: torch.Tensor) -> torch.Tensor:
    """A flat tensor as (ceil(n / GROUP), GROUP) rows, the last padded with zeros."""
    pad = -flat.numel() % GROUP
    return torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, GROUP)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 values in [-L, L] (L = levels(bits)) -> uint8, 8 // bits values a byte, each stored as q + L + 1 in
    `bits` bits (4 bits: q + 8; 3 bits: q + 4, two a byte; 2 bits: q + 2), first value in the high bits; the last
    byte is padded with stored zeros."""
    per_byte, offset = 8 // bits, levels(bits) + 1
    u = (q.to(torch.int16) + offset).to(torch.uint8)
    pad = -u.numel() % per_byte
    u = torch.cat([u, torch.full((pad,), offset, dtype=torch.uint8)]).reshape(-1, per_byte)
    shifts = torch.arange(per_byte - 1, -1, -1, dtype=torch.uint8) * bits  # high bits first
    return (u << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `numel` int8 values."""
    per_byte, offset = 8 // bits, levels(bits) + 1
    shifts = torch.arange(per_byte - 1, -1, -1, dtype=torch.uint8) * bits
    u = (packed[:, None] >> shifts) & (2**bits - 1)  # (bytes, per_byte)
    return (u.flatten()[:numel].to(torch.int16) - offset).to(torch.int8)


def compress(
    tensors: State, reference: State, residual: State | None, kept: torch.Tensor, layout: HeadLayout, bits: int,
    generator: torch.Generator,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], State, State]:
    """A client's upload under error feedback: `tensors` (trained values, kept slices of head-split tensors) and
    `reference` (the full global state received). Returns (wire: name -> (packed values, scales), x^: the deltas
    the server will read, the new full-shaped residual e' = delta + e - x^, e the old residual, 0 when None)."""
    sent = gather_kept(reference, kept, layout)
    old = gather_kept(residual, kept, layout) if residual else {}
    wire, deltas, errors = {}, {}, {}
    for name, value in tensors.items():
        v = value.float() - sent[name].float() + old.get(name, torch.zeros((), dtype=torch.float32))
        packed, scale = quantize(v, bits, generator)
        wire[name] = (packed, scale)
        deltas[name] = dequantize(packed, scale, bits, tuple(v.shape))
        errors[name] = v - deltas[name]
    base = residual if residual else {n: torch.zeros_like(t, dtype=torch.float32) for n, t in reference.items()}
    new_residual = dict(base)
    for name, error in errors.items():
        if name in layout.sliced:
            _, dim = layout.sliced[name]
            full = base[name].clone()
            full.index_copy_(dim, layout.index_of(name, kept), error)
            new_residual[name] = full
        else:
            new_residual[name] = error
    return wire, deltas, new_residual
