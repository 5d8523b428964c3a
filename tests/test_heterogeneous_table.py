"""The mixed federation's table (bench/heterogeneous.py): each weak tier trains exactly as the single-tier row whose
costs the table quotes, fits a weak device's limits, and the committed table is what the committed records give."""

from __future__ import annotations

import json
import re

import pytest

from fedhead.config import load_config
from fedhead.federated.client import ClientOptions
from tests.conftest import MNLI_EVAL, MNLI_TRAIN, ROOT, load_bench


@pytest.fixture(scope="module")
def heterogeneous():
    return load_bench("heterogeneous")


@pytest.fixture(scope="module")
def protocol():
    return load_bench("frontier_protocol")


def _client(protocol, overrides: dict, client: int) -> tuple:
    """How `client` trains in round 5 of a protocol run with `overrides`: its local training, checkpointing,
    sparsity and upload."""
    cfg = load_config(protocol.BASE, {**overrides, **protocol.PROTOCOL})
    options = ClientOptions.from_config(cfg)
    return (options.training_of(client), options.checkpointing_of(client), cfg.heads.sparsity_of(client, 5),
            options.upload_bits, cfg.federated.selectable(client))


@pytest.mark.skipif(not (MNLI_TRAIN.exists() and MNLI_EVAL.exists()), reason="needs ../shared/data (MultiNLI)")
def test_each_weak_tier_trains_as_the_row_it_is_costed_as(heterogeneous, protocol):
    rows = protocol.ROWS
    for federation, weak in heterogeneous.WEAK_TIER.items():
        for client in (1, 2, 3, 5):  # weak: c % 4 != 0
            assert _client(protocol, rows[federation], client) == _client(protocol, rows[weak], 0), (federation, client)
        assert _client(protocol, rows[federation], 4) == _client(protocol, {}, 0), federation  # capable: dense


def test_each_weak_tier_fits_a_weak_device(heterogeneous):
    costs = json.loads(heterogeneous.COSTS.read_text())["rows"]
    for federation, weak in heterogeneous.WEAK_TIER.items():
        assert costs["dense"]["train_flops"] / costs[weak]["train_flops"] >= 2, federation
        assert costs["dense"]["peak_memory_bytes"] / costs[weak]["peak_memory_bytes"] >= 2, federation


def test_the_committed_table_is_the_records_table(heterogeneous):
    assert heterogeneous.table() in heterogeneous.TABLE.read_text()


MEASURED = re.compile(r"# measured: drop ([+-][0-9.]+) points \[([+-][0-9.]+), ([+-][0-9.]+)\] below all-dense, gain "
                      r"([+-][0-9.]+) points \[([+-][0-9.]+), ([+-][0-9.]+)\] over leaving the weak out \((\d) seeds\)")


def test_the_mixed_devices_preset_is_its_measured_row(heterogeneous, protocol):
    frontier_records = load_bench("frontier_records")
    preset = ROOT / "configs" / "mixed_devices.toml"
    text = preset.read_text()
    row = re.search(r"^# row: (\S+)$", text, re.M).group(1)
    assert row in heterogeneous.ROWS and row != heterogeneous.LEFT_OUT
    measured = load_config(protocol.BASE, {**protocol.ROWS[row], **protocol.PROTOCOL})
    assert load_config(preset).model_dump(exclude={"run_name"}) == measured.model_dump(exclude={"run_name"})
    # the drop and the gain its comment states, with their intervals, are the committed records'
    records = frontier_records.load_records(heterogeneous.RECORDS)
    dense = frontier_records.load_records(protocol.RESULTS)["dense"]
    drop = {s: -p for s, p in heterogeneous.paired_points(records, row, dense).items()}
    gain = heterogeneous.paired_points(records, row, records[heterogeneous.LEFT_OUT])
    stated = MEASURED.search(text)
    assert stated, f"{preset.name}: no '# measured: drop X points [lo, hi] below all-dense, gain ...' line"
    values = [float(v) for v in stated.groups()[:6]]
    assert int(stated.group(7)) == len(drop) == len(gain) >= 2
    expected = [*heterogeneous.mean_interval(drop), *heterogeneous.mean_interval(gain)]
    assert values == pytest.approx([round(v, 1) for v in expected], abs=0.051)
