"""The data of a run, whatever its task: classification sets or text-to-text sets, and the labels to partition by."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from fedhead.config import Config
from fedhead.data.generation import GenerationData, load_generation_data
from fedhead.data.loading import ClassificationData, load_classification_data

TaskData = ClassificationData | GenerationData


def load_task_data(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> TaskData:
    """Load and tokenise the train and evaluation sets of `cfg.model.task`."""
    if cfg.model.task == "classification":
        return load_classification_data(cfg.data, tokenizer, cfg.model.max_length, cfg.seed)
    return load_generation_data(cfg.data, tokenizer, cfg.model.task, cfg.model.max_length,
                                cfg.model.max_target_length, cfg.seed)


def class_labels(data: TaskData) -> list[int] | None:
    """Class index of every training example (what the Dirichlet partition skews), None for free text."""
    if isinstance(data, ClassificationData):
        return list(data.train["labels"])
    return data.class_ids
