"""Following `cfg` through one round (issue "One round loop", done-when): which fedhead modules a round enters with
the run's options, and how often control returns to the driver.

One in-process round of a tiny config (the tests' 2-block BERT, 3 clients) under `sys.setprofile`:

- *modules entered with the config*: the fedhead modules one of whose functions is called with the run's
  `Config` or one of its sections (a pydantic model of `fedhead.config`) as an argument (`fedhead.config` itself,
  the validators, not counted); the driver (`fedhead.runners.local`) receives the run context, not the config;
- *returns to the driver*: each return from a function of another fedhead module to a frame of the driver,
  grouped by function.

The driver's round is two calls of the server's core: `plan_round` (selection, head counts, the payload sent)
and `close_round` over the replies; each client trains in this process when `close_round` reads its reply
(`fedhead.loop.Simulation.client_reply`: the payload in, the update's bytes out, as on a device), so a
client's work returns to the server's round, not to the driver. tests/test_round_trace.py keeps both counts.

    python bench/round_trace.py MODEL_DIR      # a small BERT folder, e.g. the tests' tiny_bert"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pydantic

ROOT = Path(__file__).resolve().parents[1]
DRIVER = "fedhead.runners.local"


def trace_round(model_dir: str, out: Path) -> tuple[Counter, Counter]:
    """(calls with the config per module, returns to the driver per function) of one in-process round."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_config

    from fedhead.federated.selection import ClientStats
    from fedhead.runners.local import Simulation, run_round

    cfg = tiny_config(model_dir, out, partition={"num_clients": 3}, federated={"clients_per_round": 3})
    sim = Simulation.setup(cfg)
    state = sim.initial_state()
    entered: Counter = Counter()
    returns: Counter = Counter()

    def is_config(value: Any) -> bool:
        return isinstance(value, pydantic.BaseModel) and type(value).__module__ == "fedhead.config"

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("fedhead") or module == "fedhead.config":
            return
        if event == "call":
            code = frame.f_code
            if any(is_config(frame.f_locals.get(n)) for n in code.co_varnames[:code.co_argcount]):
                entered[module] += 1
        elif event == "return" and module != DRIVER and frame.f_back is not None and \
                frame.f_back.f_globals.get("__name__") == DRIVER:
            returns[f"{module}.{frame.f_code.co_name}"] += 1

    sys.setprofile(profile)
    try:
        run_round(sim, state, 1, np.random.default_rng(cfg.seed), ClientStats())
    finally:
        sys.setprofile(None)
    return entered, returns


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "round_trace")
    args = p.parse_args()
    entered, returns = trace_round(args.model_dir, args.out)
    print(f"modules entered with the config ({len(entered)}): {sorted(entered)}")
    print(f"returns to the driver ({sum(returns.values())}):")
    for name, count in sorted(returns.items()):
        print(f"  {count:3d}  {name}")


if __name__ == "__main__":
    main()
