"""What a small device should run: for each budget (a ratio to dense of upload, training FLOPs or peak training
memory), the most accurate configuration that meets it, and the most accurate one that prunes heads (issue "What
a small device should run").

    python bench/budget.py costs [--rows ...]   # a client round of each row: FLOPs, upload, memory (64 and 256
                                                # tokens), time; docs/results/budget_costs.json
    python bench/budget.py table                # docs/results/budget.md from the costs and the frontier's records

**Costs** are one controlled measurement (`measure_costs` in bench/frontier_costs.py, shared with `frontier.py
costs`), not the runs' own logs: one process builds every row's model and runs the same client's round (client 0 of
seed 0, round 1, from each row's initial global state) for each row in turn, `--repeats` times. Training FLOPs
(torch's flop counter, eager attention), the upload (the serialised update's bytes) and the peak training memory
(the bytes autograd keeps for the backward, the largest recomputed layer under checkpointing, a gradient and AdamW's
two moments per trainable value) are exact and deterministic; round and step times are medians, good to about 0.1x.
Memory is also measured at 256 tokens: each row of the client's data repeated to 256 real tokens (no padding), one
pass. Memory ratios are given against dense with eager attention (what every row trains with) and against dense with
`sdpa` (the best kernel for training memory; its FLOPs are not counted on the CPU, so no FLOP ratio is given for
sdpa rows).

**Accuracy** comes from the frontier's records (bench/frontier.py: 60 rounds, 3 seeds, all 9,815 pairs, the mean
of the last 5 rounds' global models, paired with dense of the same seed) when a row has them, else from its
30-round screen (one seed: marked, a screen only). A row whose training is exactly another's (`EXACT`) takes its
accuracy: activation checkpointing alone takes dense's (tests/test_levers.py shows its gradients equal dense's), a
deflated upload the undeflated row's (tests/test_levers.py shows the run equal but for its bytes).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from common import ROOT
from frontier import RESULTS, ROWS, frontier_rows
from frontier_costs import measure_costs

COSTS = ROOT / "docs" / "results" / "budget_costs.json"
SCREEN = RESULTS.parent / "screen30"
TABLE = RESULTS.parent / "budget.md"
# rows whose training is another row's exactly, and why: that row's accuracy (activation checkpointing changes no
# gradient; a deflated upload is the same update in fewer bytes)
EXACT = {"dense-ckpt": ("dense", "dense's gradients"), "dense-sdpa": ("dense", "dense's gradients"),
         "dense-ckpt-sdpa": ("dense", "dense's gradients"),
         "dense-up4-z": ("dense-up4", "dense-up4's update, deflated"),
         "dense-up2-z": ("dense-up2", "dense-up2's update, deflated")}
COST_ROWS = ("dense", "dense-sdpa", "dense-ckpt", "dense-ckpt-sdpa", "dense-up8", "dense-up4", "dense-up2",
             "dense-steps6", "dense-steps5", "dense-top5", "dense-top4", "dense-top3", "dense-top3-ckpt",
             "dense-steps5-ckpt", "dense-up2-top4", "sparse-rolling-0.9", "sparse-rolling-0.7",
             "sparse-rolling-0.9-up4", "remove-0.9", "mixed-ng-rolling-fapc-0.9", "mixed-ng-rolling-fapc-0.7",
             "weak-ckpt-steps2", "weak-remove-0.9-ckpt-steps3", "weak-remove-0.9-steps4", "dense-b16", "dense-b8",
             "dense-up4-z", "dense-r4-up4-z", "dense-b16-m8", "dense-m8", "dense-up3-z",
             "dense-up2-z")
# (resource, budget): the ratio to dense a configuration must reach (issue "What a small device should run")
BUDGETS = (("upload", 2.0), ("upload", 5.0), ("upload", 10.0), ("train_flops", 1.2), ("train_flops", 1.5),
           ("memory", 2.0), ("memory", 3.0), ("memory_256", 2.0), ("memory_256", 3.0))
NAMES = {"upload": "upload", "train_flops": "training FLOPs", "memory": "peak training memory (64 tokens)",
         "memory_256": "peak training memory (256 tokens)"}


def ratios(costs: dict[str, Any], row: str) -> dict[str, float | None]:
    """What `row` saves, as dense / row of the same measurement: upload, training FLOPs (None for sdpa rows, whose
    attention FLOPs the CPU counter misses), memory at 64 and 256 tokens against eager dense, and against sdpa
    dense, round and step time."""
    rows = costs["rows"]
    dense, mine = rows["dense"], rows[row]
    sdpa = rows.get("dense-sdpa", {})

    def r(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    return {
        "upload": r(dense["bytes_up"], mine["bytes_up"]),
        "train_flops": None if mine["attention"] == "sdpa" else r(dense["train_flops"], mine["train_flops"]),
        "memory": r(dense["peak_memory_bytes"], mine["peak_memory_bytes"]),
        "memory_256": r(dense["peak_memory_bytes_256"], mine["peak_memory_bytes_256"]),
        "memory_vs_sdpa": r(sdpa.get("peak_memory_bytes"), mine["peak_memory_bytes"]),
        "memory_256_vs_sdpa": r(sdpa.get("peak_memory_bytes_256"), mine["peak_memory_bytes_256"]),
        "round_time": r(dense["client_round_seconds_median"], mine["client_round_seconds_median"]),
        "step_time": r(dense["client_step_seconds_median"], mine["client_step_seconds_median"]),
    }


def accuracy(row: str, protocol: dict[str, dict[str, Any]], screens: dict[str, dict[str, Any]]
             ) -> dict[str, Any] | None:
    """A row's accuracy evidence (`frontier.frontier_rows` by row): the protocol's paired drop (3 seeds: mean, sd,
    95% interval), an exact row's (its source row's, by `EXACT`), the protocol's drop over the seeds recorded so
    far (fewer than 3: no interval), or its 30-round screen's drop against dense's screen (one seed)."""
    source, reason = EXACT.get(row, (row, ""))
    if source in protocol and len(protocol[source]["seeds"]) >= 3:
        r = protocol[source]
        evidence = f"exact: {reason}" if source != row else f"{len(r['seeds'])} seeds, 60 rounds"
        return {"drop": r["drop"], "sd": r["drop_sd"], "interval": (r["drop_low"], r["drop_high"]),
                "seeds": len(r["seeds"]), "evidence": evidence}
    if source in protocol:  # the protocol under way: fewer than 3 seeds, paired with dense's, no interval
        r = protocol[source]
        n, model = len(r["seeds"]), "tail average" if r["model"].startswith("mean") else "last round"
        of = f"{source}'s (same training) " if source != row else ""
        return {"drop": r["drop"], "sd": None, "interval": None, "seeds": n,
                "evidence": f"{of}{n} of 3 seeds, 60 rounds, {model}"}
    if source in screens:
        r = screens[source]
        model = "tail average" if r["model"].startswith("mean") else "last round"
        of = f" of {source} (same training)" if source != row else ""
        return {"drop": r["drop"], "sd": None, "interval": None, "seeds": 1,
                "evidence": f"screen{of}: 30 rounds, seed 0, {model}"}
    return None


def prunes_heads(row: str) -> bool:
    return any(k.startswith("heads.sparsity") or k == "heads.tiers" for k in ROWS[row])


def table(costs: dict[str, Any], protocol: dict, screens: dict) -> str:
    """The budget table: per budget, the most accurate row that meets it, and the most accurate that prunes
    heads (smallest drop; protocol evidence before screens)."""
    lines = ["| budget (ratio to dense) | best configuration | drop vs dense (pt) | 95% interval | evidence | "
             "saves: upload / FLOPs / memory 64 / memory 256 | best with head pruning | its drop (pt) |",
             "|---|---|---|---|---|---|---|---|"]
    for resource, budget in BUDGETS:
        found = best_meeting(costs, protocol, screens, resource, budget)
        found_pruning = best_meeting(costs, protocol, screens, resource, budget, pruning=True)
        best = None if found is None else (False, found[1]["drop"], found[0], found[1])
        pruning = None if found_pruning is None else (False, found_pruning[1]["drop"], *found_pruning)

        def cell(m) -> tuple[str, str, str, str, str]:
            if m is None:
                return "none measured", "-", "-", "-", "-"
            _, drop, row, ev = m
            r = ratios(costs, row)
            interval = f"[{ev['interval'][0]:+.1f}, {ev['interval'][1]:+.1f}]" if ev["interval"] else "-"
            sd = f" ± {ev['sd']:.1f}" if ev["sd"] is not None else ""
            saves = " / ".join(f"{r[k]:.2f}x" if r[k] else "-" for k in ("upload", "train_flops", "memory",
                                                                          "memory_256"))
            return f"`{row}`", f"{drop:+.1f}{sd}", interval, ev["evidence"], saves

        b, p = cell(best), cell(pruning)
        lines.append(f"| {NAMES[resource]} >= {budget:g}x | {b[0]} | {b[1]} | {b[2]} | {b[3]} | {b[4]} | {p[0]} | "
                     f"{p[1]} |")
    return "\n".join(lines)


def costs_table(costs: dict[str, Any]) -> str:
    lines = ["| row | options | attention | steps | upload saved | training FLOPs saved | memory saved (64 tok) | "
             "vs sdpa dense | memory saved (256 tok) | vs sdpa dense |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = [r for r in COST_ROWS if r in costs["rows"]] + [r for r in costs["rows"] if r not in COST_ROWS]
    for row in order:  # COST_ROWS' order, however the batches merged
        values, r = costs["rows"][row], ratios(costs, row)
        opts = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in ROWS[row].items()) or "-"
        cells = [f"{r[k]:.2f}x" if r[k] else "-" for k in ("upload", "train_flops", "memory", "memory_vs_sdpa",
                                                            "memory_256", "memory_256_vs_sdpa")]
        lines.append(f"| {row} | {opts} | {values['attention']} | {values['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOTES = """FLOPs, upload and memory are exact counts of one client round (client 0, seed 0, round 1; bench/budget.py
costs). Round and step times are in docs/results/budget_costs.json but not here: the 2026-12-06 batches ran beside
two training runs and the test suite on 2 cores, and their time ratios are noise (a checkpointed step measured
faster than a plain one). On the CPU, sdpa saves no memory in training: with attention dropout PyTorch's CPU sdpa
takes its math kernel, which keeps the attention probabilities as eager does (the sdpa rows equal eager's); on a GPU
its fused kernels would. Uploads include what every update carries besides the adapter (kept-head mask, head
scores, safetensors header; with quantisation, a float32 scale every 64 values and the tensors' shapes), so 8, 4 and
2 bits save 3.4x, 5.7x and 8.9x, not 3.8x, 7.1x and 12.8x. Deflated (`federated.upload_deflate`), 4, 3 and 2
bits save 7.4x, 9.3x and 14.6x."""

PRESETS = {"save_upload": "upload", "save_compute": "train_flops", "save_memory": "memory"}


def readme_table(costs: dict[str, Any], protocol: dict, screens: dict) -> str:
    """The README's copy: per budget, the most accurate configuration that meets it (as `table`), the preset that is
    that configuration (configs/save_*.toml, by its `# row:` comment), what it saves and its drop."""
    presets = {}
    for name in PRESETS:
        path = ROOT / "configs" / f"{name}.toml"
        if path.exists():
            presets[preset_row(path.read_text())] = name
    lines = ["| budget (vs dense) | best measured | preset | saves: upload / FLOPs / memory (64 tok) | drop (pt) "
             "| 95% interval | evidence |", "|---|---|---|---|---|---|---|"]
    for resource, budget in BUDGETS:
        best = best_meeting(costs, protocol, screens, resource, budget)
        if best is None:
            lines.append(f"| {NAMES[resource]} >= {budget:g}x | none measured | - | - | - | - | - |")
            continue
        row, e = best
        r = ratios(costs, row)
        opts = ", ".join(f"{k}={v}" for k, v in ROWS[row].items())
        saves = " / ".join(f"{r[k]:.2f}x" if r[k] else "-" for k in ("upload", "train_flops", "memory"))
        interval = f"[{e['interval'][0]:+.1f}, {e['interval'][1]:+.1f}]" if e["interval"] else "-"
        preset = f"`configs/{presets[row]}.toml`" if row in presets else "-"
        lines.append(f"| {NAMES[resource]} >= {budget:g}x | {opts} | {preset} | {saves} | {e['drop']:+.1f} "
                     f"| {interval} | {e['evidence']} |")
    return "\n".join(lines)


def best_meeting(costs: dict[str, Any], protocol: dict, screens: dict, resource: str, budget: float,
                 pruning: bool = False) -> tuple[str, dict[str, Any]] | None:
    """The row with the smallest drop among those whose `resource` saving is at least `budget`, rows with protocol
    or exact evidence first: a one-seed screen is chosen only where no such row meets the budget (a screen's
    last-round model swings by points, so it cannot displace a 3-seed measurement; with `pruning`, only rows that
    prune heads)."""
    meeting = []
    for row in costs["rows"]:
        saved = ratios(costs, row)[resource]
        evidence = accuracy(row, protocol, screens)
        if saved is not None and saved >= budget and evidence is not None and (prunes_heads(row) or not pruning):
            meeting.append((evidence["seeds"] < 3, evidence["drop"], -round(saved, 1), row, evidence))
    # evidence, then drop, then (a tie: an exact row) the larger saving, to 0.1x (4.41x is not more than 4.39x),
    # then the row's name, so the answer does not hang on the order of the costs file
    meeting.sort(key=lambda m: m[:4])
    return (meeting[0][3], meeting[0][4]) if meeting else None


def preset_row(text: str) -> str | None:
    """The frontier row a preset was measured as: its `# row: NAME` comment."""
    for line in text.splitlines():
        if line.startswith("# row:"):
            return line.split(":", 1)[1].strip()
    return None


def _readme_block(name: str, text: str) -> None:
    readme = ROOT / "README.md"
    content = readme.read_text()
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    head, rest = content.split(start, 1)
    readme.write_text(head + start + text + "\n" + end + rest.split(end, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    costs = sub.add_parser("costs")
    costs.add_argument("--rows", nargs="+", default=list(COST_ROWS), choices=list(ROWS))
    costs.add_argument("--repeats", type=int, default=2)
    costs.add_argument("--threads", type=int, default=1)
    sub.add_parser("table")
    args = parser.parse_args()
    if args.command == "costs":
        rows = ["dense", *[r for r in args.rows if r != "dense"]]
        measured = measure_costs(rows, args.repeats, args.threads, long_tokens=256)
        if COSTS.exists():  # rows measured before keep their exact counts; their times are rescaled by the
            old = json.loads(COSTS.read_text())  # ratio of the two batches' dense times (each ratio is in-batch)
            scale = {key: measured["rows"]["dense"][key] / old["rows"]["dense"][key]
                     for key in ("client_round_seconds_median", "client_step_seconds_median")}
            kept = {row: {k: v * scale[k] if k in scale else v for k, v in values.items()}
                    for row, values in old["rows"].items() if row not in measured["rows"]}
            measured["rows"] = {**kept, **measured["rows"]}
            measured["batches"] = [*old.get("batches", [old["protocol"]]), measured["protocol"]]
        COSTS.write_text(json.dumps(measured, indent=1) + "\n")
        print(f"wrote {COSTS.relative_to(ROOT)}")
        return
    costs_data = json.loads(COSTS.read_text())
    protocol = {r["row"]: r for r in frontier_rows(RESULTS)}
    screens = {r["row"]: r for r in frontier_rows(SCREEN)}
    text = ("## Budgets\n\n" + table(costs_data, protocol, screens) + "\n\n## What each configuration saves\n\n"
            + costs_table(costs_data) + "\n\n" + NOTES + "\n")
    TABLE.write_text(text)
    _readme_block("budget", readme_table(costs_data, protocol, screens))
    print(text)


if __name__ == "__main__":
    main()
