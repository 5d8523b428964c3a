"""Loading sequence-classification data from local JSON Lines / CSV files or a Hugging Face Hub dataset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from fedhead.config import DataSection

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv"}


class DataError(ValueError):
    """Data that cannot be used as configured; the message says which file and field."""


@dataclass
class ClassificationData:
    """Tokenised train and held-out sets with integer labels.

    Each dataset has the columns the tokenizer produced (`input_ids`, `attention_mask`, maybe
    `token_type_ids`) plus `labels`; sequences are unpadded (batches are padded to their own longest).
    """

    train: datasets.Dataset | None  # None: no training file here (a Flower server of device-local nodes)
    eval: datasets.Dataset | None  # None: nothing to evaluate on here
    label_names: list[str]

    @property
    def label_values(self) -> list[str]:
        """The label values in class-index order (what `data.labels` holds)."""
        return self.label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def load_records(source: str, split: str) -> datasets.Dataset:
    """Load raw records from a local .jsonl/.json/.csv file or a Hub dataset id (`split` of it)."""
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise DataError(f"data file not found: {source}")
        if _is_blank(path):
            raise DataError(f"{source}: the file is empty (no records)")
        try:
            ds = datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train")
        except Exception as err:  # noqa: BLE001 - empty, undecodable or malformed files raise many kinds
            detail = " ".join(str(err).split())[:200] or type(err).__name__
            raise DataError(f"{source}: cannot read it as {suffix[1:]} ({type(err).__name__}: {detail})") from None
        if len(ds) == 0:
            raise DataError(f"{source}: no records")
        return ds
    if path.exists():
        raise DataError(f"{source}: unsupported data file type (use .jsonl, .json or .csv)")
    try:  # a Hub dataset id: the path real users with internet take
        return datasets.load_dataset(source, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; the user needs one message
        raise DataError(f"could not load dataset '{source}' (split '{split}'): {err}") from None


def _is_blank(path: Path) -> bool:
    """Whether the file holds nothing but white space (read a block at a time, up to its first character)."""
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            if block.strip():
                return False
    return True


def check_fields(ds: datasets.Dataset, cfg: DataSection, source: str) -> None:
    for field in [*cfg.text_fields, cfg.label_field]:
        if field not in ds.column_names:
            raise DataError(f"{source}: field '{field}' not found (fields: {', '.join(ds.column_names)})")


def label_names_of(values: list) -> list[str]:
    """The distinct label values as strings, numbers first in numeric order, then strings sorted."""
    return [str(v) for v in sorted(set(values), key=lambda v: (isinstance(v, str), v))]


def strip_headers(text: str) -> str:
    """The body of an e-mail style post: everything after the first blank line (the text itself if none)."""
    head, sep, body = text.replace("\r\n", "\n").partition("\n\n")
    return body.strip() if sep and body.strip() else text


def run_labels(cfg: DataSection, train_raw: datasets.Dataset | None, eval_raw: datasets.Dataset | None) -> list[str]:
    """The run's label values in class-index order: `data.labels`, else those of the training records, else
    those of the evaluation records (a server without training data); DataError when there are none."""
    if cfg.labels is not None:
        return list(cfg.labels)
    source = train_raw if train_raw is not None else eval_raw
    if source is None:
        raise DataError("data.labels is required: no training or evaluation data here gives the labels")
    values = list(source[cfg.label_field])
    check_label_kinds(values, str(cfg.train if train_raw is not None else cfg.eval))
    return label_names_of(values)


def check_label_kinds(values: list, source: str) -> None:
    """DataError when the labels of `source` mix strings and numbers ("entailment" beside 0, or "0" beside 0):
    each kind would count as other classes (a 3-class file read as 6)."""
    strings = next((v for v in values if isinstance(v, str)), None)
    numbers = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if strings is not None and numbers is not None:
        raise DataError(f"{source}: labels mix strings and numbers (e.g. {strings!r} and {numbers!r}): write every "
                        "label the same way")


def check_labels(values: list, labels: list[str], cfg: DataSection, source: str) -> None:
    """DataError naming the label values in `source` that are not among the run's `labels`, or mixing strings
    and numbers (`check_label_kinds`)."""
    check_label_kinds(values, source)
    unknown = sorted(set(map(str, values)) - set(labels))
    if unknown:
        known = "data.labels" if cfg.labels is not None else "the training data"
        raise DataError(f"{source}: labels not in {known}: {unknown[:5]}")


def tokenize_split(
    ds: datasets.Dataset,
    cfg: DataSection,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    label_index: dict[str, int],
    source: str,
) -> datasets.Dataset:
    """Tokenise text (single or pair) and map labels to integers; unknown labels are an error."""
    check_labels(list(ds[cfg.label_field]), list(label_index), cfg, source)
    labels = [str(v) for v in ds[cfg.label_field]]
    texts = [list(ds[f]) for f in cfg.text_fields]
    for field, column in zip(cfg.text_fields, texts, strict=True):
        if any(t is None or (isinstance(t, str) and not t.strip()) for t in column):
            raise DataError(f"{source}: empty text in field '{field}' (null, \"\" or only spaces)")
    if any(not isinstance(t, str) for col in texts for t in col):
        raise DataError(f"{source}: the text fields {cfg.text_fields} must hold strings")
    if cfg.strip_headers:
        texts = [[strip_headers(t) for t in col] for col in texts]
    enc = tokenizer(*texts, truncation=True, max_length=max_length)
    columns = {k: enc[k] for k in enc}
    columns["labels"] = [label_index[v] for v in labels]
    return datasets.Dataset.from_dict(columns)


def load_split_records(
    cfg: DataSection, seed: int, check: Callable[[datasets.Dataset, str], None], held_out: bool = True
) -> tuple[datasets.Dataset | None, datasets.Dataset | None]:
    """Raw train and held-out records, `check`ed, cut to train_size / eval_size; with no `eval` source,
    eval_size training records (seeded) are held out. Without `train` (a server of device-local nodes): no
    training records, and the `eval` records if there is a source. held_out=False (a Flower node, which never
    evaluates on it): no held-out records, the `eval` source is not read; the training records are the same."""
    eval_raw: datasets.Dataset | None = None
    if cfg.train is None:
        if cfg.eval is None or not held_out:
            return None, None
        eval_raw = load_records(cfg.eval, cfg.eval_split)
        check(eval_raw, cfg.eval)
        return None, _cut(eval_raw, cfg.eval_size, cfg, seed)
    train_raw = load_records(cfg.train, cfg.train_split)
    check(train_raw, cfg.train)
    if cfg.eval is None:  # held out of the training records, whether they are kept or not
        if cfg.eval_size is not None and cfg.eval_size >= len(train_raw):
            raise DataError(f"{cfg.train}: data.eval_size = {cfg.eval_size} held out of {len(train_raw)} records "
                            "leaves nothing to train on (no data.eval file is set)")
        split = train_raw.train_test_split(test_size=cfg.eval_size or 0.1, seed=seed)
        train_raw, eval_raw = split["train"], (split["test"] if held_out else None)
    elif held_out:
        eval_raw = load_records(cfg.eval, cfg.eval_split)
        check(eval_raw, cfg.eval)
    train_raw = _cut(train_raw, cfg.train_size, cfg, seed)
    eval_raw = None if eval_raw is None else _cut(eval_raw, cfg.eval_size, cfg, seed)
    if len(train_raw) == 0:
        raise DataError(f"{cfg.train}: no training examples")
    return train_raw, eval_raw


def _cut(ds: datasets.Dataset, size: int | None, cfg: DataSection, seed: int) -> datasets.Dataset:
    """`size` records of `ds`: the first ones, or (subset = random) drawn with the seed, in the file's order."""
    if size is None or size >= len(ds):
        return ds
    if cfg.subset == "random":  # sorted by index: the sample keeps the file's order
        return ds.select(sorted(np.random.default_rng(seed).permutation(len(ds))[:size].tolist()))
    return ds.select(range(size))


def load_classification_data(
    cfg: DataSection, tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int = 0, held_out: bool = True
) -> ClassificationData:
    """Load, check and tokenise the train and held-out sets of a classification task (held_out=False: the
    training set only, `load_split_records`)."""
    train_raw, eval_raw = load_split_records(cfg, seed, lambda ds, source: check_fields(ds, cfg, source), held_out)
    names = run_labels(cfg, train_raw, eval_raw)
    index = {n: i for i, n in enumerate(names)}

    def tokenized(raw: datasets.Dataset | None, source: str | None) -> datasets.Dataset | None:
        return None if raw is None else tokenize_split(raw, cfg, tokenizer, max_length, index, str(source))

    return ClassificationData(train=tokenized(train_raw, cfg.train), eval=tokenized(eval_raw, cfg.eval or cfg.train),
                              label_names=names)
