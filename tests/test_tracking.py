"""`fedhead run --tensorboard`: each round's scalars in RUN_DIR/tensorboard, read back with TensorBoard's own
EventAccumulator and compared with metrics.jsonl."""

from __future__ import annotations

import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from fedhead.cli import app
from tests.conftest import read_metrics, write_tiny_toml

# TensorBoard tag -> how to get its value from a metrics line (None: not in that round)
EXPECTED = {
    "eval/accuracy": lambda m: m.get("accuracy"),
    "eval/loss": lambda m: m.get("eval_loss"),
    "train/loss": lambda m: m.get("train_loss"),
    "communication/bytes_up": lambda m: m.get("bytes_up"),
    "communication/bytes_down": lambda m: m.get("bytes_down"),
    "compute/train_flops": lambda m: m.get("train_flops"),
    "time/seconds_clients": lambda m: m.get("seconds_clients"),
    "heads/mean_client_sparsity": lambda m: (sum(c["sparsity"] for c in m["clients"]) / len(m["clients"])
                                             if m.get("clients") else None),
    "clients/accepted": lambda m: len(m["clients"]) if "clients" in m else None,
}


def _scalars(run_dir) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_events_equal_the_metrics_lines_and_resume_appends(tmp_path, tiny_bert_dir):
    # Prepare: three rounds, evaluated every second round and at the end; tiers give a mean sparsity of 0.375
    config = write_tiny_toml(tmp_path / "tb.toml", tiny_bert_dir, federated={"rounds": 3, "eval_every": 2},
                             heads={"tiers": [0.5, 0.25]}, data={"eval_size": 16}, model={"max_length": 32})
    runner = CliRunner()
    # Execute: two rounds, then the third by resuming
    first = runner.invoke(app, ["run", str(config), "--out", str(tmp_path), "--rounds", "2", "--quiet",
                                "--tensorboard"])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, ["run", "--resume", str(tmp_path / "tb"), "--rounds", "3", "--quiet",
                                 "--tensorboard"])
    assert second.exit_code == 0, second.output
    # Assert
    metrics = read_metrics(tmp_path / "tb")
    scalars = _scalars(tmp_path / "tb")
    assert [m["round"] for m in metrics] == [0, 1, 2, 3] and "accuracy" not in metrics[1]
    for tag, value_of in EXPECTED.items():
        expected = {m["round"]: value_of(m) for m in metrics if value_of(m) is not None}
        assert set(scalars[tag]) == set(expected), tag  # e.g. accuracy at rounds 0, 2 and 3 only
        for step, value in expected.items():
            assert scalars[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)  # float32 in the event file
    assert scalars["heads/mean_client_sparsity"][1] == pytest.approx(0.375)


def test_tensorboard_without_the_package_is_one_line_before_any_work(tmp_path, tiny_bert_dir, monkeypatch):
    # Prepare: an interpreter where `import tensorboard` fails
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    config = write_tiny_toml(tmp_path / "tb.toml", tiny_bert_dir)
    # Execute
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(tmp_path), "--tensorboard"])
    # Assert
    assert result.exit_code == 2
    assert "--tensorboard needs the tensorboard package: pip install 'fedhead[tensorboard]'" in result.output
    assert not (tmp_path / "tb").exists()
