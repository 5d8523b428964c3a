"""The in-process runner on the tiny BERT: run directory, determinism, resume, sparsity 0, scale."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from fedhead.config import ConfigError
from fedhead.federated.payload import decode_state
from fedhead.models.loading import build_backbone_classifier
from fedhead.runners.local import run_simulation
from tests.conftest import ROOT, read_metrics, strip_timings, tiny_config


@pytest.fixture(scope="module")
def dense_run(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    cfg = tiny_config(tiny_bert_dir, out, federated={"rounds": 3})
    summary = run_simulation(cfg, out / "a")
    return cfg, out / "a", summary


def test_run_directory_holds_everything(dense_run, tiny_bert_dir):
    cfg, run_dir, summary = dense_run
    for name in ["config.json", "metrics.jsonl", "summary.json", "partition.json", "checkpoint.safetensors"]:
        assert (run_dir / name).is_file(), name
    metrics = read_metrics(run_dir)
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    last = metrics[-1]
    for key in ["selected", "train_loss", "accuracy", "eval_loss", "bytes_down", "bytes_up", "train_flops"]:
        assert key in last, key
    assert len(last["selected"]) == 3 and last["bytes_up"] > 0 and last["train_flops"] > 0
    assert summary["rounds"] == 3 and json.loads((run_dir / "summary.json").read_text())["rounds"] == 3
    partition = json.loads((run_dir / "partition.json").read_text())
    assert sum(partition["sizes"]) == 240 and len(partition["label_histograms"]) == 6


def test_adapter_loads_with_peft_alone(dense_run):
    cfg, run_dir, _ = dense_run
    base = build_backbone_classifier(cfg, 3, seed=123)  # a different head init: peft must overwrite it
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    state = decode_state((run_dir / "checkpoint.safetensors").read_bytes())
    params = dict(model.named_parameters())
    for name, value in state.items():
        assert torch.equal(params[name].detach(), value), name


def test_same_seed_sameread_metrics(dense_run, tiny_bert_dir, tmp_path):
    cfg, run_dir, _ = dense_run
    run_simulation(cfg, tmp_path / "again")
    assert strip_timings(read_metrics(tmp_path / "again")) == strip_timings(read_metrics(run_dir))


def test_resume_equals_uninterrupted(dense_run, tmp_path):
    cfg, run_dir, _ = dense_run
    stopped = run_simulation(cfg, tmp_path / "r", stop_after=1)
    assert stopped == {"stopped_after": 1}
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:  # a line torn by a kill mid-write
        f.write('{"round": 2, "trunc')
    run_simulation(cfg, tmp_path / "r", resume=True)
    assert strip_timings(read_metrics(tmp_path / "r")) == strip_timings(read_metrics(run_dir))


def test_extending_a_finished_run_equals_the_longer_run(dense_run, tmp_path):
    cfg, run_dir, _ = dense_run
    short = cfg.model_copy(deep=True)
    short.federated.rounds = 2
    run_simulation(short, tmp_path / "e")
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["rounds"] == 2
    summary = run_simulation(cfg, tmp_path / "e", resume=True)  # 3 rounds: one more
    assert summary["rounds"] == 3
    assert json.loads((tmp_path / "e" / "config.json").read_text())["federated"]["rounds"] == 3
    assert strip_timings(read_metrics(tmp_path / "e")) == strip_timings(read_metrics(run_dir))


def test_resume_refuses_a_different_config(dense_run, tmp_path):
    cfg, run_dir, _ = dense_run
    run_simulation(cfg, tmp_path / "d", stop_after=1)
    other = cfg.model_copy(deep=True)
    other.federated.learning_rate *= 2
    with pytest.raises(ConfigError, match="federated.learning_rate"):
        run_simulation(other, tmp_path / "d", resume=True)
    stored = json.loads((tmp_path / "d" / "config.json").read_text())
    del stored["heads"]["temperature"]  # a config.json written before the option existed: it ran the default
    (tmp_path / "d" / "config.json").write_text(json.dumps(stored))
    assert run_simulation(cfg, tmp_path / "d", resume=True)["rounds"] == 3


def test_sparsity_zero_reproduces_dense_run(dense_run, tiny_bert_dir, tmp_path):
    cfg, run_dir, _ = dense_run
    cfg0 = cfg.model_copy(deep=True)
    cfg0.heads.importance = "random"
    cfg0.heads.scope = "per_block"
    cfg0.heads.mode = "train_sparse"
    cfg0.heads.sparsity = 0.0
    run_simulation(cfg0, tmp_path / "s0")
    assert strip_timings(read_metrics(tmp_path / "s0")) == strip_timings(read_metrics(run_dir))


@pytest.mark.parametrize("mode", ["remove", "train_sparse"])
def test_pruned_run_uploads_only_kept_heads(tiny_bert_dir, tmp_path, mode, dense_run):
    cfg = tiny_config(tiny_bert_dir, tmp_path, heads={"sparsity": 0.5, "mode": mode}, federated={"rounds": 1})
    run_simulation(cfg, tmp_path / mode)
    last = read_metrics(tmp_path / mode)[-1]
    dense_last = read_metrics(dense_run[1])[1]
    for c in last["clients"]:
        assert len(c["kept_heads"]) == 4  # half of 2 x 4 heads
        assert len(c["head_scores"]) == 2 and len(c["head_scores"][0]) == 4
    assert last["bytes_up"] < dense_last["bytes_up"]
    if mode == "remove":
        assert last["train_flops"] < dense_last["train_flops"]


_PEAK_MEMORY_BY_N = """
import json, resource, sys, time
from fedhead.config import config_from_dict
from fedhead.runners.local import run_simulation

base, out = json.loads(sys.argv[1]), sys.argv[2]
peaks, seconds = {}, {}
for n in (5, 1000):  # N = K first: the same work with the fewest clients sets the baseline peak
    raw = {**base, "partition": {**base["partition"], "num_clients": n}}
    start = time.perf_counter()
    assert run_simulation(config_from_dict(raw), f"{out}/n{n}")["rounds"] == 1
    seconds[n] = time.perf_counter() - start
    peaks[n] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
print(json.dumps({"peaks": peaks, "seconds": seconds}))
"""


def test_thousand_clients_memory_grows_with_k_not_n(tiny_bert_dir, tmp_path):
    """N = 1,000 clients with K = 5 costs what N = 5 costs: a fresh process runs a round with N = 5, then the
    same round with N = 1,000, and its peak resident memory (which the first run has already raised to that
    work's level) may not grow by more than a quarter of what keeping one copy of the trainable state per client
    would take. Rules out per-client copies of the state (or of anything of that size) and per-client data
    held in memory; the peak is measured in its own process, where no earlier test's model hides it."""
    cfg = tiny_config(tiny_bert_dir, tmp_path, partition={"num_clients": 10, "method": "iid"},
                      data={"train_size": 2000, "eval_size": 32}, lora={"rank": 64, "target_modules": [
                          "query", "key", "value", "output"]},
                      federated={"rounds": 1, "clients_per_round": 5, "local_steps": 1})
    done = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_BY_N, cfg.model_dump_json(), str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    grown = result["peaks"]["1000"] - result["peaks"]["5"]
    state = decode_state((tmp_path / "n1000" / "checkpoint.safetensors").read_bytes())
    per_client_copies = 1000 * sum(t.numel() * t.element_size() for t in state.values())
    assert per_client_copies > 100e6  # rank 64 on four projections: a copy per client would be seen
    assert grown < per_client_copies / 4, f"peak memory grew {grown / 1e6:.0f} MB from N = 5 to N = 1,000"
    assert result["seconds"]["1000"] < 60
    assert len(read_metrics(tmp_path / "n1000")[-1]["selected"]) == 5
