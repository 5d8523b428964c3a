"""One round with K = 1,000 simulated clients on the in-process engine: the server's peak memory and the time.

The quickstart's model and data (configs/quickstart.toml: MiniLM, LoRA r=8 on query/value, MultiNLI) with
N = K clients (an IID split of the 9,999 training pairs, about 10 pairs each), every client selected, 1 local
step at batch 8, one torch thread. Each K runs in a fresh process: the model and data are set up, the peak
resident memory is reset (Linux: /proc/self/clear_refs), then one round runs (select, each client trains and
answers, the server screens and folds each reply as it reads it, aggregates); no evaluation, no checkpoint.
The in-process engine runs the clients in the server's process, so the peak is the server's plus one client's
working copy; it is measured for a small K as well, whose difference from K = 1,000 is what the round's clients
cost the server.

    python bench/thousand_clients.py                        # K = 100 and 1,000
    python bench/thousand_clients.py --clients 1000 --json bench/results/thousand_clients.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: the peak since the last reset)."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def one_round(clients: int, batch: int, threads: int) -> dict:
    """Set up the quickstart with `clients` clients, reset the peak, run one round with all of them."""
    import numpy as np
    import torch

    from fedhead.config import load_config
    from fedhead.federated.selection import ClientStats
    from fedhead.federated.state import trainable_state
    from fedhead.runners.local import Simulation, run_round

    cfg = load_config(ROOT / "configs/quickstart.toml", overrides={
        "threads": threads, "data.eval_size": 32, "partition.method": "iid", "partition.num_clients": clients,
        "federated.rounds": 1, "federated.clients_per_round": clients, "federated.local_steps": 1,
        "federated.batch_size": batch, "federated.eval_every": 1})
    t = time.perf_counter()
    sim = Simulation.setup(cfg)
    setup_seconds = time.perf_counter() - t
    state = trainable_state(sim.lm.model)
    state_bytes = sum(v.numel() * v.element_size() for v in state.values())
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts at the current size
    before = kib("VmRSS")
    t = time.perf_counter()
    new_state, metrics = run_round(sim, state, 1, np.random.default_rng(cfg.seed), ClientStats())
    seconds = time.perf_counter() - t
    peak = kib("VmHWM")
    assert len(metrics["clients"]) == clients, metrics["rejected"][:3]
    assert all(torch.isfinite(v).all() for v in new_state.values())
    return {
        "clients": clients, "batch": batch, "local_steps": 1, "threads": threads,
        "setup_seconds": round(setup_seconds, 1), "round_seconds": round(seconds, 1),
        "seconds_clients": round(metrics["seconds_clients"], 1),
        "seconds_aggregate": round(metrics["seconds_aggregate"], 2),
        "rss_before_round_mib": round(before / 1024, 1), "peak_rss_mib": round(peak / 1024, 1),
        "peak_growth_mib": round((peak - before) / 1024, 1),
        "state_mib": round(state_bytes / 2**20, 3),
        "update_bytes_mean": round(metrics["bytes_up"] / clients),
        "all_updates_mib": round(metrics["bytes_up"] / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000], help="K = N values, one process each")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON here.")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_round(args.one, args.batch, args.threads)))
        return
    rows = []
    for k in args.clients:
        done = subprocess.run([sys.executable, __file__, "--one", str(k), "--batch", str(args.batch), "--threads",
                               str(args.threads)], capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            sys.exit(f"K = {k} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
