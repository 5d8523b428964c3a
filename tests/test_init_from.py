"""model.init_from (warm start): a run starts from another run's global model, every adapter tensor included (a
frozen A stays at that run's trained A), resumes and reloads from it, and refuses a source that does not fit."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fedhead.cli import app
from fedhead.config import ConfigError
from fedhead.federated.evaluation import evaluate
from fedhead.models import build_model
from fedhead.models.loading import is_adapter_parameter
from fedhead.runners.local import Simulation, run_simulation
from fedhead.trained import build_run_model, load_trained, starting_state
from tests.conftest import read_metrics, strip_timings, tiny_config, write_tiny_toml


@pytest.fixture(scope="module")
def source_run(tiny_bert_dir, tmp_path_factory):
    """A 3-round run that trains A and B (a high learning rate, so its adapter is far from any initialisation),
    with a 2-round tail average."""
    out = tmp_path_factory.mktemp("source")
    cfg = tiny_config(tiny_bert_dir, out, federated={"rounds": 3, "tail_average_rounds": 2,
                                                     "learning_rate": 5e-3})
    run_simulation(cfg, out / "source")
    return out / "source"


def adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if is_adapter_parameter(n)}


def test_a_warm_started_run_begins_at_the_source_tail_average_and_keeps_its_frozen_a(
        source_run, tiny_bert_dir, tmp_path):
    # Prepare
    cfg = tiny_config(tiny_bert_dir, tmp_path, model={"init_from": str(source_run)}, lora={"freeze_a": True},
                      heads={"sparsity": 0.5}, federated={"rounds": 2})
    source = load_trained(source_run, tail_average=True)
    fresh = adapter(build_model(tiny_config(tiny_bert_dir, tmp_path, lora={"freeze_a": True}), 3).model)
    # Execute
    sim = Simulation.setup(cfg)
    start = adapter(sim.lm.model)
    run_simulation(cfg, tmp_path / "warm")
    warm = load_trained(tmp_path / "warm")
    # Assert: the start is the source's tail-averaged adapter (A, B and the classifier), not a fresh one
    expected = adapter(source.lm.model)
    assert set(start) == set(expected) and all(torch.equal(start[n], expected[n]) for n in start)
    lora_a = [n for n in start if ".lora_A." in n]
    assert lora_a and not any(torch.allclose(start[n], fresh[n]) for n in lora_a)
    # round 0 scores the source model
    first = read_metrics(tmp_path / "warm")[0]
    assert first["round"] == 0
    assert first["accuracy"] == evaluate(source.lm.model, sim.data.eval, sim.lm.tokenizer,
                                         cfg.federated.eval_batch_size)["accuracy"]
    # after training, the frozen A is still the source's (it is not in the checkpoint: rebuilt from the source)
    # and B has moved on
    trained = adapter(warm.lm.model)
    assert all(torch.equal(trained[n], expected[n]) for n in lora_a)
    assert any(not torch.equal(trained[n], expected[n]) for n in trained if ".lora_B." in n)


def test_a_warm_started_run_resumes_as_it_ran(source_run, tiny_bert_dir, tmp_path):
    cfg = tiny_config(tiny_bert_dir, tmp_path, model={"init_from": str(source_run)}, lora={"freeze_a": True},
                      federated={"rounds": 2, "local_steps": 1})
    run_simulation(cfg, tmp_path / "whole")
    run_simulation(cfg, tmp_path / "stopped", stop_after=1)
    run_simulation(cfg, tmp_path / "stopped", resume=True)
    assert strip_timings(read_metrics(tmp_path / "stopped")) == strip_timings(read_metrics(tmp_path / "whole"))


def test_the_source_without_a_tail_average_gives_its_last_round(source_run, tiny_bert_dir, tmp_path):
    cfg = tiny_config(tiny_bert_dir, tmp_path, federated={"rounds": 1, "learning_rate": 5e-3})
    run_simulation(cfg, tmp_path / "short")
    state = starting_state(tmp_path / "short")
    last = adapter(load_trained(tmp_path / "short").lm.model)
    assert all(torch.equal(state[n], last[n]) for n in last)


def test_sources_that_do_not_fit_are_refused(source_run, tiny_bert_dir, tmp_path):
    with pytest.raises(ConfigError, match="init_from.*does not fit.*LoRA rank"):
        build_run_model(tiny_config(tiny_bert_dir, tmp_path, model={"init_from": str(source_run)}, lora={"rank": 4}),
                        3)
    with pytest.raises(ConfigError, match="init_from.*no such run directory"):
        build_run_model(tiny_config(tiny_bert_dir, tmp_path, model={"init_from": str(tmp_path / "nowhere")}), 3)
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.json").write_text((source_run / "config.json").read_text())
    with pytest.raises(ConfigError, match="init_from.*(partition.json|checkpoint)"):
        build_run_model(tiny_config(tiny_bert_dir, tmp_path, model={"init_from": str(tmp_path / "started")}), 3)
    # models know nothing of run directories: building a warm-started run's model without its adapter is refused
    with pytest.raises(ConfigError, match="build_run_model"):
        build_model(tiny_config(tiny_bert_dir, tmp_path, model={"init_from": str(source_run)}), 3)
    with pytest.raises(ConfigError, match="own directory"):
        tiny_config(tiny_bert_dir, tmp_path, model={"init_from": str(tmp_path / "tiny")})  # out / run_name


def test_cli_warm_start(source_run, tiny_bert_dir, tmp_path):
    toml = write_tiny_toml(tmp_path / "warm.toml", tiny_bert_dir, federated={"rounds": 1})
    result = CliRunner().invoke(app, ["run", str(toml), "--out", str(tmp_path), "--init-from", str(source_run),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "warm" / "config.json").read_text())
    assert stored["model"]["init_from"] == str(source_run)
    bad = CliRunner().invoke(app, ["run", str(toml), "--out", str(tmp_path), "--name", "bad", "--init-from",
                                   str(tmp_path / "nowhere"), "--quiet"])
    assert bad.exit_code != 0 and "model.init_from" in bad.output and "no such run directory" in bad.output
