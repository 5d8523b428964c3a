"""The run directory's checkpoint format (`fedhead.run_dir.Checkpoint`): every field survives a save and a load,
and a checkpoint file written before the typed `Checkpoint` existed (the flat tensor dict with key prefixes and
the JSON metadata, built here by hand) still loads, and is written again byte for byte."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_save

from fedhead.config import ConfigError
from fedhead.federated.selection import ClientStats
from fedhead.federated.state import State
from fedhead.federated.tail_average import TailAverage
from fedhead.run_dir import CHECKPOINT, Checkpoint, RunDir


def _same(a: State, b: State) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _stats() -> ClientStats:
    stats = ClientStats()
    stats.record(3, 2, loss_global=1.25, loss_local=0.5, kept=[0, 2])
    stats.record(10, 4, loss_global=0.75, loss_local=0.25, kept=[1])
    return stats


def _rng_state() -> dict:
    rng = np.random.default_rng(7)
    rng.integers(0, 10, size=5)
    return rng.bit_generator.state


def test_a_checkpoint_round_trips_through_save_and_load(tmp_path):
    # Prepare: every field set, tensors of several dtypes, two clients' residuals, a complete tail average
    state = {"a.lora_A.weight": torch.randn(2, 3), "classifier.weight": torch.randn(3, 2).half()}
    saved = Checkpoint(
        round=4, state=state, rng=_rng_state(), client_stats=_stats(), config={"seed": 7, "federated": {"rounds": 4}},
        server_moments={"m.a.lora_A.weight": torch.randn(2, 3), "v.a.lora_A.weight": torch.rand(2, 3)},
        residuals={3: {"a.lora_A.weight": torch.randn(2, 3)}, 10: {"a.lora_A.weight": torch.randn(2, 3)}},
        tail_average=TailAverage(start=3, count=2, total={k: v.double() * 2 for k, v in state.items()}),
        tail_average_complete=True)
    rd = RunDir(tmp_path)
    # Execute
    rd.save_checkpoint(saved)
    loaded = rd.load_checkpoint()
    # Assert
    assert loaded is not None and (rd.path / CHECKPOINT).is_file()
    assert (loaded.round, loaded.rng, loaded.client_stats, loaded.config) == (4, saved.rng, _stats(), saved.config)
    assert _same(loaded.state, state) and _same(loaded.server_moments, saved.server_moments)
    assert loaded.residuals.keys() == {3, 10} and all(_same(loaded.residuals[c], saved.residuals[c]) for c in (3, 10))
    assert loaded.tail_average is not None and saved.tail_average is not None
    assert (loaded.tail_average.start, loaded.tail_average.count) == (3, 2)
    assert _same(loaded.tail_average.total, saved.tail_average.total) and loaded.tail_average_complete
    averaged = loaded.tail_averaged_state()  # the sum over 2 rounds of twice the state: the state itself
    assert averaged is not None and _same(averaged, state)


def _old_layout_file(with_tail: bool) -> tuple[bytes, dict]:
    """A checkpoint as the run loop wrote it before `Checkpoint`: one flat dict, prefixes by hand."""
    state = {"a.lora_A.weight": torch.arange(6.0).view(2, 3), "classifier.weight": torch.ones(3, 2)}
    flat = {**state, "server_optimizer/m.a.lora_A.weight": torch.full((2, 3), 0.5),
            "client_residual/3/a.lora_A.weight": torch.full((2, 3), -1.0),
            "client_residual/10/a.lora_A.weight": torch.full((2, 3), 2.0)}
    meta = {"round": 5, "rng": _rng_state(), "client_stats": _stats().to_json(), "config": {"seed": 7}}
    if with_tail:
        flat.update({"tail_average/" + k: v.double() for k, v in state.items()})
        meta["tail_average"] = {"start": 5, "count": 1, "complete": False}
    return safetensors_save(flat, metadata={"fedhead_checkpoint": json.dumps(meta)}), state


@pytest.mark.parametrize("with_tail", [True, False])
def test_a_checkpoint_of_the_flat_layout_loads_and_is_written_again_byte_for_byte(tmp_path, with_tail):
    # Prepare
    old, state = _old_layout_file(with_tail)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / CHECKPOINT).write_bytes(old)
    # Execute
    loaded = RunDir(tmp_path / "old").load_checkpoint()
    assert loaded is not None
    (tmp_path / "again").mkdir()
    RunDir(tmp_path / "again").save_checkpoint(loaded)
    # Assert
    assert loaded.round == 5 and loaded.rng == _rng_state() and loaded.client_stats == _stats()
    assert loaded.config == {"seed": 7} and _same(loaded.state, state)
    assert _same(loaded.server_moments, {"m.a.lora_A.weight": torch.full((2, 3), 0.5)})
    assert loaded.residuals.keys() == {3, 10} and torch.equal(loaded.residuals[10]["a.lora_A.weight"],
                                                              torch.full((2, 3), 2.0))
    if with_tail:
        assert loaded.tail_average is not None and (loaded.tail_average.start, loaded.tail_average.count) == (5, 1)
        assert not loaded.tail_average_complete and loaded.tail_averaged_state() is None
    else:
        assert loaded.tail_average is None
    assert (tmp_path / "again" / CHECKPOINT).read_bytes() == old


def test_read_config_names_what_is_wrong(tmp_path):
    rd = RunDir(tmp_path / "run")
    with pytest.raises(ConfigError, match="no such run directory"):
        rd.read_config()
    rd.path.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        rd.read_config()
    rd.config_file.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="damaged"):
        rd.read_config()
    rd.config_file.write_text(json.dumps({"federated": {"rounds": 2}}))
    assert rd.read_config().federated.rounds == 2 and rd.read_config(rounds=5).federated.rounds == 5
    with pytest.raises(ConfigError, match="federated.rounds"):
        rd.read_config(rounds=0)
