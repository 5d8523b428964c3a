"""Pruning masks: which heads a client keeps at sparsity s, given its importance scores."""

from __future__ import annotations

import math

import torch


def heads_to_keep(total: int, sparsity: float) -> int:
    """k = ceil((1 - s) * total), computed without floating-point surprises (0.9 of 72 keeps 8)."""
    return min(total, math.ceil(round((1.0 - sparsity) * total, 9)))


def sampled_scores(scores: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Gumbel-perturbed log scores: taking the top k of them samples k heads without replacement, each draw
    with probability proportional to score ** (1 / temperature).

    Used by `heads.selection = "sample"` so that clients whose confidence ranks the same heads first still
    train different heads from round to round; a temperature near 0 gives back the deterministic top k.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    uniform = torch.rand(scores.shape, generator=generator, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(uniform))
    return (scores.double().clamp_min(1e-12).log() / temperature + gumbel).to(scores.dtype)


def kept_heads_mask(
    scores: torch.Tensor, sparsity: float, scope: str = "global", min_per_block: int = 0
) -> torch.Tensor:
    """Boolean [blocks, heads] mask of the kept heads: the highest scores win, ties go to the lower index.

    scope='global': the top k = ceil((1 - s) * blocks * heads) over all heads, after first keeping the top
    `min_per_block` heads of every block. scope='per_block': the top ceil((1 - s) * heads) of each block.
    """
    blocks, heads = scores.shape
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if sparsity == 0:
        return torch.ones(blocks, heads, dtype=torch.bool)
    kept = torch.zeros(blocks, heads, dtype=torch.bool)
    if scope == "per_block":
        k = heads_to_keep(heads, sparsity)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # (blocks, k)
        return kept.scatter_(1, order, True)
    if scope != "global":
        raise ValueError(f"unknown pruning scope '{scope}'")
    floor = min(min_per_block, heads)
    if floor:
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :floor]
        kept.scatter_(1, order, True)
    k = max(heads_to_keep(blocks * heads, sparsity), int(kept.sum()))
    flat = scores.flatten().masked_fill(kept.flatten(), float("inf"))
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    kept.view(-1)[order] = True
    return kept


def rolling_heads_mask(blocks: int, heads: int, sparsity: float, round_: int, client: int,
                       shared: bool = False) -> torch.Tensor:
    """FedRolex-style rolling window (Alam et al. 2022), per block: client c in round t keeps the
    k = ceil((1 - s) * H) heads  (start + j) mod H, j = 0..k-1, with start = ((t + c) * k) mod H, or with
    `shared` FedRolex's own start = t mod H for every client (its sub-model index roll = round mod size).

    Per client, consecutive clients of a round take adjacent windows and every window moves by k heads a round;
    shared, the round's clients all train the same heads and the window moves by one head a round. Either way
    each head is trained equally often over the rounds whatever the clients' data say about it.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    k = heads_to_keep(heads, sparsity)
    start = round_ % heads if shared else ((round_ + client) * k) % heads
    window = (start + torch.arange(k)) % heads
    kept = torch.zeros(blocks, heads, dtype=torch.bool)
    kept[:, window] = True
    return kept


def coverage_heads_mask(scores: torch.Tensor, counts: torch.Tensor, sparsity: float, pool: float) -> torch.Tensor:
    """Coverage-balanced choice, per block: among the client's acceptable heads (its top
    m = max(k, ceil(pool * H)) by score), keep the k = ceil((1 - s) * H) that the server has seen trained least
    often so far (`counts`), ties by higher score then lower index.

    scores: [blocks, heads] this client's importance; counts: [blocks, heads] how many accepted client updates
    have trained each head before this round (the server's `ClientStats.head_counts`). pool = 1 ignores the
    scores but for ties; pool <= 1 - s is the plain top-k of `kept_heads_mask`.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0 < pool <= 1:
        raise ValueError(f"pool must be in (0, 1], got {pool}")
    if counts.shape != scores.shape:
        raise ValueError(f"counts {tuple(counts.shape)} and scores {tuple(scores.shape)} differ in shape")
    blocks, heads = scores.shape
    k = heads_to_keep(heads, sparsity)
    m = max(k, min(heads, math.ceil(round(pool * heads, 9))))
    acceptable = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :m]  # (blocks, m) by score
    # stable sort of the score-ordered candidates by count: fewest trainings first, ties keep the score order
    by_count = torch.sort(counts.gather(1, acceptable), dim=1, stable=True).indices[:, :k]
    return torch.zeros(blocks, heads, dtype=torch.bool).scatter_(1, acceptable.gather(1, by_count), True)


def consensus_heads_mask(kept: torch.Tensor, scores: torch.Tensor, sparsity: float,
                         scope: str = "per_block") -> torch.Tensor:
    """The heads a pruned global model keeps: those the clients kept most often.

    kept: bool [N, blocks, heads], the kept-head masks of N client updates (e.g. every update of the last rounds);
    scores: [N, blocks, heads], their head scores in [0, 1]. Head h is ranked by its keep frequency
    f_h = (1/N) sum_n kept[n, h], ties broken by its mean score (s_h / (N + 1) < 1/N, so a tie-break never
    overturns a frequency; with a rolling schedule every head is kept equally often and the mean score
    decides); the top ceil((1 - sparsity) * ...) are kept as `kept_heads_mask` keeps them.
    """
    if kept.dim() != 3 or kept.shape != scores.shape:
        raise ValueError(f"kept and scores must both be [N, blocks, heads], got {tuple(kept.shape)} and "
                         f"{tuple(scores.shape)}")
    n = kept.shape[0]
    frequency = kept.double().mean(0)
    ranking = frequency + scores.double().clamp(0, 1).mean(0) / (n + 1)
    return kept_heads_mask(ranking, sparsity, scope)
