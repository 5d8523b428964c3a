"""The data of a run, whatever its task: classification sets or text-to-text sets, the labels to partition by,
and the training file of one device (a Flower SuperNode started with `--node-config data=PATH`)."""

from __future__ import annotations

import datasets
from transformers import PreTrainedTokenizerBase

from fedhead.config import Config
from fedhead.data import generation
from fedhead.data.generation import GenerationData, load_generation_data
from fedhead.data.loading import (
    ClassificationData,
    DataError,
    check_fields,
    load_classification_data,
    load_records,
    tokenize_split,
)

TaskData = ClassificationData | GenerationData


def load_task_data(cfg: Config, tokenizer: PreTrainedTokenizerBase, *, held_out: bool = True) -> TaskData:
    """Load and tokenise the train and evaluation sets of `cfg.model.task` (either is None where the config
    names no source for it: a Flower server of device-local nodes has no training data). held_out=False: no
    evaluation set (a Flower node in partition form: the same training rows, data.eval not read)."""
    if cfg.model.task == "classification":
        return load_classification_data(cfg.data, tokenizer, cfg.model.max_length, cfg.seed, held_out)
    return load_generation_data(cfg.data, tokenizer, cfg.model.task, cfg.model.max_length,
                                cfg.model.max_target_length, cfg.seed, held_out)


def class_labels(data: TaskData) -> list[int] | None:
    """Class index of every training example (what the Dirichlet partition skews), None for free text or when
    there is no training data."""
    if isinstance(data, ClassificationData):
        return None if data.train is None else list(data.train["labels"])
    return data.class_ids


def label_values(data: TaskData) -> list[str] | None:
    """The run's label values in class-index order (what a device is sent as `data.labels`), None for free text."""
    return data.label_values or None


def load_device_data(cfg: Config, source: str, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """Every record of one device's own training file `source` (any format `data.train` accepts), checked
    against the run's config and tokenised as the run's training rows: the fields the task reads must be there
    and every label must be one of `data.labels` (the label index the server's model was built with, sent to
    the device in the run's config). DataError names the file and the problem."""
    data = cfg.data
    labelled = cfg.model.task == "classification" or data.target_field is None
    if labelled and data.labels is None:
        raise DataError("the run's config has no data.labels: the server sends the run's labels to its devices")
    raw = load_records(source, data.train_split)
    if cfg.model.task == "classification":
        check_fields(raw, data, source)
        index = {v: i for i, v in enumerate(data.labels or [])}
        return tokenize_split(raw, data, tokenizer, cfg.model.max_length, index, source)
    generation.check_fields(raw, data, source)
    words = generation.label_words(data, list(data.labels)) if labelled and data.labels else None
    return generation.encode_training(raw, source, data, words, tokenizer, cfg.model.task, cfg.model.max_length,
                                      cfg.model.max_target_length)
