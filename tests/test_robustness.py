"""Hostile and unlucky conditions: malformed updates, outliers, dropouts, crashes, differential privacy."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedhead.federated.aggregation import aggregate
from fedhead.federated.payload import ClientUpdate, encode_update
from fedhead.federated.privacy import dp_aggregate, epsilon_spent
from fedhead.federated.validation import receive_update, screen_updates
from fedhead.models.head_map import HeadLayout
from fedhead.models.slicing import gather_kept
from fedhead.run_dir import CHECKPOINT, RunDir
from fedhead.runners.local import run_simulation
from tests.conftest import ROOT, read_metrics, strip_timings, tiny_config, write_tiny_toml

LAYOUT = HeadLayout(num_blocks=2, num_heads=2, head_dim=2, sliced={"qb": (0, 0), "oa": (1, 1)})
GLOBAL = {"qb": torch.arange(8.0).view(4, 2), "oa": torch.ones(3, 4), "cls": torch.zeros(5)}


def valid_update(cid=0, kept=((True, False), (True, True)), shift=0.5) -> ClientUpdate:
    kept_t = torch.tensor(kept)
    full = {k: v + shift for k, v in GLOBAL.items()}
    return ClientUpdate(cid, 10, kept_t, torch.full((2, 2), 0.5), gather_kept(full, kept_t, LAYOUT), 1.0, 0.8, 0.9)


def mutate(update: ClientUpdate, kind: str, value: float) -> ClientUpdate:
    u = ClientUpdate(update.client_id + 100, update.num_examples, update.kept_heads.clone(),
                     update.head_scores.clone(), {k: v.clone() for k, v in update.tensors.items()},
                     update.loss_before, update.loss_after, update.train_loss)
    if kind == "extra_name":
        u.tensors["evil"] = torch.zeros(1)
    elif kind == "missing_name":
        u.tensors.pop("cls")
    elif kind == "shape":
        u.tensors["qb"] = torch.zeros(4, 2)  # full shape although only one head of block 0 was kept
    elif kind == "dtype":
        u.tensors["cls"] = u.tensors["cls"].double()
    elif kind == "nan":
        u.tensors["oa"][0, 0] = float("nan") if value > 0 else float("inf")
    elif kind == "heads_shape":
        u.kept_heads = torch.ones(3, 2, dtype=torch.bool)
    elif kind == "heads_dtype":
        u.kept_heads = u.kept_heads.int()
    elif kind == "scores_range":
        u.head_scores[0, 0] = 1.0 + abs(value) + 1e-3
    elif kind == "scores_negative":
        u.head_scores[1, 1] = -abs(value) - 1e-3
    elif kind == "size":
        u.num_examples = int(-abs(value))
    elif kind == "size_type":
        u.num_examples = 3.5
    elif kind == "loss":
        u.loss_before = float("nan")
    elif kind == "huge":
        u.tensors = {k: v * 0 + 1e6 for k, v in u.tensors.items()}
    return u


KINDS = ["extra_name", "missing_name", "shape", "dtype", "nan", "heads_shape", "heads_dtype", "scores_range",
         "scores_negative", "size", "size_type", "loss", "huge"]


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), value=st.floats(-1e3, 1e3, allow_nan=False), method=st.sampled_from(
    ["fedavg", "head_weighted", "median", "trimmed_mean"]))
def test_malformed_updates_are_rejected_and_change_nothing(kind, value, method):
    goods = [valid_update(0)] + [valid_update(i, kept=((True, True), (True, True)), shift=0.1 * i) for i in (1, 2)]
    bad = mutate(goods[0], kind, value)
    accepted, rejected = screen_updates([*goods, bad], GLOBAL, LAYOUT, max_norm=100.0)
    assert [u.client_id for u in accepted] == [0, 1, 2]
    assert [r.client_id for r in rejected] == [100] and rejected[0].reason
    expected = aggregate(GLOBAL, goods, LAYOUT, method)  # robust rules need 3 values of a coordinate
    got = aggregate(GLOBAL, accepted, LAYOUT, method)
    assert all(torch.equal(got[k], expected[k]) for k in GLOBAL)
    assert not torch.equal(got["cls"], GLOBAL["cls"])  # the valid update was applied


@settings(max_examples=1000, deadline=None)
@given(blob=st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_the_server(blob):
    update, reason = receive_update(blob)
    assert update is None and reason.startswith("undecodable payload")


def test_truncated_real_payload_is_rejected():
    blob = encode_update(valid_update())
    assert receive_update(blob)[0] is not None
    update, reason = receive_update(blob[: len(blob) // 2])
    assert update is None and "undecodable" in reason


def test_norm_clip_and_outliers():
    ups = [valid_update(i, shift=0.1 * (i + 1)) for i in range(4)] + [valid_update(9, shift=50.0)]
    accepted, rejected = screen_updates(ups, GLOBAL, LAYOUT, outlier_factor=5.0)
    assert [r.client_id for r in rejected] == [9] and "median" in rejected[0].reason
    clipped, none_rejected = screen_updates(ups, GLOBAL, LAYOUT, max_norm=1.0, norm_action="clip")
    assert not none_rejected and len(clipped) == 5
    from fedhead.federated.validation import update_norm

    assert max(update_norm(u, GLOBAL, LAYOUT) for u in clipped) <= 1.0 + 1e-5


def test_median_resists_one_attacker():
    honest = [valid_update(i, kept=((True, True), (True, True)), shift=1.0) for i in range(4)]
    attacker = valid_update(9, kept=((True, True), (True, True)), shift=1e4)
    med = aggregate(GLOBAL, honest + [attacker], LAYOUT, "median")
    trimmed = aggregate(GLOBAL, honest + [attacker], LAYOUT, "trimmed_mean", trim_fraction=0.2)
    for k in GLOBAL:
        assert torch.allclose(med[k], GLOBAL[k] + 1.0) and torch.allclose(trimmed[k], GLOBAL[k] + 1.0)


def test_dp_noise_scale_and_epsilon_growth():
    ups = [valid_update(i, kept=((True, True), (True, True)), shift=0.0) for i in range(4)]  # zero deltas
    gen = torch.Generator().manual_seed(0)
    samples = torch.cat([torch.cat([(v - GLOBAL[k]).flatten() for k, v in dp_aggregate(
        GLOBAL, ups, LAYOUT, noise_multiplier=2.0, clipping_norm=0.5, generator=gen).items()]) for _ in range(300)])
    assert abs(float(samples.std()) - 2.0 * 0.5 / 4) < 0.01
    eps = [epsilon_spent(1.0, 0.1, r, 1e-5) for r in (1, 5, 20, 50)]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert epsilon_spent(4.0, 0.1, 20, 1e-5) < epsilon_spent(1.0, 0.1, 20, 1e-5)




def test_dropouts_and_min_clients(tiny_bert_dir, tmp_path):
    cfg = tiny_config(tiny_bert_dir, tmp_path, robust={"dropout_probability": 0.6},
                      federated={"rounds": 3, "min_clients": 2})
    run_simulation(cfg, tmp_path / "d")
    rounds = read_metrics(tmp_path / "d")[1:]
    assert sum(len(m["failed"]) for m in rounds) > 0
    for m in rounds:
        assert len(m["clients"]) + len(m["failed"]) == 3
        assert ("skipped" in m) == (len(m["clients"]) < 2)
    assert any("skipped" in m for m in rounds)


def test_privacy_run_reports_growing_epsilon(tiny_bert_dir, tmp_path):
    cfg = tiny_config(tiny_bert_dir, tmp_path, privacy={"enabled": True, "noise_multiplier": 1.0,
                                                        "clipping_norm": 0.1}, federated={"rounds": 2})
    run_simulation(cfg, tmp_path / "p")
    eps = [m["dp_epsilon"] for m in read_metrics(tmp_path / "p")[1:]]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]


def test_damaged_checkpoint_falls_back_to_the_previous(tiny_bert_dir, tmp_path):
    cfg = tiny_config(tiny_bert_dir, tmp_path, federated={"rounds": 3})
    run_simulation(cfg, tmp_path / "ref")
    run_simulation(cfg, tmp_path / "c", stop_after=2)
    path = tmp_path / "c" / CHECKPOINT
    path.write_bytes(path.read_bytes()[:100])  # torn
    assert RunDir(tmp_path / "c").load_checkpoint().round == 1
    run_simulation(cfg, tmp_path / "c", resume=True)
    strip = strip_timings
    assert strip(read_metrics(tmp_path / "c")) == strip(read_metrics(tmp_path / "ref"))




def _write_cli_config(tmp_path, model_dir, rounds):
    return write_tiny_toml(
        tmp_path / "k.toml", model_dir, data={"train_size": 200}, partition={"num_clients": 6},
        federated={"rounds": rounds, "clients_per_round": 3, "local_steps": 3}, heads={"sparsity": 0.5})


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tiny_bert_dir, tmp_path):
    """SIGKILL a real `fedhead run` process at seeded random moments, resume, compare with no kill."""
    config = _write_cli_config(tmp_path, tiny_bert_dir, rounds=6)
    fedhead = [sys.executable, "-m", "fedhead.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*fedhead, "run", str(config), "--out", str(tmp_path), "--name", "ref", "--quiet"],
                   check=True, env=env, capture_output=True, cwd=ROOT)
    reference = strip_timings(read_metrics(tmp_path / "ref"))
    rng = random.Random(1234)
    for attempt in range(3):
        name = f"k{attempt}"
        proc = subprocess.Popen([*fedhead, "run", str(config), "--out", str(tmp_path), "--name", name, "--quiet"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        wanted_round = rng.randint(1, 5)  # kill after this round's line appears, plus a random delay
        deadline = time.time() + 120
        metrics = tmp_path / name / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) > wanted_round:
                time.sleep(rng.uniform(0.0, 0.4))
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = len(metrics.read_text().splitlines()) - 1 if metrics.exists() else 0
        subprocess.run([*fedhead, "run", "--resume", str(tmp_path / name), "--quiet"], check=True, env=env,
                       capture_output=True, cwd=ROOT)
        assert strip_timings(read_metrics(tmp_path / name)) == reference, f"killed after round {done}"
