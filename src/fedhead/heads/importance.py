"""Head importance scores, one `[blocks, heads]` tensor per client, computed with the current global model.

- confidence (Voita et al. 2019): mean over real query tokens of the max attention weight over real key tokens.
  "Real" excludes padding and, by default, special tokens ([CLS], [SEP], </s>): BERT-like models park
  attention on them in no-op heads, which would otherwise rank first.
- gradient (Michel et al. 2019): expected |dL/dg_h| of a gate g_h on each head's context, scaled to [0, 1].
- random: uniform scores from a seeded generator (the baseline).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fedhead.models.head_map import HeadMap
from fedhead.models.slicing import gate_heads


def head_confidence(
    attn: torch.Tensor, query_mask: torch.Tensor, key_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over real queries of the max attention on a real key, and the number of those queries.

    attn: (B, H, Tq, Tk) attention probabilities; query_mask: (B, Tq) and key_mask: (B, Tk) bool, True for real
    tokens. Returns (sums (H,), count ()); confidence = sums / count. Examples without a real key are skipped.
    """
    keys = key_mask[:, None, None, :].to(attn.dtype)  # (B, 1, 1, Tk)
    best = (attn * keys).amax(dim=-1)  # (B, H, Tq)
    queries = query_mask & key_mask.any(dim=-1, keepdim=True)  # (B, Tq)
    weights = queries[:, None, :].to(attn.dtype)  # (B, 1, Tq)
    return (best * weights).sum(dim=(0, 2)), queries.sum()


def real_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """True for tokens that are neither padding nor one of `special_ids`: (B, T) bool."""
    mask = attention_mask.bool()
    if special_ids:
        mask &= ~torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device))
    return mask


def attention_masks_by_block(
    outputs, batch: dict[str, torch.Tensor], head_map: HeadMap, special_ids: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(attention (B, H, Tq, Tk), real queries (B, Tq), real keys (B, Tk)) of each block, in head-map order.

    Encoders and decoder-only models attend over their input tokens. T5's decoder self-attention attends over
    decoder positions (real where a label is, i.e. not -100), and its cross-attention from those positions to
    the real encoder tokens.
    """
    source = real_token_mask(batch["input_ids"], batch["attention_mask"], special_ids)  # (B, T)
    if head_map.architecture != "t5":
        attentions = list(outputs.attentions or ())
        if len(attentions) != head_map.num_blocks:
            raise ValueError(f"got {len(attentions)} attention tensors for {head_map.num_blocks} blocks: run the "
                             "model with output_attentions=True and eager attention")
        return [(a, source, source) for a in attentions]
    # head map order: every encoder self-attention block, then per decoder layer its self- and cross-attention
    encoder = list(outputs.encoder_attentions or ())
    decoder = list(outputs.decoder_attentions or ())
    cross = list(outputs.cross_attentions or ())
    if len(decoder) != len(cross) or len(encoder) + 2 * len(decoder) != head_map.num_blocks:
        raise ValueError(
            f"got {len(encoder)} encoder, {len(decoder)} decoder and {len(cross)} cross-attention tensors for "
            f"{head_map.num_blocks} blocks: run the model with output_attentions=True and eager attention"
        )
    target = batch["labels"] != -100  # (B, T_dec): decoder positions that predict a real token
    return [(a, source, source) for a in encoder] + [
        item for d, c in zip(decoder, cross, strict=True) for item in ((d, target, target), (c, target, source))
    ]


@torch.no_grad()
def _confidence(model, head_map, batches, special_ids, prefix) -> tuple[torch.Tensor, float]:
    root = model.get_submodule(prefix.rstrip("."))  # the transformers model that owns the attention setting
    previous = root.config._attn_implementation
    root.set_attn_implementation("eager")  # attention probabilities exist only in eager attention
    sums = torch.zeros(head_map.num_blocks, head_map.num_heads, dtype=torch.float64)
    counts = torch.zeros(head_map.num_blocks, dtype=torch.float64)
    loss_sum, n = 0.0, 0
    try:
        for batch in batches:
            out = model(**batch, output_attentions=True)
            for b, (attn, queries, keys) in enumerate(attention_masks_by_block(out, batch, head_map, special_ids)):
                s, c = head_confidence(attn.double(), queries, keys)
                sums[b] += s.cpu()
                counts[b] += c.cpu() if isinstance(c, torch.Tensor) else c
            size = len(batch["labels"])
            loss_sum, n = loss_sum + float(out.loss) * size, n + size
    finally:
        root.set_attn_implementation(previous)
    return (sums / counts.clamp(min=1)[:, None]).float(), loss_sum / max(n, 1)


def _gradient(model, head_map, batches, prefix) -> tuple[torch.Tensor, float]:
    gates = torch.ones(head_map.num_blocks, head_map.num_heads, requires_grad=True)
    handles = gate_heads(model, head_map, gates, prefix)
    total = torch.zeros_like(gates)
    loss_sum, n = 0.0, 0
    try:
        for batch in batches:
            loss = model(**batch).loss
            (grad,) = torch.autograd.grad(loss, gates)
            total += grad.abs()
            size = len(batch["labels"])
            loss_sum, n = loss_sum + float(loss.detach()) * size, n + size
    finally:
        for h in handles:
            h.remove()
    return total / total.max().clamp(min=1e-12), loss_sum / max(n, 1)


@torch.no_grad()
def _loss_only(model, batches) -> float:
    loss_sum, n = 0.0, 0
    for batch in batches:
        size = len(batch["labels"])
        loss_sum, n = loss_sum + float(model(**batch).loss) * size, n + size
    return loss_sum / max(n, 1)


def score_heads(
    model: nn.Module,
    head_map: HeadMap,
    batches: Iterable[dict[str, torch.Tensor]],
    method: str,
    *,
    special_ids: list[int],
    prefix: str,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, float]:
    """Score every head of `model` (put in eval mode) on `batches`; returns (scores [blocks, heads] in [0, 1],
    mean loss of the model on those batches).

    method: 'confidence', 'gradient', 'random', or 'none' (loss only; scores are all ones).
    """
    batches = list(batches)
    was_training = model.training
    model.eval()
    try:
        shape = (head_map.num_blocks, head_map.num_heads)
        if method == "confidence":
            return _confidence(model, head_map, batches, special_ids, prefix)
        if method == "gradient":
            return _gradient(model, head_map, batches, prefix)
        loss = _loss_only(model, batches)
        if method == "random":
            return torch.rand(shape, generator=generator), loss
        if method == "none":
            return torch.ones(shape), loss
        raise ValueError(f"unknown importance method '{method}'")
    finally:
        model.train(was_training)
