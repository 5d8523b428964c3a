"""Batches for training, scoring and evaluation, whatever the task: padded tensors from tokenised rows."""

from __future__ import annotations

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from fedhead.data.generation import collate_generation


def collate(rows: dict[str, list], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Pad a batch (dict of lists, as `Dataset[indices]` returns) to its own longest sequence (a multiple of 8).

    Integer labels: a classification batch. Token-list labels: a text-to-text batch (see data.generation).
    """
    if rows["labels"] and isinstance(rows["labels"][0], list):
        return collate_generation(rows, tokenizer)
    labels = torch.tensor(rows.pop("labels"))
    batch = tokenizer.pad(rows, return_tensors="pt", pad_to_multiple_of=8)  # few shapes: FLOPs counted once each
    batch["labels"] = labels
    return dict(batch)


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device` (the same dict when they are there already)."""
    device = torch.device(device)
    if all(t.device == device for t in batch.values()):
        return batch
    return {k: v.to(device) for k, v in batch.items()}


def batches_of(
    data: datasets.Dataset, order: list[int], batch_size: int, tokenizer: PreTrainedTokenizerBase
) -> list[dict[str, torch.Tensor]]:
    """Padded batches of the rows `order` of `data`, in that order."""
    return [collate(data[order[i : i + batch_size]], tokenizer) for i in range(0, len(order), batch_size)]
