"""`device`: clients train, score and evaluate on the configured device, the state that travels stays on the CPU,
and results on the CPU are unchanged. The CUDA test runs only where a GPU is present (none on the project's CI)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fedhead.config import ConfigError
from fedhead.federated.client import client_update
from fedhead.federated.state import trainable_state
from fedhead.models.head_map import UnsupportedModelError
from fedhead.models.loading import device_of, resolve_device
from fedhead.runners.local import Simulation
from tests.conftest import tiny_config


class DeviceRecorder(TorchDispatchMode):
    """Records the device of every tensor an operator receives or returns."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in (*args, *(kwargs or {}).values(), *(out if isinstance(out, tuple | list) else (out,))):
            if isinstance(value, torch.Tensor):
                self.devices.add(value.device.type)
        return out


def test_device_option_is_validated(tiny_bert_dir, tmp_path):
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(ConfigError, match="device"):
            tiny_config(tiny_bert_dir, tmp_path, device=bad)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedModelError, match="no such CUDA device"):
            resolve_device("cuda:0")


def _step(device: str, tiny_bert_dir, tmp_path, mode: str):
    cfg = tiny_config(tiny_bert_dir, tmp_path, device=device, heads={"sparsity": 0.5, "mode": mode},
                      federated={"local_steps": 2})
    sim = Simulation.setup(cfg)
    state = trainable_state(sim.lm.model)
    recorder = DeviceRecorder()
    with recorder:
        update = client_update(sim.lm, state, sim.client_data(1), cfg, client_id=1, round_=1)
    return sim, state, update, recorder.devices


@pytest.mark.parametrize("mode", ["remove", "sparse_backward"])
def test_a_client_step_runs_on_the_configured_device_and_sends_cpu_tensors(mode, tiny_bert_dir, tmp_path):
    """On this machine the configured device is the CPU: every operator of the client's round (scoring,
    training, the loss after training) sees only CPU tensors, and what it sends is on the CPU. On a CPU-only
    machine this cannot catch a batch left off the device; `test_cuda_client_step_matches_cpu` does on a GPU."""
    sim, state, update, devices = _step("cpu", tiny_bert_dir, tmp_path, mode)
    # 'meta' tensors hold no data (torch.nn.utils.skip_init builds the sliced Linears on it): not a placement
    assert device_of(sim.lm.model).type == "cpu" and devices - {"meta"} == {"cpu"}
    assert all(t.device.type == "cpu" for t in (*state.values(), *update.tensors.values()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["remove", "sparse_backward", "train_sparse"])
def test_cuda_client_step_matches_cpu(mode, tiny_bert_dir, tmp_path):
    """Where a GPU is present: the model, batches and training live on CUDA (only the state that travels and the
    small masks are on the CPU), and the update equals the CPU one up to float32 kernel differences."""
    _, _, cpu_update, _ = _step("cpu", tiny_bert_dir, tmp_path / "cpu", mode)
    sim, _, cuda_update, devices = _step("cuda", tiny_bert_dir, tmp_path / "cuda", mode)
    assert device_of(sim.lm.model).type == "cuda" and "cuda" in devices
    assert all(t.device.type == "cpu" for t in cuda_update.tensors.values())
    for name, tensor in cpu_update.tensors.items():
        assert torch.allclose(tensor, cuda_update.tensors[name], atol=1e-4), name


def test_gpu_options_are_refused_where_they_cannot_apply(tiny_bert_dir, tmp_path):
    """`gpus_per_client` and `model.load_in_4bit` fail in one line before any work where they cannot act (a CPU
    device, head slicing of 4-bit weights), and 4-bit loading without CUDA names what is missing. Rules out a
    QLoRA option silently training in float32 on the CPU."""
    from fedhead.models.loading import quantization_args

    with pytest.raises(ConfigError, match="gpus_per_client"):
        tiny_config(tiny_bert_dir, tmp_path, device="cpu", gpus_per_client=0.5)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        tiny_config(tiny_bert_dir, tmp_path, device="cpu", model={"load_in_4bit": True})
    with pytest.raises(ConfigError, match="cannot be sliced by head"):
        tiny_config(tiny_bert_dir, tmp_path, model={"load_in_4bit": True}, heads={"sparsity": 0.5})
    cfg = tiny_config(tiny_bert_dir, tmp_path, model={"load_in_4bit": True},
                      heads={"sparsity": 0.5, "mode": "train_sparse"})
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedModelError, match="needs a CUDA device"):
            quantization_args(cfg)
    assert quantization_args(cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"load_in_4bit": False})})) == {}
