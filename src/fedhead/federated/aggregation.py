"""Server aggregation of client updates into the next global state.

Head-specific weighted aggregation (the Assortment-of-Heads paper's second mechanism). For each head-sliced
tensor slice x[b, h]:

    x_{t+1}[b, h] = sum_{c kept (b, h)} w_c(b, h) x_c[b, h] / sum_{c kept (b, h)} w_c(b, h)

with w_c(b, h) = n_c ('data_size'), conf_c(b, h) ('importance') or n_c * conf_c(b, h) ('product'). A head no
client kept keeps its previous value; a head whose weights are all zero falls back to n_c. Shared tensors are
averaged with weights n_c (FedAvg). 'fedavg' is head_weighted with data_size weights: at sparsity 0 it is the
dense FedAvg baseline exactly. Under grouped-query attention a key/value unit (shared by several query heads)
gets, per client, the mean of its query heads' weights (0 for the heads the client pruned), so every client
that kept any of them counts.

Robust options for faulty or malicious clients: 'median' (coordinate-wise median; of an even count of values
the lower middle one, torch.nanmedian's convention, where Flower's FedMedian averages the two) and 'trimmed_mean'
(coordinate-wise mean after cutting c = max(1, floor(n * trim_fraction)) of the lowest and of the highest
values; Yin et al. 2018), each over the n clients that kept the head, unweighted. Head pruning leaves some heads
with few values, where a plain median of 2 is one client's choice and a 20% trim of 4 cuts nothing; so a
coordinate with n < 3 values keeps its previous value. Breakdown point (attackers a coordinate tolerates with
its value still bounded by honest ones): median floor((n - 1) / 2), trimmed mean c, with n >= 3 either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fedhead.federated.payload import ClientUpdate
from fedhead.federated.state import State
from fedhead.models.head_map import HeadLayout, head_index

MIN_ROBUST_VALUES = 3  # fewer values of a coordinate than this: robust aggregation keeps the previous value
WEIGHTED = ("fedavg", "head_weighted")
ROBUST = ("median", "trimmed_mean")
ROBUST_CHUNK_BYTES = 64 * 2**20  # robust aggregation's working set (K values of a chunk of coordinates, float64)


def head_weights(updates: list[ClientUpdate], block: int, weighting: str) -> torch.Tensor:
    """w_c(b, h) for every client c and head h of `block`, zero where c did not keep h: (C, H) float64.

    The all-zero fallback (a head kept by someone whose weights are all zero gets n_c) is applied over the
    given clients; `WeightedSum` applies it over the clients folded so far, with the same result."""
    w = torch.stack([client_head_weights(u, block, weighting) for u in updates])  # (C, H)
    if weighting != "data_size":
        fallback = torch.stack([client_head_weights(u, block, "data_size") for u in updates])  # n_c * kept
        zero = (w.sum(0) == 0) & (fallback.sum(0) > 0)  # kept by someone, but all weights zero
        w[:, zero] = fallback[:, zero]
    return w


def client_head_weights(update: ClientUpdate, block: int, weighting: str) -> torch.Tensor:
    """w_c(b, h) of one client for the heads of `block`, zero where it did not keep h: (H,) float64."""
    kept = update.kept_heads[block].to(torch.float64)  # (H,)
    size = float(update.num_examples)
    if weighting == "data_size":
        return size * kept
    conf = update.head_scores[block].to(torch.float64)  # (H,)
    return (conf if weighting == "importance" else size * conf) * kept


class WeightedSum:
    """Running head-weighted sums of client updates (fedavg and head_weighted): `fold` one update at a time,
    `result` the next global state. Memory: one float64 numerator of the state's shape and per-head totals,
    whatever the number of clients; an update can be let go once folded.

    For a head-sliced tensor, head h of block b (its rows, or under grouped-query attention its key/value unit's
    rows, counted once per query head of the unit):

        N[b, h] = sum_c w_c(b, h) x_c[b, h],   W[b, h] = sum_c w_c(b, h),   F[b, h] = sum_c n_c [c kept h]
        x_{t+1}[b, u] = sum_{h in u} N[b, h] / sum_{h in u} W'[b, h],   W' = W where W > 0, else F

    (one unit per head without grouping). A head all of whose weights so far are zero accumulates the fallback
    numerator sum_c n_c x_c[b, h] in N instead; the first non-zero weight clears it and starts the weighted sum,
    so a single numerator serves both. A unit with no weight keeps its previous value. Shared tensors:
    x_{t+1} = sum_c n_c x_c / sum_c n_c.
    """

    def __init__(self, global_state: State, layout: HeadLayout, weighting: str = "data_size") -> None:
        if weighting not in ("data_size", "importance", "product"):
            raise ValueError(f"unknown aggregation weighting '{weighting}'")
        self.global_state, self.layout, self.weighting = global_state, layout, weighting
        self.numerators = {name: torch.zeros(self._numerator_shape(name, v), dtype=torch.float64)
                           for name, v in global_state.items()}
        blocks, heads = layout.num_blocks, layout.num_heads
        self.head_totals = torch.zeros(blocks, heads, dtype=torch.float64)  # W
        self.fallback_totals = torch.zeros(blocks, heads, dtype=torch.float64)  # F
        self.shared_total = 0.0  # sum_c n_c
        self.kept_any: torch.Tensor | None = None  # bool [blocks, heads]: heads some folded client kept
        self.count = 0
        self._by_block: dict[int, list[str]] = {}
        for name, (block, _) in layout.sliced.items():
            if name in global_state:
                self._by_block.setdefault(block, []).append(name)

    def _numerator_shape(self, name: str, value: torch.Tensor) -> list[int]:
        shape = list(value.shape)
        if name in self.layout.sliced:  # one slot per query head along the split dimension
            _, dim = self.layout.sliced[name]
            shape[dim] = self.layout.num_heads * self.layout.unit_of(name)
        return shape

    def fold(self, update: ClientUpdate) -> None:
        """Add one (well-formed, screened) update to the running sums."""
        size = float(update.num_examples)
        coefficients = {}  # block -> (H,) this client's coefficient of each head's numerator slot
        for block, names in self._by_block.items():
            w = client_head_weights(update, block, self.weighting)  # (H,)
            fallback = client_head_weights(update, block, "data_size")  # (H,)
            weighted = self.head_totals[block] > 0
            starting = ~weighted & (w > 0)  # first non-zero weight of the head: drop its fallback sum
            for name in names:
                _, dim = self.layout.sliced[name]
                idx = head_index(starting.nonzero().flatten(), self.layout.unit_of(name))
                self.numerators[name].index_fill_(dim, idx, 0.0)
            coefficients[block] = torch.where(weighted | (w > 0), w, fallback)
            self.head_totals[block] += w
            self.fallback_totals[block] += fallback
        for name, numerator in self.numerators.items():
            if name not in self.layout.sliced:
                numerator.add_(update.tensors[name], alpha=size)  # in float64
                continue
            x = update.tensors[name].to(torch.float64)
            block, dim = self.layout.sliced[name]
            heads, rows = self._head_rows(name, x, update.kept_heads[block])
            coef = coefficients[block][heads].repeat_interleave(self.layout.unit_of(name))  # (heads * unit,)
            shape = [1] * x.dim()
            shape[dim] = -1
            numerator.index_add_(dim, head_index(heads, self.layout.unit_of(name)), rows * coef.view(shape))
        self.shared_total += size
        self.kept_any = update.kept_heads.clone() if self.kept_any is None else self.kept_any | update.kept_heads
        self.count += 1

    def _head_rows(self, name: str, x: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The query heads of the units `x` holds (the kept units of `kept`, bool [H]) and x's rows repeated for
        each of them along the split dimension: (heads,), (..., heads * unit, ...)."""
        _, dim = self.layout.sliced[name]
        group, unit = self.layout.group_of(name), self.layout.unit_of(name)
        if group == 1:
            return kept.nonzero().flatten(), x
        units = kept.reshape(-1, group).any(-1).nonzero().flatten()  # (n,)
        heads = (units[:, None] * group + torch.arange(group)[None, :]).reshape(-1)  # (n * group,)
        rows = x.unflatten(dim, (len(units), unit)).repeat_interleave(group, dim).flatten(dim, dim + 1)
        return heads, rows

    def result(self) -> State:
        """The next global state (see the class docstring); the global state itself when nothing was folded.
        Call it once: it releases each numerator as soon as that tensor's result is made (peak: the numerators
        plus the result, not both whole in float64)."""
        if self.count == 0:
            return {k: v.clone() for k, v in self.global_state.items()}
        if len(self.numerators) < len(self.global_state):
            raise RuntimeError("WeightedSum.result() was already called: it consumes the sums")
        totals = torch.where(self.head_totals > 0, self.head_totals, self.fallback_totals)  # W', (B, H)
        new: State = {}
        for name, previous in self.global_state.items():
            numerator = self.numerators.pop(name)
            if name not in self.layout.sliced:
                new[name] = (numerator / self.shared_total).to(previous.dtype)
                continue
            block, dim = self.layout.sliced[name]
            group, unit = self.layout.group_of(name), self.layout.unit_of(name)
            heads = self.layout.num_heads
            by_unit = numerator.unflatten(dim, (heads // group, group, unit)).sum(dim + 1).flatten(dim, dim + 1)
            total = totals[block].view(-1, group).sum(-1).repeat_interleave(unit)  # (units * unit,)
            shape = [1] * previous.dim()
            shape[dim] = -1
            total = total.view(shape)
            mean = by_unit / total.clamp(min=1e-300)
            new[name] = torch.where(total > 0, mean, previous.to(torch.float64)).to(previous.dtype)
        return new


class HeldUpdates:
    """The robust methods' accumulator: `fold` keeps each update (a coordinate's median or trimmed mean needs every
    client's value), `result` is `robust_aggregate` over them, by chunks. Memory: the updates as received."""

    def __init__(self, global_state: State, layout: HeadLayout, method: str, trim_fraction: float = 0.2) -> None:
        self.global_state, self.layout, self.method, self.trim_fraction = global_state, layout, method, trim_fraction
        self.updates: list[ClientUpdate] = []

    def fold(self, update: ClientUpdate) -> None:
        """Keep `update` for the result."""
        self.updates.append(update)

    def result(self) -> State:
        """The coordinate-wise median or trimmed mean of the kept updates (the global state when there is none)."""
        if not self.updates:
            return {k: v.clone() for k, v in self.global_state.items()}
        return robust_aggregate(self.global_state, self.updates, self.layout, self.method, self.trim_fraction)


def aggregator(global_state: State, layout: HeadLayout, method: str = "fedavg", weighting: str = "product",
               trim_fraction: float = 0.2) -> WeightedSum | HeldUpdates:
    """The accumulator of `method` (`fold(update)` each update as it arrives, then `result()` once): a running
    `WeightedSum` for fedavg and head_weighted, `HeldUpdates` for median and trimmed_mean. Raises ValueError on an
    unknown method or weighting."""
    if method in ROBUST:
        return HeldUpdates(global_state, layout, method, trim_fraction)
    if method not in WEIGHTED:
        raise ValueError(f"unknown aggregation '{method}'")
    return WeightedSum(global_state, layout, "data_size" if method == "fedavg" else weighting)


def robust_aggregate(
    global_state: State, updates: Sequence[ClientUpdate], layout: HeadLayout, method: str,
    trim_fraction: float = 0.2, chunk_bytes: int = ROBUST_CHUNK_BYTES,
) -> State:
    """Coordinate-wise median or trimmed mean, per head slice over the clients that kept it.

    The K updates must all be at hand (a coordinate's value needs every client's): memory is the updates as
    received plus a working set of about 4 x K x chunk x 8 bytes (the values of one chunk of coordinates, float64,
    their order and masks), chunk chosen so that K x chunk x 8 <= chunk_bytes / 4 (at least one row).
    """
    new: State = {}
    for name, previous in global_state.items():
        dim = layout.sliced[name][1] if name in layout.sliced else None
        flat_previous = _split_axis_first(previous.double(), dim)  # (S, M): the split axis first, the rest flat
        rows, columns = flat_previous.shape
        step = max(1, chunk_bytes // (4 * 8 * max(len(updates), 1) * max(rows, 1)))
        out = torch.empty(rows, columns, dtype=torch.float64)
        for start in range(0, columns, step):
            stop = min(columns, start + step)
            stacked = torch.full((len(updates), rows, stop - start), float("nan"), dtype=torch.float64)  # (C, S, m)
            for c, u in enumerate(updates):
                sent = _split_axis_first(u.tensors[name], dim)[:, start:stop].double()  # (kept rows, m)
                if dim is None:
                    stacked[c] = sent
                else:
                    stacked[c].index_copy_(0, layout.index_of(name, u.kept_heads), sent)
            out[:, start:stop] = _robust_values(stacked, flat_previous[:, start:stop], method, trim_fraction)
        if dim is None:
            new[name] = out.reshape(previous.shape).to(previous.dtype)
        else:
            moved = list(previous.movedim(dim, 0).shape)
            new[name] = out.reshape(moved).movedim(0, dim).to(previous.dtype)
    return new


def _split_axis_first(tensor: torch.Tensor, dim: int | None) -> torch.Tensor:
    """A 2-D view (a copy only for a non-contiguous layout of more than 2 dimensions): the head-split axis `dim`
    first and the other axes flattened, (S, M); a shared tensor (dim None) as one row, (1, numel)."""
    if dim is None:
        return tensor.reshape(1, -1)
    moved = tensor.movedim(dim, 0)
    return moved[:, None] if moved.dim() == 1 else moved.flatten(1)


def _robust_values(stacked: torch.Tensor, previous: torch.Tensor, method: str, trim_fraction: float) -> torch.Tensor:
    """Median or trimmed mean over dim 0 of `stacked` (C, ...; NaN: not kept), `previous` below 3 values."""
    count = (~torch.isnan(stacked)).sum(0)  # (...)
    if method == "median":
        value = torch.nanmedian(stacked, dim=0).values
    else:
        ordered = torch.sort(stacked, dim=0).values  # NaN sort last
        cut = torch.floor(count * trim_fraction).clamp(min=1)
        rank = torch.arange(stacked.shape[0], dtype=torch.float64).view(-1, *([1] * (stacked.dim() - 1)))
        inside = (rank >= cut) & (rank < count - cut)
        value = torch.where(inside, ordered, 0.0).sum(0) / (count - 2 * cut).clamp(min=1)
    return torch.where(count >= MIN_ROBUST_VALUES, value, previous)


def aggregate(
    global_state: State,
    updates: Iterable[ClientUpdate],
    layout: HeadLayout,
    method: str = "fedavg",
    weighting: str = "product",
    trim_fraction: float = 0.2,
) -> State:
    """The next global state from the clients' updates (see the module docstring).

    Args:
        global_state: name -> tensor, the state the clients received.
        updates: the round's screened updates; for fedavg and head_weighted any iterable, read once and folded
            one at a time (`WeightedSum`): a generator keeps the server's memory independent of their number.
        layout: which tensors are split by heads.
        method: "fedavg", "head_weighted", "median" or "trimmed_mean".
        weighting: head_weighted's w_c(b, h): "data_size", "importance" or "product" (default).
        trim_fraction: trimmed_mean's cut fraction (default 0.2).
    Returns:
        The next global state, each tensor in its previous dtype.
    Raises:
        ValueError: an unknown method or weighting.
    """
    total = aggregator(global_state, layout, method, weighting, trim_fraction)
    for update in updates:
        total.fold(update)
        del update  # let it go before the next one is read
    return total.result()
