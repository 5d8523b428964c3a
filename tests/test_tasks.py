"""The four task types federated end to end on tiny random models with real tokenizers and the shared data:
text-to-text classification and generation on T5, generation on a LLaMA-style decoder with grouped-query
attention, and 20 Newsgroups classification; plus the generation metrics and the text-to-text data."""

from __future__ import annotations

import json

import pytest
import torch

from fedhead.config import DataSection, config_from_dict
from fedhead.data.generation import IGNORE, collate_generation, load_generation_data, prompts_batch
from fedhead.metrics import score_generations
from fedhead.report import write_report
from fedhead.runners.local import run_simulation
from tests.conftest import MNLI_EVAL, MNLI_TRAIN, SHARED, read_metrics

E2E = {"train": str(SHARED / "data/e2e_nlg/validation.jsonl"), "eval": str(SHARED / "data/e2e_nlg/test.jsonl"),
       "text_fields": ["meaning_representation"], "target_field": "human_reference"}
XSUM = {"train": str(SHARED / "data/xsum/test_1000.jsonl"), "eval": None, "text_fields": ["document"],
        "target_field": "summary", "prompt": "Summarize: {document}"}
MNLI_T2T = {"train": str(MNLI_TRAIN), "eval": str(MNLI_EVAL), "prompt": "mnli premise: {premise} hypothesis: "
            "{hypothesis}", "label_words": {"entailment": "yes", "neutral": "maybe", "contradiction": "no"}}


def _config(model_dir: str, task: str, data: dict, tmp_path, **sections):
    raw = {
        "model": {"name": model_dir, "task": task, "max_length": 48, "max_target_length": 24},
        "data": {**data, "train_size": 96, "eval_size": 24},
        "generation": {"max_new_tokens": 6},
        "partition": {"method": "iid", "num_clients": 4},
        "federated": {"rounds": 1, "clients_per_round": 2, "local_steps": 2, "batch_size": 8,
                      "aggregation": "head_weighted", "selection": "loss_gap"},
        "heads": {"samples": 8, "sparsity": 0.75},
        "out": str(tmp_path), "run_name": f"{task}-run",
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


def _check_round(run_dir, metric_names: list[str], blocks: int, heads: int, kept_per_block: int) -> dict:
    """The run wrote an initial and a final evaluation with every metric, and clients uploaded only kept heads."""
    metrics = read_metrics(run_dir)
    assert [m["round"] for m in metrics] == [0, 1]
    for m in metrics:
        assert set(metric_names) <= set(m) and m["eval_loss"] > 0
    last = metrics[-1]
    assert last["eval_loss"] < metrics[0]["eval_loss"]  # one round of the pruned clients improved the global model
    assert last["bytes_up"] < last["bytes_down"]  # 75% of the heads' LoRA slices stayed home
    for client in last["clients"]:
        assert len(client["kept_heads"]) == blocks * kept_per_block
        assert torch.tensor(client["head_scores"]).shape == (blocks, heads)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metric"] == metric_names[0] and summary["final_score"] == last[metric_names[0]]
    return summary


def test_score_generations_against_several_references():
    preds = ["The cat sat on the mat", "a dog", "Something else"]
    refs = [["the cat sat on the mat", "a cat was sitting"], ["a dog barks"], ["nothing alike here"]]
    s = score_generations(preds, refs, ["accuracy", "bleu", "chrf", "rouge1", "rouge2", "rougeL"])
    assert s["accuracy"] == pytest.approx(1 / 3)  # exact match ignores case
    assert 0 < s["bleu"] < 100 and 0 < s["chrf"] < 100
    assert s["rouge1"] == pytest.approx(100 * (1.0 + 2 * (1 * 2 / 3) / (1 + 2 / 3) + 0.0) / 3)
    same = ["a small dog barks at the postman"]
    assert score_generations(same, [same], ["bleu", "rougeL"]) == {"bleu": pytest.approx(100.0),
                                                                  "rougeL": pytest.approx(100.0)}
    with pytest.raises(ValueError, match="reference"):
        score_generations(["x"], [[]], ["bleu"])


def test_causal_data_masks_the_prompt_and_groups_references(t5_tokenizer):
    cfg = DataSection(**E2E, train_size=20, eval_size=40)
    data = load_generation_data(cfg, t5_tokenizer, "causal_lm", 64, 32)
    row = data.train[0]
    n = row["prompt_length"]
    assert row["labels"][:n] == [IGNORE] * n and row["labels"][n:] == row["input_ids"][n:]
    assert row["input_ids"][-1] == t5_tokenizer.eos_token_id
    assert t5_tokenizer.decode(row["input_ids"][n:], skip_special_tokens=True) == \
        "There is a place in the city centre, Alimentum, that is not family-friendly."
    # evaluation: one row per meaning representation, holding all of its references
    assert len(data.eval) < 40 and sum(len(r) for r in data.eval["references"]) == 40
    assert max(len(r) for r in data.eval["references"]) > 1
    batch = collate_generation(data.train[:4], t5_tokenizer)
    assert batch["labels"].shape == batch["input_ids"].shape
    prompts = prompts_batch(data.eval[:3], t5_tokenizer, "causal_lm")
    assert (prompts["attention_mask"][:, -1] == 1).all()  # left-padded: every prompt ends at the last column


@pytest.mark.parametrize("data", [MNLI_T2T, XSUM], ids=["eval-file", "held-out-of-train"])
def test_generation_rows_without_the_held_out_set_are_the_same(t5_tokenizer, data):
    """held_out=False (a Flower node): no evaluation set, the same training rows and classes as the full load."""
    # Prepare
    cfg = DataSection(**data, train_size=40, eval_size=10)
    full = load_generation_data(cfg, t5_tokenizer, "seq2seq", 64, 8)
    # Execute
    node = load_generation_data(cfg, t5_tokenizer, "seq2seq", 64, 8, held_out=False)
    # Assert
    assert full.eval is not None and node.eval is None and len(node.train) == 40
    assert node.train["input_ids"] == full.train["input_ids"] and node.train["labels"] == full.train["labels"]
    assert node.class_ids == full.class_ids and node.label_names == full.label_names


def test_text_to_text_classification_keeps_classes(t5_tokenizer):
    cfg = DataSection(**MNLI_T2T, train_size=50, eval_size=10)
    data = load_generation_data(cfg, t5_tokenizer, "seq2seq", 64, 8)
    assert sorted(data.label_names) == ["maybe", "no", "yes"] and len(data.class_ids) == 50
    first = data.train[0]
    assert t5_tokenizer.decode(first["labels"], skip_special_tokens=True) == \
        MNLI_T2T["label_words"][data_label(0)]
    assert first["labels"][-1] == t5_tokenizer.eos_token_id


def data_label(i: int) -> str:
    return json.loads(MNLI_TRAIN.read_text().splitlines()[i])["label"]


def test_t5_text_to_text_mnli_round_dirichlet(tiny_t5_dir, tmp_path):
    cfg = _config(tiny_t5_dir, "seq2seq", MNLI_T2T, tmp_path, generation={"metrics": ["accuracy"],
                  "max_new_tokens": 3}, partition={"method": "dirichlet", "alpha": 1.0})
    summary = run_simulation(cfg, tmp_path / "run")
    _check_round(tmp_path / "run", ["accuracy"], blocks=6, heads=4, kept_per_block=1)
    assert summary["final_accuracy"] == summary["final_score"]
    hist = json.loads((tmp_path / "run" / "partition.json").read_text())["label_histograms"]
    assert len(hist) == 4 and sum(map(sum, hist)) == 96


def test_t5_e2e_generation_round(tiny_t5_dir, tmp_path):
    cfg = _config(tiny_t5_dir, "seq2seq", E2E, tmp_path, generation={"metrics": ["bleu", "chrf", "rougeL"]})
    run_simulation(cfg, tmp_path / "run")
    _check_round(tmp_path / "run", ["bleu", "chrf", "rougeL"], blocks=6, heads=4, kept_per_block=1)


def test_gqa_decoder_e2e_and_xsum_rounds_and_report(tiny_llama_dir, tmp_path):
    e2e = _config(tiny_llama_dir, "causal_lm", E2E, tmp_path, generation={"metrics": ["bleu", "chrf", "rougeL"]})
    run_simulation(e2e, tmp_path / "e2e")
    _check_round(tmp_path / "e2e", ["bleu", "chrf", "rougeL"], blocks=2, heads=8, kept_per_block=2)
    xsum = _config(tiny_llama_dir, "causal_lm", XSUM, tmp_path, generation={"metrics": ["rouge1", "rouge2", "rougeL"]},
                   model={"max_length": 96})
    run_simulation(xsum, tmp_path / "xsum")
    _check_round(tmp_path / "xsum", ["rouge1", "rouge2", "rougeL"], blocks=2, heads=8, kept_per_block=2)
    dense = e2e.model_copy(update={"heads": e2e.heads.model_copy(update={"sparsity": 0.0}),
                                   "federated": e2e.federated.model_copy(update={"aggregation": "fedavg"})})
    run_simulation(dense, tmp_path / "e2e-dense")
    table = write_report([tmp_path / "e2e-dense", tmp_path / "e2e"], tmp_path / "report").read_text()
    assert "Baseline: e2e-dense" in table and "bleu" in table and "chrf" in table
    assert (tmp_path / "report" / "bleu_vs_round.png").is_file()


def test_newsgroups_round(tiny_bert_dir, tmp_path):
    newsgroups = SHARED / "data/20newsgroups"
    data = {"train": str(newsgroups / "train.jsonl"), "eval": str(newsgroups / "test.jsonl"), "text_fields": ["text"],
            "label_field": "label", "strip_headers": True, "train_size": 400, "eval_size": 40, "subset": "random"}
    cfg = config_from_dict({"model": {"name": tiny_bert_dir, "max_length": 64}, "data": data,
                            "partition": {"method": "dirichlet", "alpha": 1.0, "num_clients": 4},
                            "federated": {"rounds": 1, "clients_per_round": 2, "local_steps": 2, "batch_size": 8,
                                          "aggregation": "head_weighted", "selection": "loss_gap"},
                            "heads": {"samples": 8, "sparsity": 0.5}, "out": str(tmp_path), "run_name": "ng"})
    summary = run_simulation(cfg, tmp_path / "ng")
    assert len(json.loads((tmp_path / "ng" / "partition.json").read_text())["label_names"]) == 20  # files sorted
    assert summary["metric"] == "accuracy" and 0 <= summary["final_accuracy"] <= 1
    assert all(len(c["kept_heads"]) == 4 for c in read_metrics(tmp_path / "ng")[-1]["clients"])


@pytest.mark.slow
def test_smollm2_gguf_loads_and_prunes_like_gating(tmp_path):
    """The real offline SmolLM2-135M-Instruct (GGUF, dequantised): GQA head map, and 90% per-block pruning of
    the LoRA model computes what gating the same heads to zero computes."""
    import copy

    from fedhead.heads.importance import score_heads
    from fedhead.heads.pruning import kept_heads_mask
    from fedhead.models.loading import build_model
    from fedhead.models.slicing import gate_heads, prune_heads_

    cfg = config_from_dict({"model": {"name": "smollm2", "task": "causal_lm"}, "data": E2E,
                            "partition": {"method": "iid"}, "out": str(tmp_path)})
    lm = build_model(cfg)
    assert (lm.head_map.architecture, lm.head_map.num_blocks, lm.head_map.num_heads) == ("llama", 30, 9)
    assert lm.head_map.blocks[0].num_kv_heads == 3 and lm.tokenizer.pad_token is not None
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)  # a trained-looking adapter, so LoRA slicing matters
    texts = ["name[The Eagle], eatType[coffee shop] -> The Eagle is a coffee shop.", "name[Alimentum] -> Hi"]
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    batch = {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}
    scores, loss = score_heads(lm.model, lm.head_map, [batch], "confidence",
                               special_ids=lm.tokenizer.all_special_ids, prefix=lm.prefix)
    assert scores.shape == (30, 9) and 0 < loss < 20
    kept = kept_heads_mask(scores, 0.9, "per_block")
    assert kept.sum().item() == 30  # one query head in each block
    pruned = copy.deepcopy(lm.model).eval()
    prune_heads_(pruned, lm.head_map, kept, lm.prefix)
    gated = lm.model.eval()
    handles = gate_heads(gated, lm.head_map, kept.float(), lm.prefix)
    with torch.no_grad():
        expected = gated(**batch).logits  # (B, T, vocab)
        actual = pruned(**batch).logits
    for h in handles:
        h.remove()
    real = enc["attention_mask"].bool()
    assert (actual - expected)[real].abs().max() < 1e-3
