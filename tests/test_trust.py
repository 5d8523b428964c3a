"""Trust nothing: no client field crashes or steers the server round, and a run directory is never mixed or
half-written. Each test names the defect it failed on before its fix (issue "Trust nothing")."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedhead.config import ConfigError
from fedhead.federated.aggregation import aggregate
from fedhead.federated.payload import ClientUpdate
from fedhead.federated.selection import ClientStats, Selection
from fedhead.federated.server import Reply, ServerOptions, server_round
from fedhead.federated.server_optimizer import ServerOptimizer
from fedhead.run_dir import RunDir
from tests.test_robustness import GLOBAL, LAYOUT, valid_update

FULL = ((True, True), (True, True))


def _replies(updates: list[ClientUpdate]) -> list[Reply]:
    return [Reply(u.client_id, u, 100, 50 + i, {"train_seconds": 1.0}) for i, u in enumerate(updates)]


def _round(updates, opts=ServerOptions(), stats=None, **kw):
    selection = Selection([u.client_id for u in updates], {}, "test")
    return server_round(GLOBAL, 1, _replies(updates), selection, stats or ClientStats(), {}, LAYOUT, opts, **kw)


def test_clipped_updates_stay_in_the_books():
    """Defect 1: a clipped update is a new object and was dropped from clients, bytes and client statistics
    (the client then kept loss-gap priority +inf forever)."""
    updates = [valid_update(i, FULL, shift=1.0 + i) for i in range(3)]
    stats = ClientStats()
    result = _round(updates, ServerOptions(max_norm=0.5, norm_action="clip"), stats)
    assert [c["client"] for c in result.metrics["clients"]] == [0, 1, 2]
    assert result.metrics["bytes_up"] == 50 + 51 + 52
    assert sorted(stats.last_round) == [0, 1, 2]
    assert not torch.equal(result.state["cls"], GLOBAL["cls"])


@pytest.mark.parametrize("stats", [
    {}, {"train_flops": "x"}, {"train_flops": float("nan")}, {"train_flops": -1}, {"train_flops": 1e300},
    {"bytes_up": 0, "client": 99, "kept_heads": "x", "loss_before": -5.0},
])
def test_reported_statistics_never_crash_or_overwrite(stats):
    """Defect 2: a missing or non-numeric train_flops crashed the round, and `stats` / `timings` could overwrite
    measured fields (bytes_up, client, kept_heads); kept_heads 'x' crashed the next head_coverage selection."""
    honest = valid_update(0, FULL)
    odd = valid_update(1, FULL)
    odd.stats = dict(stats)
    reply_stats = ClientStats()
    result = _round([honest, odd], stats=reply_stats)
    line = result.metrics["clients"][1]
    assert line["client"] == 1 and line["bytes_up"] == 51 and line["kept_heads"] == [0, 1, 2, 3]
    assert line["loss_before"] == odd.loss_before
    assert isinstance(result.metrics["train_flops"], int | float) and math.isfinite(result.metrics["train_flops"])
    assert reply_stats.kept_heads[1] == [0, 1, 2, 3]


@pytest.mark.parametrize("n", [10**309, 2**1023, 10**9 + 1, 0, -3, True])
def test_data_size_is_bounded(n):
    """Defect 3: num_examples = 10**309 raised OverflowError in aggregation; two clients claiming 2**1023 each
    made the global state zero or NaN."""
    honest = valid_update(0, FULL)
    liar = valid_update(1, FULL, shift=3.0)
    liar.num_examples = n
    result = _round([honest, liar, valid_update(2, FULL)])
    assert [r["client"] for r in result.metrics["rejected"]] == [1]
    expected = aggregate(GLOBAL, [honest, valid_update(2, FULL)], LAYOUT)
    assert all(torch.equal(result.state[k], expected[k]) for k in GLOBAL)


def test_data_size_checked_against_what_the_server_knows():
    honest, liar = valid_update(0, FULL), valid_update(1, FULL)
    liar.num_examples = 5000
    result = _round([honest, liar], known_sizes={0: 10, 1: 10})
    assert [r["client"] for r in result.metrics["rejected"]] == [1] and "server knows" in \
        result.metrics["rejected"][0]["reason"]


def test_an_update_claiming_another_client_is_rejected():
    u = valid_update(3, FULL)
    selection = Selection([1], {}, "test")
    result = server_round(GLOBAL, 1, [Reply(1, u, 1, 1)], selection, ClientStats(), {}, LAYOUT, ServerOptions())
    assert result.metrics["rejected"] and "claims client 3" in result.metrics["rejected"][0]["reason"]


def test_robust_aggregation_bounds_one_attacker_per_head():
    """Defect 5: with 2 values nanmedian returned the attacker's lower one, and a 20% trim of 4 values cut
    nothing: one client sending -1e6 moved a median head slice to -1e6 and a trimmed-mean slice to -250,000."""
    honest = [valid_update(i, ((True, False), (True, True)), shift=1.0) for i in range(3)]
    attacker = valid_update(9, ((True, False), (True, True)), shift=-1e6)
    pair = [valid_update(0, ((False, True), (True, True)), shift=1.0), attacker]
    for method in ("median", "trimmed_mean"):
        four = aggregate(GLOBAL, [*honest, attacker], LAYOUT, method)
        assert all(float(v.min()) > -1.0 for v in four.values()), method  # bounded by the honest values
        two = aggregate(GLOBAL, pair, LAYOUT, method)
        assert float(two["qb"].min()) >= float(GLOBAL["qb"].min()), method  # 2 values: the previous value kept


HOSTILE_FIELDS = st.sampled_from(["num_examples", "loss_before", "loss_after", "train_loss", "stats", "timings",
                                  "client_id", "scores", "tensor", "kept"])
VALUES = st.one_of(st.integers(-2**1100, 2**1100), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=5), st.none(), st.booleans(), st.lists(st.integers(), max_size=3))


def _poison(u: ClientUpdate, field: str, value) -> Reply:
    timings = {"train_seconds": 1.0}
    if field == "stats":
        u.stats = {"train_flops": value, "steps": value, "bytes_up": value}
    elif field == "timings":
        timings = {"train_seconds": value, "client": value, "bytes_up": value}
    elif field == "client_id":
        u.client_id = value
    elif field == "scores":
        u.head_scores = torch.full((2, 2), value, dtype=torch.float64).float() if isinstance(value, float) else value
    elif field == "tensor":
        u.tensors["cls"] = torch.full((5,), value, dtype=torch.float64).float() if isinstance(value, float) else value
    elif field == "kept":
        u.kept_heads = value
    else:
        setattr(u, field, value)
    return Reply(7, u, 10, 10, timings)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=HOSTILE_FIELDS, value=VALUES, method=st.sampled_from(["fedavg", "head_weighted", "median",
                                                                   "trimmed_mean"]),
       optimizer=st.sampled_from(["none", "adam"]), clip=st.booleans())
def test_no_hostile_field_escapes_the_server_round(field, value, method, optimizer, clip):
    """1,000 generated hostile replies beside three honest ones: no exception escapes the server round, the
    state stays finite, the honest clients are aggregated and at most the hostile client is rejected."""
    honest = [valid_update(i, FULL, shift=0.1 * (i + 1)) for i in range(3)]
    hostile = _poison(valid_update(7, FULL, shift=0.2), field, value)
    opts = ServerOptions(aggregation=method, max_norm=5.0 if clip else None, norm_action="clip",
                         optimizer=ServerOptimizer(optimizer, learning_rate=0.01))
    replies = [*_replies(honest), hostile]
    selection = Selection([0, 1, 2, 7], {}, "test")
    result = server_round(GLOBAL, 1, replies, selection, ClientStats(), {}, LAYOUT, opts)
    assert all(bool(torch.isfinite(v).all()) for v in result.state.values())
    assert {c["client"] for c in result.metrics["clients"]} >= {0, 1, 2}
    assert {r["client"] for r in result.metrics["rejected"]} <= {7}
    assert all(math.isfinite(c.get("train_seconds", 0.0)) for c in result.metrics["clients"])
    json.dumps(result.metrics)  # the metrics line can always be written


# --- the run directory


def test_a_fresh_run_refuses_another_runs_directory(tmp_path):
    """Defect 6: a fresh run in an existing run directory kept the other run's checkpoints and summary."""
    rd = RunDir(tmp_path / "r")
    rd.create("{}")
    rd.append_metrics({"round": 0})
    with pytest.raises(ConfigError, match="holds another run"):
        RunDir(tmp_path / "r").create("{}")
    RunDir(tmp_path / "r").create("{}", overwrite=True)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_a_failed_resume_leaves_the_run_as_it_was(tmp_path, tiny_bert_dir):
    """Defect 7: a resume that then failed had already rewritten config.json and deleted summary.json."""
    from fedhead.runners.local import Simulation, drive_rounds, run_simulation
    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_bert_dir, tmp_path, federated={"rounds": 1})
    run_simulation(cfg, tmp_path / "tiny")
    before = {n: (tmp_path / "tiny" / n).read_bytes() for n in ("config.json", "summary.json")}
    longer = cfg.model_copy(update={"federated": cfg.federated.model_copy(update={"rounds": 2})})

    def failing_round(*_args):
        raise RuntimeError("the round failed")

    with pytest.raises(RuntimeError):
        drive_rounds(Simulation.setup(longer), RunDir(tmp_path / "tiny"), failing_round, resume=True)
    assert {n: (tmp_path / "tiny" / n).read_bytes() for n in before} == before


@pytest.mark.parametrize("name", ["../../x", "a/b", "", ".."])
def test_run_name_cannot_leave_the_output_folder(name, tmp_path):
    """Defect 8: run_name '../../x' wrote outside --out."""
    from fedhead.config import load_config

    with pytest.raises(ConfigError, match="run_name"):
        load_config(None, {"run_name": name, "out": str(tmp_path)})


def test_temporary_files_of_a_killed_write_are_removed(tmp_path):
    """Defect 9: a kill just before the checkpoint rename left a .checkpoint.safetensors.* file forever."""
    from fedhead.config import Config

    rd = RunDir(tmp_path)
    rd.create(Config().model_dump_json())
    stale = tmp_path / ".checkpoint.safetensors.abc123"
    stale.write_bytes(b"torn")
    rd.accept_config(Config())  # the resume path
    assert not stale.exists() and (tmp_path / "config.json").exists()


@pytest.mark.parametrize("option", ["federated.learning_rate", "lora.alpha", "privacy.noise_multiplier"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_options_are_rejected(option, value):
    """`federated.learning_rate = inf` was accepted, every client was rejected and config.json stored null."""
    from fedhead.config import load_config

    with pytest.raises(ConfigError, match=option.split(".")[1]):
        load_config(None, {option: value})


def test_reported_peak_memory_is_kept_and_summed_safely():
    u = valid_update(0, FULL)
    u.stats = {"peak_memory_bytes": 1234, "train_flops": 10, "steps": 2}
    line = _round([u]).metrics["clients"][0]
    assert line["peak_memory_bytes"] == 1234 and line["train_flops"] == 10
    assert np.isclose(_round([u]).metrics["train_flops"], 10)


@pytest.mark.parametrize("loss", [1e300, -1.0, 1e5])
def test_reported_losses_cannot_steer_selection(loss):
    """A finite but absurd loss_before (1e300) was accepted and gave its client the top loss-gap priority for
    the rest of the run: losses are cross-entropies in [0, 1e4]."""
    liar = valid_update(1, FULL)
    liar.loss_before = loss
    stats = ClientStats()
    result = _round([valid_update(0, FULL), liar], stats=stats)
    assert [r["client"] for r in result.metrics["rejected"]] == [1] and 1 not in stats.loss_global


# --- issue "Trust nothing, again"


@pytest.mark.parametrize(("field", "value"), [("num_examples", 3.7), ("num_examples", True), ("num_examples", 10.0),
                                              ("client_id", 2.9), ("client_id", "2"), ("client_id", 2.0)])
def test_payload_scalars_are_not_coerced(field, value):
    """Item 7: the decoder called int() before validation, so num_examples 3.7 became 3 and true 1, client_id 2.9
    and "2" became 2, and the server's round accepted them."""
    from fedhead.federated.payload import encode_update
    from fedhead.federated.validation import receive_update

    # Prepare
    sent = valid_update(2, FULL)
    setattr(sent, field, value)
    # Execute
    update, problem = receive_update(encode_update(sent))
    result = server_round(GLOBAL, 1, [Reply(2, update, 1, 1)], Selection([2], {}, "test"), ClientStats(), {},
                          LAYOUT, ServerOptions())
    # Assert
    assert problem is None and getattr(update, field) == value and type(getattr(update, field)) is type(value)
    assert [r["client"] for r in result.metrics["rejected"]] == [2], result.metrics["rejected"]
    assert result.metrics["clients"] == []


@pytest.mark.parametrize("method", ["fedavg", "head_weighted"])
def test_a_claimed_data_size_cannot_steer_a_deployment(method):
    """Item 1: where the server does not know the clients' data sizes (device-local data), one client claiming
    1,000,000 examples against honest 10-56 took the whole round's weight: the shared tensors moved fully to its
    values. An unverified claim now weighs as the median size the server knows (1 when none): 1/K of a round."""
    # Prepare: the honest clients send the global values of the shared tensor, the liar global + 1
    honest = [valid_update(i, FULL, shift=0.0) for i in range(4)]
    for u, n in zip(honest, [10, 23, 41, 56], strict=True):
        u.num_examples = n
    liar = valid_update(4, FULL, shift=1.0)
    liar.num_examples = 1_000_000
    opts = ServerOptions(aggregation=method)
    # Execute
    result = _round([*honest, liar], opts)
    # Assert: the shift of the shared tensor is the liar's weight, at most 1/K
    shift = float((result.state["cls"] - GLOBAL["cls"]).max())
    assert shift == pytest.approx(1 / 5)
    assert result.metrics["clients"][4]["num_examples"] == 1_000_000
    assert result.metrics["clients"][4]["num_examples_counted"] == 1
    # a size the server knows is checked, not replaced: known honest sizes weigh as they are, and an unverified
    # client beside them weighs as their median
    known = _round([*honest, liar], opts, known_sizes={0: 10, 1: 23, 2: 41, 3: 56})
    assert float((known.state["cls"] - GLOBAL["cls"]).max()) == pytest.approx(23 / (10 + 23 + 41 + 56 + 23))
    # devices that are trusted: "claimed" weighs the claim (the old behaviour, now asked for)
    trusted = _round([*honest, liar], ServerOptions(aggregation=method, unverified_sizes="claimed"))
    assert float((trusted.state["cls"] - GLOBAL["cls"]).max()) > 0.99
