"""federated.tail_average_rounds: the mean of the global states after the last W rounds, evaluated at the end,
checkpointed so that resuming and extending give the same average, and loadable for `fedhead evaluate`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fedhead.cli import app
from fedhead.config import ConfigError
from fedhead.federated.evaluation import evaluate
from fedhead.federated.payload import decode_state
from fedhead.federated.state import load_state_
from fedhead.federated.tail_average import TailAverage
from fedhead.run_dir import TAIL_AVERAGE
from fedhead.runners.local import Simulation, run_simulation
from fedhead.trained import load_trained
from tests.conftest import MNLI_EVAL, read_metrics, strip_timings, tiny_config


def test_running_mean_over_the_window_only():
    tail = TailAverage.for_run(rounds=5, window=2)
    assert tail.start == 4 and TailAverage.for_run(5, 0) is None and TailAverage.for_run(3, 9).start == 1
    like = {"w": torch.zeros(2, dtype=torch.float32)}
    for round_, value in [(1, 100.0), (3, 50.0), (4, 1.0), (5, 2.0)]:  # rounds 1 and 3 are before the window
        tail.add(round_, {"w": torch.full((2,), value)})
    assert tail.complete(5) and not tail.complete(6)
    mean = tail.mean(like)
    assert mean["w"].dtype == torch.float32 and torch.equal(mean["w"], torch.full((2,), 1.5))
    again = TailAverage.resumed(tail, rounds=5, window=2)  # a resumed run: the checkpoint's sum goes on
    assert torch.equal(again.mean(like)["w"], mean["w"]) and again.count == 2
    moved = TailAverage.resumed(tail, rounds=8, window=2)  # extended run: a new window, empty
    assert moved.start == 7 and moved.count == 0
    assert TailAverage.resumed(None, rounds=5, window=2).count == 0 and TailAverage.resumed(tail, 5, 0) is None


@pytest.fixture(scope="module")
def averaged_run(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tail")
    cfg = tiny_config(tiny_bert_dir, out, heads={"sparsity": 0.5},
                      federated={"rounds": 4, "local_steps": 1, "tail_average_rounds": 2})
    summary = run_simulation(cfg, out / "run")
    return cfg, out, summary


def test_tail_average_is_the_mean_of_the_last_rounds_states(averaged_run):
    """The last round's metrics score the mean of the states after rounds 3 and 4 (the previous and the last
    checkpoint), and load_trained(tail_average=True) rebuilds exactly that model."""
    # Prepare
    cfg, out, summary = averaged_run
    last = read_metrics(out / "run")[-1]
    state_4 = decode_state((out / "run" / "checkpoint.safetensors").read_bytes())
    state_3 = decode_state((out / "run" / "checkpoint.prev.safetensors").read_bytes())
    names = [k for k in state_4 if "/" not in k]
    by_hand = {k: (state_3[k].double() + state_4[k].double()).div(2).float() for k in names}
    sim = Simulation.setup(cfg)
    # Execute
    load_state_(sim.lm.model, by_hand)
    expected = evaluate(sim.lm.model, sim.data.eval, sim.lm.tokenizer, cfg.federated.eval_batch_size)
    run = load_trained(out / "run", tail_average=True)
    # Assert
    assert any(k.startswith(TAIL_AVERAGE) for k in state_4)
    assert last["tail_average_eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-6)
    assert last["tail_average_accuracy"] == expected["accuracy"] == summary["tail_average_score"]
    params = dict(run.lm.model.named_parameters())
    assert all(torch.allclose(params[k], by_hand[k], atol=1e-7) for k in names)
    assert not torch.equal(by_hand[names[0]], state_4[names[0]])  # not simply the last state
    last_round = load_trained(out / "run")
    assert torch.equal(dict(last_round.lm.model.named_parameters())[names[0]], state_4[names[0]])


def test_resumed_and_extended_runs_keep_their_window(averaged_run, tmp_path):
    cfg, out, _ = averaged_run
    # a run stopped inside the window and resumed ends with the uninterrupted run's metrics, average included
    run_simulation(cfg, tmp_path / "resumed", stop_after=3)
    run_simulation(cfg, tmp_path / "resumed", resume=True)
    assert strip_timings(read_metrics(tmp_path / "resumed")) == strip_timings(read_metrics(out / "run"))
    # extended to 6 rounds: the average is over rounds 5 and 6, as in a run started with 6 rounds
    longer = cfg.model_copy(update={"federated": cfg.federated.model_copy(update={"rounds": 6})})
    run_simulation(longer, tmp_path / "resumed", resume=True)
    run_simulation(longer, tmp_path / "six")
    extended, six = strip_timings(read_metrics(tmp_path / "resumed")), strip_timings(read_metrics(tmp_path / "six"))
    assert extended[-1] == six[-1] and "tail_average_accuracy" in six[-1]
    assert "tail_average_accuracy" in extended[4]  # round 4 keeps the 4-round run's average, which six lacks

    def without_average(lines):
        return [{k: v for k, v in m.items() if not k.startswith("tail_average")} for m in lines]

    assert without_average(extended) == without_average(six)


def test_a_window_entered_without_the_running_sum_is_not_averaged(averaged_run, tmp_path):
    """A run resumed inside its window from a checkpoint that has no running sum (written without
    tail_average_rounds) does not pass off a partial mean as the tail average."""
    cfg, out, _ = averaged_run
    plain = cfg.model_copy(update={"federated": cfg.federated.model_copy(update={"tail_average_rounds": 0})})
    run_simulation(plain, tmp_path / "run", stop_after=3)
    run_simulation(cfg, tmp_path / "run", resume=True)  # the window changes on resume: allowed, evaluation only
    last = read_metrics(tmp_path / "run")[-1]
    assert last["tail_average_rounds_seen"] == 1 and "tail_average_accuracy" not in last
    with pytest.raises(ConfigError, match="no complete tail average"):
        load_trained(tmp_path / "run", tail_average=True)


def test_evaluate_scores_the_tail_average(averaged_run, tmp_path):
    _, out, _ = averaged_run
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(line + "\n" for line in MNLI_EVAL.read_text().splitlines()[:16]))
    result = CliRunner().invoke(app, ["evaluate", str(out / "run"), "--data", str(data), "--tail-average"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "run" / "evaluate.pairs.tail-average.json").read_text())
    assert saved["model"] == "tail_average" and saved["examples"] == 16


def test_window_longer_than_the_run_is_rejected(tiny_bert_dir, tmp_path):
    with pytest.raises(ConfigError, match="tail_average_rounds"):
        tiny_config(tiny_bert_dir, tmp_path, federated={"rounds": 2, "tail_average_rounds": 3})


def test_export_writes_the_tail_average(averaged_run, tmp_path):
    """The exported model's classifier is the averaged one (LoRA merging does not touch it), not the last round's."""
    from safetensors.torch import load_file

    _, out, _ = averaged_run
    result = CliRunner().invoke(app, ["export", str(out / "run"), str(tmp_path / "avg"), "--tail-average"])
    assert result.exit_code == 0, result.output
    weights = load_file(tmp_path / "avg" / "model.safetensors")
    run = load_trained(out / "run", tail_average=True)
    classifier = {n: p for n, p in run.lm.model.named_parameters() if p.requires_grad and "classifier" in n}
    name, value = next((n, p) for n, p in classifier.items() if n.endswith("weight"))
    exported = next(v for k, v in weights.items() if k.endswith("classifier.weight"))
    assert torch.allclose(exported, value.detach())
    last = next(p for n, p in load_trained(out / "run").lm.model.named_parameters() if n == name)
    assert not torch.allclose(exported, last.detach())
