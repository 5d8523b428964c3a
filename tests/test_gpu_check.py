"""bench/gpu_check.sh, the GPU check (issue 37, item 3): its syntax, and on a machine without CUDA (this
project's) it stops at once with one line and exit code 2, writing no JSON. Its GPU parts run only on a GPU; the
step_cost rows it adds for presets are checked here on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from fedhead.config import HeadsSection
from fedhead.heads.pruning import kept_heads_mask
from fedhead.models import build_model
from fedhead.runners.local import run_simulation
from tests.conftest import ROOT, load_bench, read_metrics, tiny_config

SCRIPT = ROOT / "bench" / "gpu_check.sh"
GPU_RESULTS = ROOT / "docs" / "results" / "gpu"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a machine without CUDA")


def _run_check(tmp_path, path: str) -> tuple[subprocess.CompletedProcess, float]:
    before = sorted(GPU_RESULTS.glob("*")) if GPU_RESULTS.exists() else []
    start = time.perf_counter()
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "gpu.json")], capture_output=True, text=True,
                          env={**os.environ, "PATH": path}, timeout=60)
    after = sorted(GPU_RESULTS.glob("*")) if GPU_RESULTS.exists() else []
    assert not (tmp_path / "gpu.json").exists() and after == before  # no JSON, at the given path or the default
    return done, time.perf_counter() - start


def test_gpu_check_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@no_cuda
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="nvidia-smi is present")
def test_gpu_check_without_a_gpu_stops_at_once_with_one_line(tmp_path):
    done, seconds = _run_check(tmp_path, os.environ["PATH"])
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 2
    assert lines == ["gpu_check: no CUDA GPU here (nvidia-smi finds none); run it on a machine with one"]
    assert seconds < 10  # before any Python, test or install


@no_cuda
@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="needs scripts/install.sh's .venv")
def test_gpu_check_with_a_cpu_build_of_torch_stops_with_one_line(tmp_path):
    """A machine whose nvidia-smi lists a GPU (here a stand-in script on PATH) but whose torch sees no CUDA (the
    CPU build scripts/install.sh may install): refused in one line before any part runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Stand-in (UUID: GPU-0)'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    done, _ = _run_check(tmp_path, f"{bin_dir}:{os.environ['PATH']}")
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 2
    assert lines == ["gpu_check: torch in .venv sees no CUDA device (a CPU build?); install a CUDA build of "
                     "torch==2.13.0 into .venv"]


def test_step_cost_rows_of_presets_follow_their_heads_options(tiny_bert_dir, tmp_path):
    """bench/step_cost.py --presets (the GPU check passes configs/save_*.toml): a preset's heads options become
    the working model's mode, and 'mixed@C' (frozen heads in autograd) computes the kept heads and the
    best-scored others up to 1 - C of each block, as the client does."""
    step_cost = load_bench("step_cost")
    assert step_cost.preset_mode(HeadsSection()) == "dense"
    assert step_cost.preset_mode(HeadsSection(sparsity=0.9)) == "remove"
    assert step_cost.preset_mode(HeadsSection(sparsity=0.9, mode="sparse_backward")) == "sparse_backward"
    assert step_cost.preset_mode(HeadsSection(sparsity=0.9, mode="mixed", compute_sparsity=0.5)) == "mixed@0.5"
    assert step_cost.preset_mode(HeadsSection(sparsity=0.9, mode="mixed", compute_sparsity=0.5,
                                              frozen_autograd=False)) == "mixed_no_grad@0.5"
    assert step_cost.preset_mode(HeadsSection(sparsity=0.9, warmup_rounds=2)) == "remove"

    lm = build_model(tiny_config(tiny_bert_dir, tmp_path), 3)  # 2 blocks of 4 heads, head size 8
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.4, 0.6]])
    kept = kept_heads_mask(scores, 0.75, "per_block")  # heads 0 and 1: one a block
    model = step_cost.working_model(lm, "mixed@0.5", kept, scores)
    widths = [m.base_layer.out_features for name, m in model.named_modules() if name.endswith("attention.self.query")]
    assert widths == [16, 16]  # 2 heads of 8 a block computed: the kept one and the next best
    assert [m.base_layer.out_features for name, m in step_cost.working_model(lm, "remove", kept, scores)
            .named_modules() if name.endswith("attention.self.query")] == [8, 8]


def test_the_json_holds_each_parts_numbers_and_names_the_failed_ones(tiny_bert_dir, tmp_path):
    """bench/gpu_check_summary.py over what gpu_check.sh leaves, on the CPU: a real (tiny) run as the quickstart
    part, a step_cost part that failed and wrote nothing, the other parts never run. The quickstart's numbers are
    its run's; the failed and missing parts are named (the optional bitsandbytes install is not), exit code 1."""
    work = tmp_path / "work"
    summary = run_simulation(tiny_config(tiny_bert_dir, tmp_path), work / "runs" / "quickstart")
    (work / "quickstart.status").write_text("0 100.0 112.5\n")
    (work / "quickstart.gpu_mib").write_text("3\n1200\n900\n")
    (work / "step_cost.status").write_text("124 112.5 232.5\n")
    (work / "step_cost.log").write_text("loading\nstill loading\n")
    output = tmp_path / "gpu.json"

    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check_summary.py"), str(work), str(output)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})

    assert done.returncode == 1, done.stderr
    report = json.loads(output.read_text())
    assert report["failed"] == ["tests", "step_cost", "smollm2_4bit"]
    quickstart = report["parts"]["quickstart"]
    assert quickstart["exit_status"] == 0 and quickstart["seconds"] == 12.5
    assert quickstart["peak_gpu_memory_used_mib"] == 1200
    assert quickstart["final_accuracy"] == summary["final_accuracy"] and quickstart["rounds"] == 2
    rounds = [m for m in read_metrics(work / "runs" / "quickstart") if m["round"] > 0]
    assert quickstart["train_loss_per_round"] == [m["train_loss"] for m in rounds]
    assert quickstart["seconds_per_round"] == pytest.approx(
        [m["seconds_clients"] + m["seconds_aggregate"] + m.get("seconds_eval", 0) for m in rounds])
    step_cost = report["parts"]["step_cost"]
    assert step_cost["timed_out"] and step_cost["log_tail"] == ["loading", "still loading"]
    assert "step_cost.json" in step_cost["numbers_missing"]
    assert "tests" not in report["parts"] and report["torch"] == torch.__version__
