"""The memory a client needs to train each preset: the model's weights plus the peak training memory of its
local steps, as the client reports it in metrics.jsonl.

For each preset, one client round of client 0 in round 1 (`fedhead.federated.client.client_update`, the preset's
own mode, sparsity, batch size and max_length, `--steps` local steps), on the preset's data. Peak training memory
is `peak_memory_bytes` of that round: the bytes autograd saved for the backward of the largest step (activations)
plus a gradient and AdamW's two moments per trainable value; weights are the bytes of every parameter and buffer
of the model the client holds (float32; the frozen base included). Both are device-independent counts on the
CPU (on CUDA a client reports `torch.cuda.max_memory_allocated` instead).

    python bench/preset_memory.py                       # every preset whose model is available offline
    python bench/preset_memory.py --presets fedhead_full --json docs/results/preset_memory.json  # re-measure one
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import ROOT

from fedhead.config import load_config
from fedhead.federated.client import client_update
from fedhead.federated.state import trainable_state
from fedhead.runners.local import Simulation

OFFLINE = ["quickstart", "paper_base", "fedhead_full", "confidence_pruning", "newsgroups", "e2e_nlg", "xsum"]


def measure(preset: str, steps: int) -> dict:
    cfg = load_config(ROOT / "configs" / f"{preset}.toml", {"federated.local_steps": steps, "threads": 1})
    sim = Simulation.setup(cfg)
    model = sim.lm.model
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    update = client_update(sim.lm, trainable_state(model), sim.client_data(0), cfg, 0, 1)
    peak = int(update.stats["peak_memory_bytes"])
    return {"preset": preset, "model": cfg.model.name, "task": cfg.model.task, "mode": cfg.heads.mode,
            "sparsity": cfg.heads.sparsity, "batch_size": cfg.federated.batch_size,
            "max_length": cfg.model.max_length, "weights_bytes": weights, "peak_training_bytes": peak,
            "total_bytes": weights + peak,
            # the options that move memory, as measured (tests/test_readme.py checks the presets still have them)
            "heads": cfg.heads.model_dump(mode="json"), "lora": cfg.lora.model_dump(mode="json")}


HEADER = ("| preset | model | mode, sparsity | batch x tokens | weights MB | peak training MB | total MB |\n"
          "|---|---|---|---|---|---|---|")


def table_row(r: dict) -> str:
    """One preset's line of the table in docs/usage.md ("Memory a client needs, per preset")."""
    return (f"| {r['preset']} | {r['model']} | {r['mode']}, {r['sparsity']:g} | {r['batch_size']} x "
            f"{r['max_length']} | {r['weights_bytes'] / 1e6:.0f} | {r['peak_training_bytes'] / 1e6:.0f} | "
            f"{r['total_bytes'] / 1e6:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=OFFLINE)
    parser.add_argument("--steps", type=int, default=2, help="Local steps of the measured round.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(p, args.steps) for p in args.presets]
    print(HEADER)
    for r in rows:
        print(table_row(r))
    if args.json:  # the presets measured now replace their old records; the others are kept
        kept = json.loads(args.json.read_text()) if args.json.exists() else []
        merged = {r["preset"]: r for r in (*kept, *rows)}
        order = [p for p in OFFLINE if p in merged] + [p for p in merged if p not in OFFLINE]
        args.json.write_text(json.dumps([merged[p] for p in order], indent=1) + "\n")


if __name__ == "__main__":
    main()
