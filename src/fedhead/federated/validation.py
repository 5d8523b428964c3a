"""Server-side checks of client updates before aggregation.

A server receives updates from devices it does not control: every update is checked against the global
state and the head layout (names, shapes, dtypes, kept-head mask, scores in [0, 1], finite values, a positive
data size) and against a bound on its norm. A rejected update is excluded from the round with its reason;
the run goes on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedhead.federated.payload import ClientUpdate
from fedhead.federated.state import State
from fedhead.models.head_map import HeadLayout

MAX_LOSS = 1e4  # a cross-entropy above this is no loss a model reports: it would only steer loss-gap selection


@dataclass
class Rejection:
    """An update that was excluded, and why."""

    client_id: int
    reason: str


def check_update(update: ClientUpdate, global_state: State, layout: HeadLayout,
                 max_examples: int = 10**9) -> str | None:
    """The first problem with `update`, or None when it is well formed (an integer client id, a data size in
    [1, max_examples]). Integers are integers: 3.7, 2.0, true or "2" are refused, never rounded."""
    shape = (layout.num_blocks, layout.num_heads)
    if not _is_integer(update.client_id):
        return f"client id must be an integer, got {str(update.client_id)[:40]!r}"
    n = update.num_examples
    if not _is_integer(n) or not 1 <= n <= max_examples:
        return f"data size must be an integer in [1, {max_examples}], got {str(n)[:40]}"
    if not isinstance(update.kept_heads, torch.Tensor) or update.kept_heads.dtype != torch.bool:
        return "kept_heads must be a boolean tensor"
    if tuple(update.kept_heads.shape) != shape:
        return f"kept_heads has shape {tuple(update.kept_heads.shape)}, expected {shape} (head index out of range)"
    scores = update.head_scores
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != shape or not scores.is_floating_point():
        return f"head_scores must be a float tensor of shape {shape}"
    if not torch.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1:
        return "head_scores must lie in [0, 1]"
    for name in ("loss_before", "loss_after", "train_loss"):
        value = getattr(update, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_LOSS:
            return f"{name} must be a cross-entropy in [0, {MAX_LOSS:g}], got {str(value)[:40]}"
    missing = sorted(set(global_state) - set(update.tensors))
    extra = sorted(set(update.tensors) - set(global_state))
    if missing or extra:
        return f"wrong tensor names (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, tensor in update.tensors.items():
        reference = global_state[name]
        expected = list(reference.shape)
        if name in layout.sliced:
            _, dim = layout.sliced[name]
            expected[dim] = layout.index_of(name, update.kept_heads).numel()  # kept heads (or kv units) * d
        if list(tensor.shape) != expected:
            return f"{name}: shape {list(tensor.shape)}, expected {expected}"
        if tensor.dtype != reference.dtype:
            return f"{name}: dtype {tensor.dtype}, expected {reference.dtype}"
        if not torch.isfinite(tensor).all():
            return f"{name}: NaN or Inf values"
    return None


def _is_integer(value: object) -> bool:
    """An int and not a bool (Python's True is an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def update_norm(update: ClientUpdate, global_state: State, layout: HeadLayout) -> float:
    """L2 norm of (trained - received) over every value the client sent."""
    from fedhead.models.slicing import gather_kept

    received = gather_kept(global_state, update.kept_heads, layout)
    total = sum(float(((update.tensors[n].double() - received[n].double()) ** 2).sum()) for n in update.tensors)
    return math.sqrt(total)


def clip_update(update: ClientUpdate, global_state: State, layout: HeadLayout, bound: float) -> ClientUpdate:
    """A copy of `update` whose difference from the received state is scaled to norm at most `bound`."""
    from fedhead.models.slicing import gather_kept

    norm = update_norm(update, global_state, layout)
    if norm <= bound:
        return update
    scale = bound / norm
    received = gather_kept(global_state, update.kept_heads, layout)
    tensors = {n: received[n] + (t - received[n]) * scale for n, t in update.tensors.items()}
    return ClientUpdate(update.client_id, update.num_examples, update.kept_heads, update.head_scores, tensors,
                        update.loss_before, update.loss_after, update.train_loss, update.stats, update.timings)


def screen_one(
    update: ClientUpdate,
    global_state: State,
    layout: HeadLayout,
    *,
    max_norm: float | None = None,
    norm_action: str = "reject",
    max_examples: int = 10**9,
    extra_check: Callable[[ClientUpdate], str | None] | None = None,
) -> tuple[ClientUpdate, float, str | None]:
    """One update's screen, without the round's outlier test: (the update, clipped where asked; its norm; the
    problem, or None when accepted). `extra_check(update)` adds the caller's own checks."""
    try:
        problem = check_update(update, global_state, layout, max_examples=max_examples)
        if problem is None and extra_check is not None:
            problem = extra_check(update)
        norm = update_norm(update, global_state, layout) if problem is None else 0.0
        if problem is None and not math.isfinite(norm):
            problem = "update norm is not finite"
    except Exception as err:  # noqa: BLE001 - a malformed update must never stop the server
        return update, 0.0, f"malformed update: {type(err).__name__}: {err}"
    if problem is None and max_norm is not None and norm > max_norm:
        if norm_action == "reject":
            problem = f"update norm {norm:.4g} exceeds {max_norm:.4g}"
        else:
            update, norm = clip_update(update, global_state, layout, max_norm), max_norm
    return update, norm, problem


def norm_outliers(norms: list[float], outlier_factor: float) -> dict[int, str]:
    """Position -> reason of each norm over `outlier_factor` x the median of `norms` (none below 3 norms)."""
    if len(norms) < 3:
        return {}
    median = float(torch.tensor(norms).median())
    return {j: f"update norm {n:.4g} is over {outlier_factor}x the round's median {median:.4g}"
            for j, n in enumerate(norms) if n > outlier_factor * median}


def screen_indexed(
    updates: list[ClientUpdate],
    global_state: State,
    layout: HeadLayout,
    *,
    max_norm: float | None = None,
    norm_action: str = "reject",
    outlier_factor: float | None = None,
    max_examples: int = 10**9,
    extra_check: Callable[[int, ClientUpdate], str | None] | None = None,
) -> tuple[list[int], list[ClientUpdate], list[tuple[int, str]]]:
    """The positions in `updates` of the accepted ones, those updates (clipped where asked: a clipped update is a
    new object, so callers keep clients by position), and (position, reason) for each rejected one.
    `extra_check(position, update)` adds the caller's own checks (e.g. what the server knows of the client)."""
    positions: list[int] = []
    accepted: list[ClientUpdate] = []
    norms: list[float] = []
    rejected: list[tuple[int, str]] = []
    for i, update in enumerate(updates):
        check = None if extra_check is None else (lambda u, i=i: extra_check(i, u))
        update, norm, problem = screen_one(update, global_state, layout, max_norm=max_norm, norm_action=norm_action,
                                           max_examples=max_examples, extra_check=check)
        if problem is not None:
            rejected.append((i, problem))
            continue
        positions.append(i)
        accepted.append(update)
        norms.append(norm)
    if outlier_factor is not None:
        outliers = norm_outliers(norms, outlier_factor)
        rejected += [(positions[j], reason) for j, reason in outliers.items()]
        positions = [p for j, p in enumerate(positions) if j not in outliers]
        accepted = [u for j, u in enumerate(accepted) if j not in outliers]
    return positions, accepted, rejected


def screen_updates(
    updates: list[ClientUpdate],
    global_state: State,
    layout: HeadLayout,
    *,
    max_norm: float | None = None,
    norm_action: str = "reject",
    outlier_factor: float | None = None,
) -> tuple[list[ClientUpdate], list[Rejection]]:
    """Split updates into accepted (clipped where asked) and rejected ones with their reasons."""
    _, accepted, rejected = screen_indexed(updates, global_state, layout, max_norm=max_norm,
                                           norm_action=norm_action, outlier_factor=outlier_factor)
    return accepted, [Rejection(updates[i].client_id, reason) for i, reason in rejected]


def receive_update(blob: bytes, max_bytes: int | None = None) -> tuple[ClientUpdate | None, str | None]:
    """Decode a client's payload; (None, reason) for bytes that are not a well-formed fedhead update (a deflated
    one that would inflate beyond `max_bytes` included: `fedhead.federated.payload.inflated`)."""
    from fedhead.federated.payload import decode_update

    try:
        return decode_update(blob, max_bytes), None
    except Exception as err:  # noqa: BLE001 - any bytes may arrive
        return None, f"undecodable payload: {type(err).__name__}: {err}"
