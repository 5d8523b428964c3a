"""The model's evaluation, as the run loop, the Flower clients and `fedhead evaluate` score it: mean loss, accuracy
(classification), and the scores of generated text (text-to-text tasks with a `generation` section).

`fedhead evaluate` on a finished run (label maps, pruned deployment) is `fedhead.evaluation`, built on `evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from fedhead.config import GenerationSection
from fedhead.data.batching import collate, to_device
from fedhead.data.generation import IGNORE, prompts_batch
from fedhead.metrics import score_generations
from fedhead.models.loading import device_of


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    *,
    task: str = "classification",
    generation: GenerationSection | None = None,
) -> dict[str, float]:
    """Mean loss of `model` on `data` (eval mode, no dropout), with accuracy for classification; for a
    text-to-text task given `generation`, also the generated text's scores (`generation.metrics`)."""
    model.eval()
    loss_sum, correct, tokens = 0.0, 0, 0
    for i in range(0, len(data), batch_size):
        rows = data[i : i + batch_size]
        rows.pop("references", None)
        batch = to_device(collate(rows, tokenizer), device_of(model))
        out = model(**batch)
        if task == "classification":
            loss_sum += float(out.loss) * len(batch["labels"])
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        else:  # token-level mean, as the model's loss is
            n = int((batch["labels"] != IGNORE).sum())
            loss_sum, tokens = loss_sum + float(out.loss) * n, tokens + n
    if task == "classification":
        return {"eval_loss": loss_sum / len(data), "accuracy": correct / len(data)}
    result = {"eval_loss": loss_sum / max(tokens, 1)}
    if generation is not None:
        predictions = generate_texts(model, data, tokenizer, batch_size, task, generation)
        result.update(score_generations(predictions, data["references"], generation.metrics))
    return result


@torch.no_grad()
def generate_texts(
    model: torch.nn.Module,
    data: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    task: str,
    generation: GenerationSection,
) -> list[str]:
    """Greedy (num_beams 1) or beam-search generations for every row of `data`, decoded without special tokens."""
    model.eval()
    texts: list[str] = []
    for i in range(0, len(data), batch_size):
        batch = to_device(prompts_batch(data[i : i + batch_size], tokenizer, task), device_of(model))
        generate = cast(Callable[..., torch.Tensor], model.generate)  # the transformers / peft model's own
        out = generate(**batch, max_new_tokens=generation.max_new_tokens, num_beams=generation.num_beams,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id)  # (B, T_out)
        if task == "causal_lm":
            out = out[:, batch["input_ids"].shape[1]:]  # drop the (left-padded) prompt
        texts.extend(t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True))
    return texts
