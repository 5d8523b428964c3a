"""A client's head plan: which heads it trains, which its working copy computes with and without autograd.

`heads.mode` is decoded here and nowhere else (`head_plan`, the table in its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedhead.config import HeadsSection
from fedhead.heads.pruning import kept_heads_mask


@dataclass(frozen=True)
class HeadPlan:
    """Three bool [blocks, heads] masks of one client's round; a head in neither `computed` nor `side` is sliced
    out of the working copy (`prune_heads_`).

    kept: trained, and their slices uploaded.
    computed: in the working copy's forward and autograd graph (kept is a subset); computed but not kept: frozen.
    side: in the forward without autograd (`attach_frozen_heads`); disjoint from computed.
    """

    kept: torch.Tensor
    computed: torch.Tensor
    side: torch.Tensor


def head_plan(heads: HeadsSection, sparsity: float, kept: torch.Tensor, ranking: torch.Tensor) -> HeadPlan:
    """Decode `heads.mode` into the round's `HeadPlan`, for a client that keeps `kept` at `sparsity`.

    With K = kept, c = min(heads.compute_sparsity, sparsity) and top(c) = the heads `kept_heads_mask` keeps at
    sparsity c by `ranking` (heads.scope, heads.min_heads_per_block), top(c) = K when c >= sparsity:

        mode                              kept   computed (autograd)   side (no autograd)   sliced out
        remove                            K      K                     -                    not K
        train_sparse                      K      every head            -                    -
        sparse_backward                   K      K                     not K                -
        mixed                             K      K | top(c)            -                    the rest
        mixed, frozen_autograd = false    K      K                     top(c) & not K       the rest

    Args:
        heads: the options read: mode, compute_sparsity, frozen_autograd, scope, min_heads_per_block.
        sparsity: the client's sparsity this round, in [0, 1).
        kept: bool [blocks, heads], the heads the client trains (its schedule's choice).
        ranking: [blocks, heads], the scores (or sampled scores) `kept` was chosen by.

    Returns:
        HeadPlan(kept, computed, side).
    """
    nothing = torch.zeros_like(kept)
    if heads.mode == "remove":
        return HeadPlan(kept, kept, nothing)
    if heads.mode == "train_sparse":
        return HeadPlan(kept, torch.ones_like(kept), nothing)
    if heads.mode == "sparse_backward":
        return HeadPlan(kept, kept, ~kept)
    if heads.mode != "mixed":
        raise ValueError(f"unknown heads.mode '{heads.mode}'")
    removed = min(heads.compute_sparsity, sparsity)
    top = kept if removed >= sparsity else kept_heads_mask(ranking, removed, heads.scope, heads.min_heads_per_block)
    if heads.frozen_autograd:
        return HeadPlan(kept, top | kept, nothing)
    return HeadPlan(kept, kept, top & ~kept)
