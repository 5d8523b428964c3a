"""fedhead: federated LoRA fine-tuning of attention language models with attention-head pruning.

The public API, as the README's examples use it::

    import fedhead

    cfg = fedhead.load_config("configs/quickstart.toml")
    summary = fedhead.run_simulation(cfg, "out/quickstart")   # the in-process engine

    # your own Flower app (README, "Your own Flower app")
    strategy = fedhead.FedHeadStrategy(cfg, fedhead.build_model(cfg, 3).layout)

`import fedhead` is light: it reads the package version and nothing else. Each public name is imported from
its home module the first time it is used (PEP 562 module `__getattr__`), so `fedhead.load_config` needs only
pydantic, while `fedhead.FedHeadStrategy` brings in torch and Flower; the home modules stay the place to
import from inside fedhead itself (a module never imports the package's root, see tests/test_layers.py).
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__: str = version("fedhead")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_HOMES: dict[str, str] = {
    "Config": "fedhead.config",
    "ConfigError": "fedhead.config",
    "load_config": "fedhead.config",
    "LoadedModel": "fedhead.models.loading",
    "build_model": "fedhead.models.loading",
    "build_run_model": "fedhead.trained",
    "load_task_data": "fedhead.data.tasks",
    "load_device_data": "fedhead.data.tasks",
    "trainable_state": "fedhead.federated.state",
    "load_state_": "fedhead.federated.state",
    "run_simulation": "fedhead.runners.local",
    "run_flower": "fedhead.runners.flower_engine",
    "FedHeadStrategy": "fedhead.runners.flower_strategy",
    "central_evaluation": "fedhead.runners.flower_start",
    "query_reply": "fedhead.runners.flower_client",
    "train_reply": "fedhead.runners.flower_client",
    "evaluate_reply": "fedhead.runners.flower_client",
}

__all__ = [
    "Config",
    "ConfigError",
    "FedHeadStrategy",
    "LoadedModel",
    "__version__",
    "build_model",
    "build_run_model",
    "central_evaluation",
    "evaluate_reply",
    "load_config",
    "load_device_data",
    "load_state_",
    "load_task_data",
    "query_reply",
    "run_flower",
    "run_simulation",
    "train_reply",
    "trainable_state",
]

if TYPE_CHECKING:  # what a type checker and an IDE see; at run time the names load on first use
    from fedhead.config import Config, ConfigError, load_config
    from fedhead.data.tasks import load_device_data, load_task_data
    from fedhead.federated.state import load_state_, trainable_state
    from fedhead.models.loading import LoadedModel, build_model
    from fedhead.runners.flower_client import evaluate_reply, query_reply, train_reply
    from fedhead.runners.flower_engine import run_flower
    from fedhead.runners.flower_start import central_evaluation
    from fedhead.runners.flower_strategy import FedHeadStrategy
    from fedhead.runners.local import run_simulation
    from fedhead.trained import build_run_model


def __getattr__(name: str) -> Any:
    """`fedhead.<name>` for a public name: imported from its home module on first use, then cached."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fedhead' has no attribute '{name}'")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
