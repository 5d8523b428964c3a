"""Heads: importance scores ([blocks, heads]) and pruning masks."""

from fedhead.heads.importance import head_confidence, score_heads
from fedhead.heads.pruning import kept_heads_mask

__all__ = ["head_confidence", "kept_heads_mask", "score_heads"]
