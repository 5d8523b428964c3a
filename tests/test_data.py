import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from fedhead.config import DataSection, PartitionSection
from fedhead.data import DataError, label_histograms, load_classification_data, loading, partition_indices
from tests.conftest import MNLI_EVAL, MNLI_TRAIN


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


def test_mnli_pairs_and_string_labels(tokenizer):
    cfg = DataSection(train=str(MNLI_TRAIN), eval=str(MNLI_EVAL), train_size=50, eval_size=20)
    data = load_classification_data(cfg, tokenizer, 64)
    assert data.label_names == ["contradiction", "entailment", "neutral"]
    assert len(data.train) == 50 and len(data.eval) == 20
    row = data.train[0]
    assert row["input_ids"][0] == tokenizer.cls_token_id and 1 in row["token_type_ids"]  # a text pair


def test_csv_single_text_int_labels(tmp_path, tokenizer):
    path = tmp_path / "d.csv"
    path.write_text("text,y\nhello there,1\nbad day,0\nfine,1\n")
    cfg = DataSection(train=str(path), eval=None, text_fields=["text"], label_field="y", eval_size=1)
    data = load_classification_data(cfg, tokenizer, 16)
    assert data.label_names == ["0", "1"]
    assert len(data.train) + len(data.eval) == 3


def test_missing_field_and_unknown_label(tmp_path, tokenizer):
    with pytest.raises(DataError, match="field 'gold' not found"):
        load_classification_data(DataSection(train=str(MNLI_TRAIN), label_field="gold"), tokenizer, 16)
    ev = tmp_path / "ev.jsonl"
    ev.write_text(json.dumps({"premise": "a", "hypothesis": "b", "label": "maybe"}) + "\n")
    with pytest.raises(DataError, match="labels not in the training data"):
        load_classification_data(DataSection(train=str(MNLI_TRAIN), eval=str(ev), train_size=30), tokenizer, 16)
    with pytest.raises(DataError, match="not found"):
        load_classification_data(DataSection(train=str(tmp_path / "none.jsonl")), tokenizer, 16)


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_partition_covers_every_example_once(method):
    labels = np.random.default_rng(0).integers(0, 3, size=300).tolist()
    cfg = PartitionSection(method=method, num_clients=7, alpha=0.3)
    parts = partition_indices(labels, cfg, seed=1)
    joined = np.concatenate(parts)
    assert len(parts) == 7 and sorted(joined.tolist()) == list(range(300))
    assert [p.tolist() for p in partition_indices(labels, cfg, seed=1)] == [p.tolist() for p in parts]
    hist = label_histograms(labels, parts, 3)
    assert sum(map(sum, hist)) == 300


def test_dirichlet_is_skewed_iid_is_not():
    labels = np.repeat([0, 1, 2], 400).tolist()
    skew = label_histograms(labels, partition_indices(labels, PartitionSection(alpha=0.1, num_clients=10), 0), 3)
    iid = label_histograms(labels, partition_indices(labels, PartitionSection(method="iid", num_clients=10), 0), 3)
    def top_share(h):
        return np.mean([max(r) / max(sum(r), 1) for r in h])
    assert top_share(skew) > 0.7 > 0.45 > top_share(iid)


def test_newsgroups_single_text_twenty_classes(tokenizer):
    from tests.conftest import SHARED

    cfg = DataSection(train=str(SHARED / "data/20newsgroups/train.jsonl"),
                      eval=str(SHARED / "data/20newsgroups/test.jsonl"), text_fields=["text"],
                      strip_headers=True, eval_size=50)
    data = load_classification_data(cfg, tokenizer, 64)
    assert data.num_labels == 20 and len(data.train) == 11_314
    first = tokenizer.decode(data.train[0]["input_ids"])
    assert "from :" not in first.lower()[:20] and "subject" not in first.lower()[:40]


def test_strip_headers():
    from fedhead.data.loading import strip_headers

    assert strip_headers("From: a\nSubject: b\n\nHello\nworld") == "Hello\nworld"
    assert strip_headers("no headers here") == "no headers here"


def test_random_subset_spans_a_sorted_file(tokenizer):
    from tests.conftest import SHARED

    newsgroups = SHARED / "data/20newsgroups"
    common = {"train": str(newsgroups / "train.jsonl"), "eval": str(newsgroups / "test.jsonl"),
              "text_fields": ["text"], "train_size": 300, "eval_size": 200}
    first = load_classification_data(DataSection(**common), tokenizer, 16)
    drawn = load_classification_data(DataSection(**common, subset="random"), tokenizer, 16, seed=3)
    assert len(first.label_names) == 1 and len(set(first.eval["labels"])) == 1  # the files are sorted by group
    assert len(drawn.label_names) == 20 and len(set(drawn.eval["labels"])) >= 15
    again = load_classification_data(DataSection(**common, subset="random"), tokenizer, 16, seed=3)
    assert again.train["input_ids"] == drawn.train["input_ids"]  # seeded


def test_empty_eval_in_toml_holds_out_training_examples():
    assert DataSection(eval="").eval is None


@pytest.mark.parametrize("eval_source", [str(MNLI_EVAL), None])
def test_without_the_held_out_set_the_training_rows_are_the_same_and_no_eval_file_is_read(
        tokenizer, eval_source, monkeypatch):
    """held_out=False (a Flower node): the evaluation file is not read, nor are held-out rows tokenised, and the
    training rows are those of the full load (eval_size rows are still split off data.train when there is no
    eval file)."""
    # Prepare
    cfg = DataSection(train=str(MNLI_TRAIN), eval=eval_source, train_size=60, eval_size=20)
    full = load_classification_data(cfg, tokenizer, 32)
    reads: list[str] = []
    read = loading.load_records
    monkeypatch.setattr(loading, "load_records", lambda source, split: reads.append(source) or read(source, split))
    # Execute
    node = load_classification_data(cfg, tokenizer, 32, held_out=False)
    # Assert
    assert full.eval is not None and node.eval is None and reads == [str(MNLI_TRAIN)]
    assert node.train["input_ids"] == full.train["input_ids"] and node.train["labels"] == full.train["labels"]
    assert node.label_names == full.label_names
