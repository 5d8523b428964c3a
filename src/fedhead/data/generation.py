"""Text-to-text data for generation tasks: seq2seq (T5) and causal LMs (prompt + target, prompt masked out).

Training rows hold `input_ids`, `attention_mask` and `labels` (target token ids; -100 where no loss is taken).
Evaluation rows are grouped by input, so that an input with several references (E2E NLG) is generated once and
scored against all of them: each holds the same columns plus `references` (list of strings) and, for causal
LMs, `prompt_length` (the prompt is `input_ids[:prompt_length]`). Classification data can be run text-to-text:
the target is the label's word (`data.label_words`), and the label index is kept in `class_ids` so that the
Dirichlet partition still skews labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from fedhead.config import DataSection
from fedhead.data.loading import DataError, check_labels, load_split_records, run_labels, strip_headers

IGNORE = -100  # label id the loss skips


@dataclass
class GenerationData:
    """Tokenised text-to-text train and evaluation sets (see the module docstring for the columns)."""

    train: datasets.Dataset | None  # None: no training file here (a Flower server of device-local nodes)
    eval: datasets.Dataset | None  # None: nothing to evaluate on here
    label_names: list[str] = field(default_factory=list)  # text-to-text classification: the label words
    label_values: list[str] = field(default_factory=list)  # ... and the label values they stand for (data.labels)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def class_ids(self) -> list[int] | None:
        """Class index of each training row (text-to-text classification), else None."""
        if self.train is None or "class_ids" not in self.train.column_names:
            return None
        return list(self.train["class_ids"])


def render_inputs(records: datasets.Dataset, cfg: DataSection) -> list[str]:
    """The input text of each record: `cfg.prompt` filled with the record's fields, or its text fields joined."""
    columns = {name: list(records[name]) for name in records.column_names}
    texts = []
    for i in range(len(records)):
        row = {k: v[i] for k, v in columns.items()}
        if cfg.strip_headers:
            row = {k: strip_headers(v) if k in cfg.text_fields and isinstance(v, str) else v for k, v in row.items()}
        if cfg.prompt is not None:
            try:
                texts.append(cfg.prompt.format(**row))
            except KeyError as err:
                raise DataError(f"data.prompt names field {err} that the data does not have "
                                f"(fields: {', '.join(records.column_names)})") from None
        else:
            texts.append(" ".join(str(row[f]) for f in cfg.text_fields))
    return texts


def _targets(records: datasets.Dataset, cfg: DataSection, words: dict[str, str] | None) -> list[str]:
    if cfg.target_field is not None:
        return [str(t) for t in records[cfg.target_field]]
    assert words is not None
    return [words[str(v)] for v in records[cfg.label_field]]


def check_fields(records: datasets.Dataset, cfg: DataSection, source: str) -> None:
    wanted = [*([] if cfg.prompt else cfg.text_fields), cfg.target_field or cfg.label_field]
    for name in wanted:
        if name not in records.column_names:
            raise DataError(f"{source}: field '{name}' not found (fields: {', '.join(records.column_names)})")


def encode_pairs(
    inputs: list[str], targets: list[str], tokenizer: PreTrainedTokenizerBase, task: str,
    max_length: int, max_target_length: int,
) -> dict[str, list]:
    """Token columns of (input, target) pairs. seq2seq: encoder input, decoder labels (ending in EOS).
    causal_lm: one sequence prompt + target + EOS, labels -100 over the prompt; `prompt_length` per row."""
    seq2seq = task == "seq2seq"
    # a causal LM's prompt gets no end-of-sequence mark: only its BOS, when the tokenizer adds one
    source = tokenizer(inputs, add_special_tokens=seq2seq, truncation=True, max_length=max_length)["input_ids"]
    target = tokenizer(targets, add_special_tokens=seq2seq, truncation=True,
                       max_length=max_target_length)["input_ids"]
    if seq2seq:
        return {"input_ids": source, "attention_mask": [[1] * len(s) for s in source], "labels": target}
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        source = [[tokenizer.bos_token_id, *s] for s in source]
    eos = tokenizer.eos_token_id
    ids, labels, lengths = [], [], []
    for s, t in zip(source, target, strict=True):
        prompt = s + tokenizer(" ->", add_special_tokens=False)["input_ids"]  # a separator the model can learn
        ids.append(prompt + t + [eos])
        labels.append([IGNORE] * len(prompt) + t + [eos])
        lengths.append(len(prompt))
    return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids], "labels": labels,
            "prompt_length": lengths}


def load_generation_data(
    cfg: DataSection, tokenizer: PreTrainedTokenizerBase, task: str, max_length: int, max_target_length: int,
    seed: int = 0, held_out: bool = True,
) -> GenerationData:
    """Load, check and tokenise the train and evaluation sets of a seq2seq or causal-LM task (held_out=False:
    the training set only, `load_split_records`)."""
    train_raw, eval_raw = load_split_records(cfg, seed, lambda ds, src: check_fields(ds, cfg, src), held_out)
    words, values = None, []
    if cfg.target_field is None:  # classification, text-to-text
        values = run_labels(cfg, train_raw, eval_raw)
        words = label_words(cfg, values)
        if eval_raw is not None:
            check_labels(list(eval_raw[cfg.label_field]), values, cfg, str(cfg.eval or cfg.train))
    train = None if train_raw is None else encode_training(train_raw, str(cfg.train), cfg, words, tokenizer, task,
                                                           max_length, max_target_length)
    evaluation = None if eval_raw is None else encode_evaluation(
        render_inputs(eval_raw, cfg), [[t] for t in _targets(eval_raw, cfg, words)], tokenizer, task, max_length,
        max_target_length)
    return GenerationData(train=train, eval=evaluation, label_names=[words[v] for v in values] if words else [],
                          label_values=values)


def label_words(cfg: DataSection, values: list[str]) -> dict[str, str]:
    """Label value -> the word the model generates for it (`data.label_words`, default the value itself)."""
    return {v: (cfg.label_words or {}).get(v, v) for v in values}


def encode_training(
    raw: datasets.Dataset, source: str, cfg: DataSection, words: dict[str, str] | None,
    tokenizer: PreTrainedTokenizerBase, task: str, max_length: int, max_target_length: int,
) -> datasets.Dataset:
    """Training rows of `raw` (read from `source`); text-to-text classification (`words` given) adds each row's
    `class_ids`, and a label value without a word is an error."""
    if words is not None:
        check_labels(list(raw[cfg.label_field]), list(words), cfg, source)
    columns = encode_pairs(render_inputs(raw, cfg), _targets(raw, cfg, words), tokenizer, task, max_length,
                           max_target_length)
    if words is not None:
        index = {v: i for i, v in enumerate(words)}
        columns["class_ids"] = [index[str(v)] for v in raw[cfg.label_field]]
    return datasets.Dataset.from_dict(columns)


def encode_evaluation(
    inputs: list[str], references: list[list[str]], tokenizer: PreTrainedTokenizerBase, task: str,
    max_length: int, max_target_length: int,
) -> datasets.Dataset:
    """Evaluation rows: one per distinct input (first occurrence order) with every reference of every record that
    has this input; the first reference is the target of the loss."""
    grouped: dict[str, list[str]] = {}
    for x, refs in zip(inputs, references, strict=True):
        grouped.setdefault(x, []).extend(refs)
    firsts = [refs[0] for refs in grouped.values()]
    held_out = encode_pairs(list(grouped), firsts, tokenizer, task, max_length, max_target_length)
    held_out["references"] = list(grouped.values())
    return datasets.Dataset.from_dict(held_out)


def collate_generation(rows: dict[str, list], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Pad a training batch: inputs right-padded (multiple of 8), labels padded with -100."""
    labels = rows["labels"]
    batch = tokenizer.pad({"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]},
                          return_tensors="pt", pad_to_multiple_of=8, padding_side="right")
    # causal LM: labels align with input_ids; seq2seq: decoder labels padded to a multiple of 8 on their own
    causal = "prompt_length" in rows
    width = batch["input_ids"].shape[1] if causal else -(-max(len(x) for x in labels) // 8) * 8
    batch["labels"] = torch.tensor([x + [IGNORE] * (width - len(x)) for x in labels])  # (B, T_labels)
    return dict(batch)


def prompts_batch(rows: dict[str, list], tokenizer: PreTrainedTokenizerBase, task: str) -> dict[str, torch.Tensor]:
    """Generation inputs of an evaluation batch: seq2seq right-padded sources; causal LM left-padded prompts."""
    if task == "seq2seq":
        return dict(tokenizer.pad({"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]},
                                  return_tensors="pt", padding_side="right"))
    prompts = [ids[:n] for ids, n in zip(rows["input_ids"], rows["prompt_length"], strict=True)]
    return dict(tokenizer.pad({"input_ids": prompts, "attention_mask": [[1] * len(p) for p in prompts]},
                              return_tensors="pt", padding_side="left"))
