"""What a frontier row's client round costs, in one controlled measurement: `frontier.py costs`
(docs/results/frontier_costs.json: time and memory) and `budget.py costs` (docs/results/budget_costs.json: also
FLOPs, upload and memory at 256 tokens) both call `measure_costs`.

One process builds every row's client from the same global state and runs the same client's round (scoring, the
local steps, the post-round loss: `fedhead.federated.client.client_update`) for each row in turn, round-robin,
`repeats` times after one untimed warm-up pass. Training FLOPs (torch's flop counter), the upload (the serialised
update's bytes) and the peak training memory (the bytes autograd saves for the backward, plus a gradient and
AdamW's two moments per trainable value) are exact; round and step times are medians over the repeats.
"""

from __future__ import annotations

import gc
import platform
import statistics
import time
from typing import Any

from frontier_protocol import BASE, PROTOCOL, ROWS

from fedhead.config import load_config

# what `frontier.py costs` keeps of a row's measurement (the columns of the frontier table)
FRONTIER_KEYS = ("client_round_seconds_median", "client_step_seconds_median", "peak_memory_bytes")


def measure_costs(rows: list[str], repeats: int, threads: int, client: int = 0, round_: int = 1, seed: int = 0,
                  long_tokens: int | None = None) -> dict[str, Any]:
    """Each row's client round (module docstring): `client` of the seed's partition in round `round_`, from the
    row's initial global state.

    Args:
        rows: frontier rows (`ROWS` names), measured in this order; ratios are taken to "dense" of the same batch.
        repeats: timed passes over every row (one more untimed pass warms up).
        threads: torch threads.
        long_tokens: also the peak training memory with every example repeated to this many real tokens (no
            padding), one pass a row (`peak_memory_bytes_<long_tokens>`); None: not measured.

    Returns:
        {"protocol": what was measured and where, "rows": {row: {"train_flops", "steps", "bytes_up",
        "peak_memory_bytes", "attention", ["peak_memory_bytes_<long_tokens>"], "client_round_seconds_median",
        "client_step_seconds_median"}}}.
    """
    import torch

    from fedhead.federated.client import client_update
    from fedhead.federated.payload import encode_update
    from fedhead.federated.state import trainable_state
    from fedhead.models import build_model
    from fedhead.runners.local import Simulation

    base = load_config(BASE, {**PROTOCOL, "seed": seed, "threads": threads})
    sim = Simulation.setup(base)
    data = sim.client_data(client)
    built = {}
    for row in rows:
        cfg = load_config(BASE, {**ROWS[row], **PROTOCOL, "seed": seed, "threads": threads})
        lm = build_model(cfg, sim.data.num_labels, sim.lm.tokenizer)
        built[row] = (cfg, lm, trainable_state(lm.model))
    seconds: dict[str, list[float]] = {row: [] for row in rows}
    step: dict[str, list[float]] = {row: [] for row in rows}
    out: dict[str, dict[str, Any]] = {}
    for repeat in range(repeats + 1):  # the first pass warms up and is not timed
        for row in rows:
            cfg, lm, state = built[row]
            start = time.perf_counter()
            update = client_update(lm, state, data, cfg, client, round_)
            elapsed = time.perf_counter() - start
            payload = encode_update(update, deflate=cfg.federated.upload_deflate)  # the bytes a run sends
            out[row] = {"train_flops": int(update.stats["train_flops"]), "steps": int(update.stats["steps"]),
                        "bytes_up": len(payload), "peak_memory_bytes": int(update.stats["peak_memory_bytes"]),
                        "attention": cfg.model.attn_implementation}
            if repeat:
                seconds[row].append(elapsed)
                step[row].append(update.timings["train_seconds"] / update.stats["steps"])
        print(f"  costs: pass {repeat} of {repeats} done", flush=True)
    long_data = None if long_tokens is None else _to_tokens(data, long_tokens)
    for row in rows:  # one row at a time, its model let go after (21 models and 256-token steps ran out of 24 GiB)
        cfg, lm, state = built.pop(row)
        if long_data is not None:
            out[row][f"peak_memory_bytes_{long_tokens}"] = int(client_update(lm, state, long_data, cfg, client,
                                                                             round_).stats["peak_memory_bytes"])
        out[row]["client_round_seconds_median"] = statistics.median(seconds[row])
        out[row]["client_step_seconds_median"] = statistics.median(step[row])
        print(f"  {row}: {out[row]}", flush=True)
        del cfg, lm, state
        gc.collect()
    return {"protocol": {"client": client, "round": round_, "seed": seed, "examples": len(data), "repeats": repeats,
                         "threads": threads, "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                         "processor": platform.processor() or platform.platform()},
            "rows": out}


def frontier_costs(measured: dict[str, Any]) -> dict[str, Any]:
    """A `measure_costs` batch as docs/results/frontier_costs.json keeps it: each row's FRONTIER_KEYS only."""
    return {"protocol": measured["protocol"],
            "rows": {row: {key: values[key] for key in FRONTIER_KEYS} for row, values in measured["rows"].items()}}


def merge_costs(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """`new`'s rows added to `old`'s, so measuring a few new rows keeps the others: only when both batches
    measured the same client the same way (protocol) and dense is in `new`. Every ratio is to dense of the same
    batch, so the old rows are rescaled by the ratio of the two batches' dense times (memory is deterministic
    and kept as is); a different protocol replaces the file."""
    if old is None or old.get("protocol") != new["protocol"] or "dense" not in old.get("rows", {}):
        return new
    scale = {key: new["rows"]["dense"][key] / old["rows"]["dense"][key]
             for key in ("client_round_seconds_median", "client_step_seconds_median")}
    rows = {row: {key: value * scale.get(key, 1.0) for key, value in values.items()}
            for row, values in old["rows"].items() if row not in new["rows"]}
    return {"protocol": new["protocol"], "rows": {**new["rows"], **rows},
            "batches": old.get("batches", 1) + 1}


def _to_tokens(data, length: int):
    """Each row's own tokens repeated to exactly `length` real tokens (no padding): a client's data at `length`."""
    def stretch(row: dict[str, Any]) -> dict[str, Any]:
        reps = -(-length // len(row["input_ids"]))
        out = {key: (value * reps)[:length] for key, value in row.items() if isinstance(value, list)}
        return {**row, **out}
    return data.map(stretch)
