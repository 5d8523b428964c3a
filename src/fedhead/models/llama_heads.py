"""Head pruning for LLaMA-style attention with grouped-query attention (LLaMA, Mistral, Qwen2).

A block has H query heads and G key/value heads; KV head g serves the query heads g*group..(g+1)*group-1
(group = H // G). `prune_heads_` slices the q rows and o columns of the kept query heads and the k/v rows of the
kept KV units (a unit survives while any of its query heads does); `set_llama_heads` then turns the block's
attention module into a pruned one (same module, `__class__` swapped, so parameter names, peft LoRA layers and
isinstance checks are unchanged) that computes q (B, k, T, d) and k/v (B, m, T, d) for its k kept query heads
and m kept units, caches k/v per kept unit, and gives each kept query head its unit's keys and values by
`index_select` (`kv_index`, a buffer). The kept query heads of one unit need not be contiguous or equally many,
so `repeat_kv` cannot do it: the module sets `num_key_value_groups = 1` for the attention function.

A block that keeps no head never calls q/k/v: its context is (B, T, 0) and `o_proj` maps it to zeros (or to
o's bias), exactly what gating all its heads to zero gives. It still writes a (B, 1, T, 1) placeholder into the
cache, so that the cache's sequence length (which the model reads from layer 0 for positions and the causal
mask during generation) stays right. Caches that preallocate one slot per configured KV head (StaticCache) are
not supported for pruned blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb, eager_attention_forward


class PrunedGQAAttentionMixin:
    """The forward of a LLaMA-style attention that kept `num_heads` of its `full_heads` query heads and
    `num_kv_units` of its `full_kv_heads` key/value heads; `kv_index` (k,) maps each kept query head to its
    unit among the kept ones and `kept_index` (k,) lists the kept query heads (both buffers)."""

    full_heads: int
    full_kv_heads: int
    num_heads: int
    num_kv_units: int
    kept_index: torch.Tensor
    kv_index: torch.Tensor
    # from the attention class the mixin is combined with (LlamaAttention, MistralAttention, Qwen2Attention, ...)
    config: Any
    layer_idx: int
    head_dim: int
    scaling: float
    attention_dropout: Any
    training: bool
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # hidden_states: (B, T, D); position_embeddings: cos, sin (B, T, d)
        cache = cache if cache is not None else past_key_values  # transformers' deprecated name
        if self.num_heads == 0:
            return self._forward_without_heads(hidden_states, cache, kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, k, T, d)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, m, T, d)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, m, T, d)
        if position_embeddings is None:
            raise ValueError("a LLaMA-style attention needs the rotary position_embeddings (cos, sin)")
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)  # (B, m, S, d)
        kv_index = self.kv_index.to(key.device)
        key = key.index_select(1, kv_index)  # (B, k, S, d): each kept query head's unit
        value = value.index_select(1, kv_index)  # (B, k, S, d)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=_sliding_window(self),
            **kwargs,
        )  # output: (B, T, k, d); weights: (B, k, T, S) or None
        output = output.reshape(*input_shape, -1).contiguous()  # (B, T, k * d)
        return self.o_proj(output), weights

    def _forward_without_heads(
        self, hidden_states: torch.Tensor, cache: Cache | None, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length = hidden_states.shape[:2]
        key_length = length
        if cache is not None:  # advance the cache by T tokens (an empty tensor would read as an empty cache)
            placeholder = hidden_states.new_zeros((batch, 1, length, 1))  # (B, 1, T, 1)
            keys, _ = cache.update(placeholder, placeholder, self.layer_idx, kwargs=kwargs)  # (B, 1, S, 1)
            key_length = keys.shape[-2]
        context = hidden_states.new_zeros((batch, length, 0))  # (B, T, 0): no head contributes
        output = self.o_proj(context)  # (B, T, D): zeros, or o's bias
        weights = None
        if self.config._attn_implementation == "eager":  # eager returns probabilities: one entry per block
            weights = hidden_states.new_zeros((batch, 0, length, key_length))  # (B, 0, T, S)
        return output, weights


def _sliding_window(attention: Any) -> int | None:
    """The window the original class passes to the attention function (Qwen2: per layer; Mistral: config)."""
    if "sliding_window" in attention.__dict__:
        return attention.sliding_window
    return getattr(attention.config, "sliding_window", None)


class PrunedLlamaAttention(PrunedGQAAttentionMixin, LlamaAttention):
    """A `LlamaAttention` that computes with its kept query heads and key/value units only."""


_PRUNED: dict[type, type] = {LlamaAttention: PrunedLlamaAttention}


def _pruned_class(cls: type) -> type:
    """The pruned subclass of an attention class (made once per class, e.g. for Mistral or Qwen2)."""
    if cls not in _PRUNED:
        _PRUNED[cls] = type(f"Pruned{cls.__name__}", (PrunedGQAAttentionMixin, cls), {})
    return _PRUNED[cls]


def set_llama_heads(attention: Any, kept: torch.Tensor) -> None:
    """Make `attention` (a LLaMA-style attention whose q/k/v/o `prune_heads_` already sliced) compute with the
    query heads where `kept` (bool [H]) is True and the key/value units that serve them."""
    if isinstance(attention, PrunedGQAAttentionMixin):
        raise ValueError("this attention is already pruned; prune the full model instead")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "num_key_value_groups", "head_dim", "layer_idx"):
        if not hasattr(attention, name):
            raise TypeError(f"expected a LLaMA-style attention, {type(attention).__name__} has no `{name}`")
    kept = kept.detach().to("cpu", torch.bool).flatten()
    full_heads = attention.config.num_attention_heads
    group = attention.num_key_value_groups
    if kept.numel() != full_heads:
        raise ValueError(f"kept has {kept.numel()} entries, the attention has {full_heads} query heads")
    kept_units = kept.view(-1, group).any(-1)  # (G,)
    unit_position = kept_units.long().cumsum(0) - 1  # (G,): position of each kept unit among the kept ones
    kept_heads = kept.nonzero().flatten()  # (k,)
    k, m, d = len(kept_heads), int(kept_units.sum()), attention.head_dim
    for name, rows in (("q_proj", k * d), ("k_proj", m * d), ("v_proj", m * d)):
        out_features = getattr(getattr(attention, name), "out_features", None)
        if out_features is not None and out_features != rows:
            raise ValueError(f"{name} has {out_features} outputs, expected {rows}: slice it first (prune_heads_)")
    device = next((p.device for p in attention.parameters()), torch.device("cpu"))
    attention.__class__ = _pruned_class(type(attention))
    attention.full_heads, attention.full_kv_heads = full_heads, len(kept_units)
    attention.num_heads, attention.num_kv_units = k, m
    attention.num_key_value_groups = 1  # keys and values are expanded per kept query head by kv_index
    attention.register_buffer("kept_index", kept_heads.to(device), persistent=False)  # (k,)
    attention.register_buffer("kv_index", unit_position[kept_heads // group].to(device), persistent=False)  # (k,)
