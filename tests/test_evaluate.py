"""`fedhead evaluate`: a run's last checkpoint scored on a data file, with label maps, through the CLI."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from fedhead.cli import app
from fedhead.config import ConfigError, config_from_dict
from fedhead.evaluation import parse_label_map
from fedhead.heads.pruning import consensus_heads_mask, kept_heads_mask
from fedhead.models.slicing import prune_heads_
from fedhead.runners.local import run_simulation
from fedhead.trained import load_trained
from tests.conftest import MNLI_EVAL, MNLI_TRAIN, read_metrics, tiny_config

EVAL_SIZE = 32


@pytest.fixture(scope="module")
def mnli_run(tiny_bert_dir, tmp_path_factory):
    """A one-round run on the tiny BERT, and its evaluation set as a file: the first EVAL_SIZE pairs of
    MNLI dev (three labels) and the same pairs with two labels (entailment / not_entailment)."""
    out = tmp_path_factory.mktemp("evaluate")
    cfg = tiny_config(tiny_bert_dir, out, data={"eval_size": EVAL_SIZE}, federated={"rounds": 1, "local_steps": 1})
    run_simulation(cfg, out / "run")
    rows = [json.loads(line) for line in MNLI_EVAL.read_text().splitlines()[:EVAL_SIZE]]
    (out / "three.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    two = [{**r, "label": "entailment" if r["label"] == "entailment" else "not_entailment"} for r in rows]
    (out / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in two))
    return out


def test_the_runs_own_evaluation_set_gives_its_last_scores(mnli_run):
    # Execute
    result = CliRunner().invoke(app, ["evaluate", str(mnli_run / "run"), "--data", str(mnli_run / "three.jsonl"),
                                      "--batch-size", "5"])
    # Assert
    assert result.exit_code == 0, result.output
    last = read_metrics(mnli_run / "run")[-1]
    saved = json.loads((mnli_run / "run" / "evaluate.three.json").read_text())
    assert saved["round"] == 1 and saved["examples"] == EVAL_SIZE
    assert saved["metrics"]["accuracy"] == last["accuracy"]
    assert saved["metrics"]["eval_loss"] == pytest.approx(last["eval_loss"], abs=1e-5)  # logsumexp vs cross_entropy
    assert f"accuracy {last['accuracy']:.4f}" in result.stdout.splitlines()
    confusion = saved["confusion"]
    assert sum(confusion[y][y] for y in confusion) == round(last["accuracy"] * EVAL_SIZE)


def test_two_way_file_scored_with_the_three_way_model(mnli_run):
    """not_entailment=neutral|contradiction: a prediction of either counts, its probability is their sum."""
    # Prepare
    out = mnli_run / "two-way.json"
    run = load_trained(mnli_run / "run", device="cpu")
    rows = [json.loads(line) for line in (mnli_run / "two.jsonl").read_text().splitlines()]
    batch = run.lm.tokenizer([r["premise"] for r in rows], [r["hypothesis"] for r in rows], padding=True,
                             truncation=True, max_length=run.cfg.model.max_length, return_tensors="pt")
    with torch.no_grad():
        p = run.lm.model(**batch).logits.softmax(-1)  # (N, 3)
    e = run.label_names.index("entailment")
    is_e = torch.tensor([r["label"] == "entailment" for r in rows])
    p_gold = torch.where(is_e, p[:, e], 1 - p[:, e])
    predicted_e = p.argmax(-1) == e
    # Execute
    result = CliRunner().invoke(app, ["evaluate", str(mnli_run / "run"), "--data", str(mnli_run / "two.jsonl"),
                                      "--label-map", "not_entailment = neutral|contradiction", "--out", str(out)])
    # Assert
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["label_map"] == {"not_entailment": ["neutral", "contradiction"]}
    assert saved["metrics"]["accuracy"] == float((predicted_e == is_e).float().mean())
    assert saved["metrics"]["eval_loss"] == pytest.approx(float(-p_gold.log().mean()), abs=1e-5)
    assert set(saved["confusion"]) == {"entailment", "not_entailment"}


def test_label_map_syntax():
    assert parse_label_map("a=x, b = y|z,") == {"a": ["x"], "b": ["y", "z"]}
    assert parse_label_map(None) == {}
    for bad in ["a", "=x", "a=", "a=x|", "a=x=y", "a=x,a=y"]:
        with pytest.raises(ConfigError, match="label-map"):
            parse_label_map(bad)


@pytest.mark.parametrize("case", ["no run", "not a run", "no checkpoint", "unknown labels", "bad map",
                                  "map to unknown", "missing field"])
def test_errors_are_one_line(mnli_run, tmp_path, case):
    # Prepare
    run, data, extra = mnli_run / "run", mnli_run / "two.jsonl", []
    if case == "no run":
        run = tmp_path / "missing"
    elif case == "not a run":
        run = tmp_path
    elif case == "no checkpoint":
        run = tmp_path / "fresh"
        run.mkdir()
        for name in ("config.json", "partition.json"):
            shutil.copy(mnli_run / "run" / name, run / name)
    elif case == "bad map":
        extra = ["--label-map", "not_entailment"]
    elif case == "map to unknown":
        extra = ["--label-map", "not_entailment=maybe"]
    elif case == "missing field":
        data = tmp_path / "nolabel.jsonl"
        data.write_text('{"premise": "a", "hypothesis": "b"}\n')
    expected = {"no run": "no such run directory", "not a run": "no config.json", "no checkpoint": "no readable "
                "checkpoint", "unknown labels": "labels the model does not know: ['not_entailment'] (the model's "
                "labels: contradiction, entailment, neutral)", "bad map": "FILE_LABEL=MODEL_LABEL",
                "map to unknown": "['maybe'] not among the model's labels", "missing field": "field 'label' not found"}
    # Execute
    result = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(data), *extra])
    # Assert
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and expected[case] in error[0], result.output


def test_text_to_text_run_uses_the_run_loops_evaluation(tiny_t5_dir, tmp_path):
    """A T5 run generating label words: its evaluation set gives the run's last scores; with the two-way map a
    generated 'maybe' or 'no' matches not_entailment, so no example scores lower than with three labels."""
    # Prepare
    words = {"entailment": "yes", "neutral": "maybe", "contradiction": "no"}
    cfg = config_from_dict({
        "model": {"name": tiny_t5_dir, "task": "seq2seq", "max_length": 32, "max_target_length": 4},
        "data": {"train": str(MNLI_TRAIN), "eval": str(MNLI_EVAL), "prompt": "mnli premise: {premise} hypothesis: "
                 "{hypothesis}", "label_words": words, "train_size": 16, "eval_size": 12},
        "generation": {"metrics": ["accuracy"], "max_new_tokens": 3},
        "partition": {"method": "iid", "num_clients": 1},
        "federated": {"rounds": 1, "clients_per_round": 1, "local_steps": 1, "batch_size": 8},
        "heads": {"samples": 4}, "out": str(tmp_path), "run_name": "t5",
    })
    run_simulation(cfg, tmp_path / "t5")
    rows = [json.loads(line) for line in MNLI_EVAL.read_text().splitlines()[:12]]
    (tmp_path / "three.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    two = [{**r, "label": "entailment" if r["label"] == "entailment" else "not_entailment"} for r in rows]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in two))
    # Execute
    three_way = CliRunner().invoke(app, ["evaluate", str(tmp_path / "t5"), "--data", str(tmp_path / "three.jsonl")])
    two_way = CliRunner().invoke(app, ["evaluate", str(tmp_path / "t5"), "--data", str(tmp_path / "two.jsonl"),
                                       "--label-map", "not_entailment=neutral|no"])  # a label value or its word
    # Assert
    assert three_way.exit_code == 0 and two_way.exit_code == 0, three_way.output + two_way.output
    last = read_metrics(tmp_path / "t5")[-1]
    scores = json.loads((tmp_path / "t5" / "evaluate.three.json").read_text())["metrics"]
    assert scores["accuracy"] == last["accuracy"]
    assert scores["eval_loss"] == pytest.approx(last["eval_loss"], abs=1e-5)
    two_scores = json.loads((tmp_path / "t5" / "evaluate.two.json").read_text())["metrics"]
    assert two_scores["accuracy"] >= scores["accuracy"]


@pytest.fixture(scope="module")
def pruned_run(tiny_bert_dir, tmp_path_factory):
    """Two rounds whose clients train half of the heads, scored on the first EVAL_SIZE pairs of MNLI dev."""
    out = tmp_path_factory.mktemp("pruned")
    cfg = tiny_config(tiny_bert_dir, out, data={"eval_size": EVAL_SIZE}, heads={"sparsity": 0.5},
                      federated={"rounds": 2, "local_steps": 1})
    run_simulation(cfg, out / "run")
    rows = MNLI_EVAL.read_text().splitlines()[:EVAL_SIZE]
    (out / "three.jsonl").write_text("".join(line + "\n" for line in rows))
    return out


def _consensus_by_hand(run_dir, sparsity: float, window: int) -> torch.Tensor:
    """consensus_heads_mask over every client update of the last `window` rounds, read from metrics.jsonl here."""
    kept, scores = [], []
    for m in [m for m in read_metrics(run_dir) if m.get("round", 0) > 0][-window:]:
        for c in m["clients"]:
            score = torch.tensor(c["head_scores"], dtype=torch.float64)
            mask = torch.zeros(score.numel(), dtype=torch.bool)
            mask[c["kept_heads"]] = True
            kept.append(mask.view(score.shape))
            scores.append(score)
    return consensus_heads_mask(torch.stack(kept), torch.stack(scores), sparsity)


def _scores_by_hand(run_dir, data, mask: torch.Tensor) -> tuple[float, float, int]:
    """(accuracy, cross-entropy, forward FLOPs of the whole batch) of the run's model pruned to `mask`."""
    run = load_trained(run_dir, device="cpu")
    prune_heads_(run.lm.model, run.lm.head_map, mask, run.lm.prefix)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    batch = run.lm.tokenizer([r["premise"] for r in rows], [r["hypothesis"] for r in rows], padding=True,
                             truncation=True, max_length=run.cfg.model.max_length, return_tensors="pt")
    gold = torch.tensor([run.label_names.index(r["label"]) for r in rows])
    with torch.no_grad():
        logits = run.lm.model(**batch).logits
    accuracy = float((logits.argmax(-1) == gold).float().mean())
    return accuracy, float(torch.nn.functional.cross_entropy(logits, gold)), int(mask.sum())


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_pruned_evaluation_is_the_model_pruned_by_hand(pruned_run, sparsity):
    # Prepare
    run_dir, data = pruned_run / "run", pruned_run / "three.jsonl"
    mask = _consensus_by_hand(run_dir, sparsity, window=5)
    accuracy, loss, kept = _scores_by_hand(run_dir, data, mask)
    # Execute
    result = CliRunner().invoke(app, ["evaluate", str(run_dir), "--data", str(data), "--pruned", str(sparsity)])
    # Assert
    assert result.exit_code == 0, result.output
    saved = json.loads((run_dir / f"evaluate.three.pruned-{sparsity:g}.json").read_text())
    pruned = saved["pruned"]
    assert torch.equal(torch.tensor(pruned["mask"], dtype=torch.bool), mask)
    assert pruned["kept_heads"] == kept == mask.shape[0] * math.ceil((1 - sparsity) * mask.shape[1])
    assert pruned["sparsity"] == sparsity and pruned["window"] == 5
    assert saved["metrics"]["accuracy"] == accuracy
    assert saved["metrics"]["eval_loss"] == pytest.approx(loss, abs=1e-5)
    flops = pruned["forward_flops"]
    assert 0 < flops["pruned"] < flops["whole"]
    assert f"kept_heads {kept} of {pruned['total_heads']}" in result.stdout.splitlines()


def test_pruned_evaluation_of_a_run_whose_clients_kept_and_scored_every_head(tiny_bert_dir, mnli_run, tmp_path):
    """Every client kept every head (sparsity 0) but scored them (the server weighs heads by importance): the
    consensus is the heads of highest mean score."""
    # Prepare
    cfg = tiny_config(tiny_bert_dir, tmp_path, data={"eval_size": EVAL_SIZE}, federated={
        "rounds": 1, "local_steps": 1, "aggregation": "head_weighted", "aggregation_weights": "importance"})
    run_dir, data = tmp_path / "run", mnli_run / "three.jsonl"
    run_simulation(cfg, run_dir)
    metrics = [m for m in read_metrics(run_dir) if m.get("round", 0) > 0]
    scores = torch.tensor([c["head_scores"] for m in metrics for c in m["clients"]], dtype=torch.float64)
    assert len(set(scores.flatten().tolist())) > 1  # scored, not the unscored ones
    expected = kept_heads_mask(scores.mean(0), 0.5, "per_block")
    accuracy, loss, _ = _scores_by_hand(run_dir, data, expected)
    # Execute
    result = CliRunner().invoke(app, ["evaluate", str(run_dir), "--data", str(data), "--pruned", "0.5",
                                      "--window", "1", "--out", str(tmp_path / "all-kept.json")])
    # Assert
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "all-kept.json").read_text())
    assert torch.equal(torch.tensor(saved["pruned"]["mask"], dtype=torch.bool), expected)
    assert saved["metrics"]["accuracy"] == accuracy
    assert saved["metrics"]["eval_loss"] == pytest.approx(loss, abs=1e-5)


def test_pruned_evaluation_refuses_a_run_whose_clients_neither_pruned_nor_scored(mnli_run):
    """A dense FedAvg run's clients keep every head without scoring them: no ranking, so no arbitrary mask."""
    # Execute
    result = CliRunner().invoke(app, ["evaluate", str(mnli_run / "run"), "--data", str(mnli_run / "three.jsonl"),
                                      "--pruned", "0.5"])
    # Assert
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "kept every head and did not score them" in error[0], result.output


@pytest.mark.parametrize("case", ["zero", "one", "negative", "no metrics"])
def test_pruned_errors_are_one_line(mnli_run, tmp_path, case):
    # Prepare
    run, sparsity = mnli_run / "run", {"zero": "0", "one": "1", "negative": "-0.5", "no metrics": "0.5"}[case]
    if case == "no metrics":
        run = tmp_path / "copy"
        shutil.copytree(mnli_run / "run", run)
        (run / "metrics.jsonl").unlink()
    expected = ("no client update" if case == "no metrics" else
                f"pruned sparsity must be in (0, 1), got {float(sparsity)}")
    # Execute
    result = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(mnli_run / "three.jsonl"),
                                      "--pruned", sparsity])
    # Assert
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and expected in error[0], result.output


def test_pruned_deployment_is_scored_at_every_evaluation(pruned_run, tmp_path):
    """heads.eval_pruned: every evaluation also scores the global model pruned to the consensus of the last
    rounds' client masks, exactly as pruning that round's model by hand, without changing the run itself."""
    # Prepare
    plain = pruned_run / "run"
    cfg = config_from_dict({**json.loads((plain / "config.json").read_text()), "out": str(tmp_path)})
    cfg = cfg.model_copy(update={"heads": cfg.heads.model_copy(update={"eval_pruned": 0.5, "eval_pruned_window": 1})})
    # Execute
    summary = run_simulation(cfg, tmp_path / "run")
    # Assert
    metrics = read_metrics(tmp_path / "run")
    evaluated = [m for m in metrics if m.get("round", 0) > 0 and "accuracy" in m]
    assert evaluated and all("pruned_accuracy" in m and "pruned_eval_loss" in m for m in evaluated)
    assert "pruned_accuracy" not in metrics[0]  # round 0: no client has uploaded a mask yet
    last = metrics[-1]
    blocks_heads = torch.tensor(last["clients"][0]["head_scores"]).shape
    assert last["pruned_kept_heads"] == blocks_heads[0] * math.ceil(0.5 * blocks_heads[1])
    mask = _consensus_by_hand(tmp_path / "run", 0.5, window=1)
    accuracy, loss, _ = _scores_by_hand(tmp_path / "run", pruned_run / "three.jsonl", mask)
    assert last["pruned_accuracy"] == accuracy
    assert last["pruned_eval_loss"] == pytest.approx(loss, abs=1e-5)
    assert summary["pruned_final_score"] == accuracy and summary["pruned_kept_heads"] == last["pruned_kept_heads"]

    def whole_model(lines):  # what the run did and measured, without the pruned scores and the timings
        return [{k: v for k, v in m.items() if not k.startswith(("pruned_", "seconds"))} for m in lines]

    plain_metrics = read_metrics(plain)
    for m in [*plain_metrics, *metrics]:
        for c in m.get("clients", []):
            c.pop("train_seconds", None), c.pop("scoring_seconds", None)
    assert whole_model(metrics) == whole_model(plain_metrics)


def test_eval_pruned_needs_clients_that_prune():
    with pytest.raises(ConfigError, match="eval_pruned"):
        config_from_dict({"heads": {"eval_pruned": 0.5}})
