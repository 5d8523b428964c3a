"""fedhead on Flower: the app's pieces, equivalence with the in-process engine on Flower's simulation engine, a
real loopback deployment (flower-superlink + two flower-supernode processes + `flwr run`), and a SuperNode killed
mid-round. Every process listens on 127.0.0.1 only and is stopped by its pid (its session) in a finally.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from fedhead.federated.payload import decode_state
from fedhead.federated.selection import ClientStats
from fedhead.runners import flower_engine as fe
from fedhead.runners.flower_app import select_among
from fedhead.runners.flower_client import node_partition, payload_of, payload_record
from fedhead.runners.local import run_simulation
from tests.conftest import tiny_config


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------------------------- fast: the pieces


def test_payload_travels_unchanged():
    blob = bytes(range(256)) * 3
    record = payload_record(blob)
    assert payload_of(record) == blob
    assert record.count_bytes() == len(blob) + len("payload")  # the Array's data is the payload itself


def test_node_partition_from_node_config():
    assert node_partition({"partition-id": 1, "num-partitions": 3}, 3) == (1, 3)
    for bad in ({}, {"partition-id": 3, "num-partitions": 3}, {"partition-id": 0, "num-partitions": 2}):
        with pytest.raises(ValueError):
            node_partition(bad, 3)


class _Sim:  # the fields select_among reads
    def __init__(self, cfg):
        self.cfg = cfg


def test_selection_among_connected_partitions(tiny_bert_dir, tmp_path):
    cfg = tiny_config(tiny_bert_dir, tmp_path, federated={"selection": "loss_gap", "clients_per_round": 2})
    stats = ClientStats()
    for c, gap in [(1, 0.5), (2, 0.1), (4, 0.9), (5, 2.0)]:
        stats.record(c, 1, 1.0 + gap, 1.0, [0])
    # partitions 0 and 3 are not connected: only 1, 2, 4, 5 compete; 5 and 4 have the largest loss gaps
    s = select_among([1, 2, 4, 5], _Sim(cfg), 2, np.random.default_rng(0), stats, lambda cs: {})
    assert s.clients == [4, 5] and set(s.priorities) == {4, 5}
    # every partition connected: exactly the in-process engine's draw
    from fedhead.federated.selection import select_clients

    cfg.federated.selection = "random"
    s = select_among(list(range(6)), _Sim(cfg), 1, np.random.default_rng(3), stats, lambda cs: {})
    assert s.clients == select_clients("random", 6, 2, 1, np.random.default_rng(3), stats).clients
    # fewer partitions connected than clients_per_round: all of them
    s = select_among([2], _Sim(cfg), 1, np.random.default_rng(3), stats, lambda cs: {})
    assert s.clients == [2]


# --------------------------------------------------------------------- slow: simulation engine equals in-process


@pytest.mark.slow
def test_flower_simulation_engine_equals_in_process_engine(tiny_bert_dir, tmp_path):
    cfg = tiny_config(tiny_bert_dir, tmp_path, heads={"sparsity": 0.5},
                      federated={"selection": "power_of_choice", "aggregation": "head_weighted"})
    local = run_simulation(cfg, tmp_path / "local")
    seen = []
    flower = fe.run_flower(cfg, tmp_path / "flower", on_round=lambda m: seen.append(m["round"]))
    assert seen == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "flower").iterdir()) == \
        sorted(p.name for p in (tmp_path / "local").iterdir())
    assert flower.keys() == local.keys()
    a, b = _metrics(tmp_path / "local"), _metrics(tmp_path / "flower")
    assert [m["round"] for m in b] == [0, 1, 2]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        assert x.get("selected") == y.get("selected")
        assert x.get("bytes_up") == y.get("bytes_up") and x.get("bytes_down") == y.get("bytes_down")
        # Tolerance: both engines run the same float32 code on the same inputs and the payloads are bit-exact
        # copies, so the metrics come out equal here; the only thing that may differ is the number of torch
        # threads in Flower's Ray worker, which reorders float32 sums (relative error ~1e-7 per operation).
        # rtol 1e-4 is far above that and far below any real difference; accuracy may move by one example.
        assert np.allclose(x["eval_loss"], y["eval_loss"], rtol=1e-4, atol=1e-6)
        assert np.allclose(x["accuracy"], y["accuracy"], atol=1 / cfg.data.eval_size + 1e-9)
    assert all(m["failed"] == [] for m in b[1:])
    la = decode_state((tmp_path / "local" / "checkpoint.safetensors").read_bytes())
    lb = decode_state((tmp_path / "flower" / "checkpoint.safetensors").read_bytes())
    assert all(torch.allclose(la[k], lb[k], rtol=1e-4, atol=1e-6) for k in la)


# ------------------------------------------------------------------------------ slow: a loopback deployment


class Deployment:
    """flower-superlink and SuperNodes on 127.0.0.1 free ports, in a private Flower home."""

    def __init__(self, home: Path) -> None:
        self.home, self.procs, self.nodes = home, [], []
        self.port = fe.free_port()
        self.env = fe.flower_env(home)
        fe.write_connection(home, "loopback", self.port)
        self.app = fe.write_app(home / "app")

    def start_superlink(self) -> None:
        link = fe.start([fe.executable("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                         "--host", "127.0.0.1", "--port", str(self.port)], self.env, self.home / "superlink.log")
        self.procs.append(link)
        fe.wait_for_port(self.port, 60, link, self.home / "superlink.log")

    def start_supernode(self, partition: int, partitions: int) -> subprocess.Popen:
        node = fe.start([fe.executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                         "--host", "127.0.0.1", "--port", str(fe.free_port()),
                         "--node-config", f"partition-id={partition} num-partitions={partitions}"],
                        self.env, self.home / f"supernode{partition}.log")
        self.procs.append(node)
        self.nodes.append(node)
        return node

    def flwr_run(self, run_config: dict) -> subprocess.Popen:
        path = fe.write_run_config(self.home / "run_config.toml", run_config)
        proc = fe.start([fe.executable("flwr"), "run", str(self.app), "loopback", "--run-config", str(path),
                         "--stream"], self.env, self.home / "flwr-run.log")
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            fe.stop(proc)

    def logs(self) -> str:
        return "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in self.home.glob("*.log"))


@contextmanager
def deployment(partitions: int):
    home = Path(tempfile.mkdtemp(prefix="fedhead-deploy-"))
    d = Deployment(home)
    try:
        d.start_superlink()
        for i in range(partitions):
            d.start_supernode(i, partitions)
        yield d
    finally:
        d.stop_all()
    for proc in d.procs:
        assert proc.poll() is not None, proc.args
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # nothing of its session is left


def _deploy_config(tiny_bert_dir, tmp_path):
    cfg = tiny_config(tiny_bert_dir, tmp_path, partition={"num_clients": 2},
                      heads={"sparsity": 0.5}, federated={"clients_per_round": 2, "selection": "loss_gap"})
    path = tmp_path / "deploy.json"
    path.write_text(cfg.model_dump_json())
    return cfg, path


@pytest.mark.slow
def test_deployment_on_loopback_runs_two_rounds(tiny_bert_dir, tmp_path):
    cfg, config_path = _deploy_config(tiny_bert_dir, tmp_path)
    run_dir = tmp_path / "deployed"
    with deployment(2) as d:
        run = d.flwr_run({"config": str(config_path), "run-dir": str(run_dir), "round-timeout": 240.0,
                          "node-wait": 120.0})
        run.wait(timeout=420)
        assert run.returncode == 0, d.logs()
        assert (run_dir / "summary.json").exists(), d.logs()
    metrics = _metrics(run_dir)
    assert [m["round"] for m in metrics] == [0, 1, 2]
    for m in metrics[1:]:
        assert m["selected"] == [0, 1] and m["failed"] == [] and "accuracy" in m
        assert [c["client"] for c in m["clients"]] == [0, 1]
        assert all(len(c["kept_heads"]) == 4 and c["bytes_up"] > 0 for c in m["clients"])  # half of 2 x 4 heads
        assert m["bytes_down"] == 2 * m["clients"][0]["bytes_down"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["bytes_up"] == sum(m["bytes_up"] for m in metrics[1:])


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
def test_supernode_killed_mid_round_is_dropped_and_the_run_finishes(tiny_bert_dir, tmp_path):
    cfg, config_path = _deploy_config(tiny_bert_dir, tmp_path)
    run_dir = tmp_path / "fault"
    with deployment(2) as d:
        # round-timeout bounds the wait for the dead node (the SuperLink itself notices it ~60 s later)
        run = d.flwr_run({"config": str(config_path), "run-dir": str(run_dir), "round-timeout": 45.0,
                          "node-wait": 120.0})
        deadline = time.monotonic() + 300
        while len(_metrics(run_dir)) < 2 and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
        before = _metrics(run_dir)
        assert [m["round"] for m in before] == [0, 1], d.logs()
        victim = d.nodes[1]
        until = time.monotonic() + 20  # kill it while its ClientApp process trains round 2, if we see it in time
        while not _children(victim.pid) and time.monotonic() < until:
            time.sleep(0.1)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        run.wait(timeout=300)
        assert run.returncode == 0, d.logs()
        assert (run_dir / "summary.json").exists(), d.logs()
    metrics = _metrics(run_dir)
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert metrics[:2] == before  # nothing of the earlier rounds is lost or rewritten
    last = metrics[2]
    assert last["selected"] == [0, 1]
    assert [f["client"] for f in last["failed"]] == [1] and last["failed"][0]["reason"]
    assert [c["client"] for c in last["clients"]] == [0] and "skipped" not in last
    assert math.isfinite(last["eval_loss"])
    state = decode_state((run_dir / "checkpoint.safetensors").read_bytes())
    assert state and json.loads((run_dir / "summary.json").read_text())["rounds"] == 2
