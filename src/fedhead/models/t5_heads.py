"""Head pruning for T5 attention (transformers 5 dropped `prune_heads` and T5's `pruned_heads` bookkeeping).

`prune_heads_` slices the q/k/v output rows and the o input columns of a block; `set_t5_heads` then turns the
block's `T5Attention` into a `PrunedT5Attention` (same module, `__class__` swapped, so parameter names, peft
LoRA layers and isinstance checks are unchanged) that computes with its kept heads only.

The relative position bias is the catch. T5 computes it once per stack, in block 0 (the only block with a
`relative_attention_bias` Embedding [num_buckets, H]), as a (1, H, q, k) tensor, and every later block of the
stack reuses the tensor that block 0 returned; cross-attention likewise reuses the zeros (1, H, q, k) that the
first cross-attention block created. Blocks keep different heads, so the tensor that flows between blocks stays
full-width (all H original heads) and each pruned block selects the rows of its own kept heads before adding it
to its scores:

- block 0 keeps the full Embedding; its `compute_bias` returns the kept rows for its own attention and stashes
  the full-width bias, which `forward` returns for the later blocks;
- a later block receives the full-width bias, attends with `position_bias[:, kept]` and passes the full-width
  tensor on unchanged;
- a first cross-attention block returns full-width zeros.

In transformers 5 the attention mask is not merged into the position bias: the attention function receives it
separately and adds it (eager) or combines it with the bias (sdpa), so the selection touches only the bias.

A block that keeps no head never calls q/k/v: its context is (B, q, 0) and `o` maps it to zeros (T5's `o` has
no bias), exactly what gating all its heads to zero gives. It still computes and passes on the full-width bias
when it is the first block of its stack, and it still writes a (B, 1, T, 1) placeholder into a `DynamicCache`
so that the cache's sequence length (which T5 reads from layer 0 for the causal mask and the relative positions
during generation) stays right. Caches that preallocate one slot per configured head (StaticCache) are not
supported for pruned blocks.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.t5.modeling_t5 import T5Attention


class PrunedT5Attention(T5Attention):
    """A `T5Attention` with `n_heads` of its `full_heads` original heads; `kept_index` lists them (buffer)."""

    full_heads: int
    kept_index: torch.Tensor

    def compute_bias(self, query_length, key_length, device=None, past_seen_tokens=0):
        """The kept heads' rows of the relative position bias; the full-width bias is stashed for `forward`."""
        full = super().compute_bias(query_length, key_length, device=device, past_seen_tokens=past_seen_tokens)
        self._full_position_bias = full  # (1, H_full, q, k), returned by forward to the later blocks
        return full.index_select(1, self.kept_index.to(full.device))  # (1, H_kept, q, k)

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, **kwargs):
        # hidden_states: (B, q, d_model); position_bias: None (first block of the stack) or (1|B, H_full, q, k)
        if self.n_heads == 0:
            return self._forward_without_heads(hidden_states, key_value_states, position_bias, cache)
        local_bias = None
        if position_bias is not None:
            local_bias = position_bias.index_select(1, self.kept_index.to(position_bias.device))  # (1|B, H_kept, q, k)
        output, local_bias, weights = super().forward(
            hidden_states, mask=mask, key_value_states=key_value_states, position_bias=local_bias, cache=cache,
            **kwargs,
        )  # output: (B, q, d_model); local_bias: (1|B, H_kept, q, k); weights: (B, H_kept, q, k) or None
        if position_bias is None:  # first block of its stack: hand the later blocks a full-width bias
            position_bias = self.__dict__.pop("_full_position_bias", None)  # set by compute_bias
            if position_bias is None:  # no relative bias (cross-attention): T5 passes zeros on
                position_bias = local_bias.new_zeros((local_bias.shape[0], self.full_heads, *local_bias.shape[2:]))
                position_bias.requires_grad_(local_bias.requires_grad)  # (1, H_full, q, k)
        return output, position_bias, weights

    def _forward_without_heads(self, hidden_states, key_value_states, position_bias, cache):
        batch, query_length = hidden_states.shape[:2]
        is_cross_attention = key_value_states is not None
        past_seen_tokens = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        if isinstance(past_seen_tokens, torch.Tensor):
            past_seen_tokens = past_seen_tokens.clone()
        key_length = key_value_states.shape[1] if is_cross_attention else past_seen_tokens + query_length
        if cache is not None:
            self._update_cache_placeholder(hidden_states, key_length if is_cross_attention else query_length,
                                           cache, is_cross_attention)
        if position_bias is None:  # first block of its stack: compute what the later blocks need
            if self.has_relative_attention_bias:
                position_bias = T5Attention.compute_bias(
                    self, query_length, key_length, device=hidden_states.device, past_seen_tokens=past_seen_tokens
                )  # (1, H_full, q, k)
            else:
                position_bias = hidden_states.new_zeros((1, self.full_heads, query_length, key_length))
        context = hidden_states.new_zeros((batch, query_length, 0))  # (B, q, 0): no head contributes
        output = self.o(context)  # (B, q, d_model), all zeros
        weights = None
        if self.config._attn_implementation == "eager":  # eager returns probabilities: keep one entry per block
            weights = hidden_states.new_zeros((batch, 0, query_length, key_length))  # (B, 0, q, k)
        return output, position_bias, weights

    def _update_cache_placeholder(self, hidden_states, length, cache, is_cross_attention) -> None:
        """Advance the cache by `length` tokens with a (B, 1, length, 1) placeholder (an empty tensor would read
        as an empty cache: DynamicLayer.get_seq_length is 0 when its keys have no element)."""
        layer_idx = self.layer_idx
        if layer_idx is None:  # T5Stack numbers its blocks; a cache is indexed by that number
            raise ValueError("a T5Attention without layer_idx cannot use a cache")
        if isinstance(cache, EncoderDecoderCache):
            if is_cross_attention:
                if cache.is_updated.get(layer_idx):
                    return
                cache.is_updated[layer_idx] = True
                layer_cache = cache.cross_attention_cache
            else:
                layer_cache = cache.self_attention_cache
        else:
            layer_cache = cache
        placeholder = hidden_states.new_zeros((hidden_states.shape[0], 1, length, 1))  # (B, 1, T, 1)
        layer_cache.update(placeholder, placeholder, layer_idx)


def set_t5_heads(attention: Any, kept: torch.Tensor) -> None:
    """Make `attention` (a T5Attention whose q/k/v/o `prune_heads_` already sliced) compute with the heads
    where `kept` (bool [H]) is True; the relative position bias stays consistent across the stack's blocks."""
    if not isinstance(attention, T5Attention):
        raise TypeError(f"expected a T5Attention, got {type(attention).__name__}")
    if isinstance(attention, PrunedT5Attention):
        raise ValueError("this T5Attention is already pruned; prune the full model instead")
    kept = kept.detach().to("cpu", torch.bool).flatten()
    if kept.numel() != attention.n_heads:
        raise ValueError(f"kept has {kept.numel()} entries, the attention has {attention.n_heads} heads")
    k, d = int(kept.sum()), attention.key_value_proj_dim
    for name in ("q", "k", "v"):
        out_features = getattr(getattr(attention, name), "out_features", None)
        if out_features is not None and out_features != k * d:
            raise ValueError(f"{name} has {out_features} outputs, expected {k * d}: slice it first (prune_heads_)")
    device = next((p.device for p in attention.parameters()), torch.device("cpu"))
    full_heads = attention.n_heads
    attention.__class__ = PrunedT5Attention
    pruned = cast(PrunedT5Attention, attention)  # the same module, its class swapped
    pruned.full_heads = full_heads
    pruned.register_buffer("kept_index", kept.nonzero().flatten().to(device), persistent=False)  # (H_kept,)
    pruned.n_heads = k
    pruned.inner_dim = k * d
