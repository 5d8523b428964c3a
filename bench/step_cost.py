"""Cost of one local training step of MiniLM + LoRA at head sparsity 0, 0.5, 0.7 and 0.9, in one run.

For each sparsity the heads are physically removed (fedhead's `prune_heads_`), then it measures the median
step time (forward + backward + AdamW step, after warm-up, torch threads = cores) and the forward+backward
FLOPs counted by `torch.utils.flop_counter` under eager attention (whole model and attention blocks only),
with the model's default dropout and with dropout off. Ratios are against sparsity 0 of the same run.

    python bench/step_cost.py                # batch 32 x 128 tokens, LoRA r=8 on query/value
    python bench/step_cost.py --repeats 5 --json bench/results/step_cost.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedhead.config import Config
from fedhead.heads.pruning import kept_heads_mask
from fedhead.models import build_model
from fedhead.models.slicing import prune_heads_

MNLI = Path(__file__).resolve().parents[1].parent / "shared/data/mnli/train.jsonl"


def make_batch(tokenizer, batch: int, length: int) -> dict[str, torch.Tensor]:
    rows = [json.loads(line) for _, line in zip(range(batch), MNLI.open(), strict=False)]
    enc = tokenizer([r["premise"] for r in rows], [r["hypothesis"] for r in rows], padding="max_length",
                    truncation=True, max_length=length, return_tensors="pt")
    out = dict(enc)
    out["labels"] = torch.arange(batch) % 3
    return out


def set_dropout(model: torch.nn.Module, p: float | None) -> None:
    """p=None keeps the checkpoint's dropout; otherwise sets every Dropout (and the attention's) to p."""
    if p is None:
        return
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def count(model, batch) -> tuple[int, int]:
    """(whole-model, attention-block) forward+backward FLOPs of one step, eager attention."""
    mode = FlopCounterMode(display=False)
    with mode:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    per_module = mode.get_flop_counts()
    attention = sum(sum(ops.values()) for name, ops in per_module.items()
                    if name.endswith(".attention") and ".layer." in name)
    return int(mode.get_total_flops()), int(attention)


def time_steps(model, batch, warmup: int, repeats: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.9])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON here.")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)

    cfg = Config(model={"attn_implementation": "eager", "pooling": "mean"})
    lm = build_model(cfg, 3)
    batch = make_batch(lm.tokenizer, args.batch, args.length)
    scores = torch.rand(lm.head_map.num_blocks, lm.head_map.num_heads, generator=torch.Generator().manual_seed(0))
    rows = []
    for s in args.sparsities:
        model = copy.deepcopy(lm.model)
        kept = kept_heads_mask(scores, s, "global")
        if s > 0:
            prune_heads_(model, lm.head_map, kept, lm.prefix)
        flops, attn_flops = count(model, batch)
        row = {"sparsity": s, "kept_heads": int(kept.sum()), "flops": flops, "attention_flops": attn_flops}
        for label, p in [("dropout", None), ("no_dropout", 0.0)]:
            m = copy.deepcopy(model)
            set_dropout(m, p)
            row[f"step_ms_{label}"] = 1000 * time_steps(m, batch, args.warmup, args.repeats)
        rows.append(row)
        print(f"  measured sparsity {s}: {row['step_ms_dropout']:.0f} ms", flush=True)

    base = rows[0]
    header = ("| sparsity | kept heads | step ms (dropout) | speed-up | step ms (no dropout) | speed-up "
              "| fwd+bwd GFLOPs | reduction | attention GFLOPs | reduction |")
    print(f"\nMiniLM-L6 + LoRA r=8 (query, value), batch {args.batch} x {args.length} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} steps\n")
    print(header)
    print("|" + "---|" * 10)
    for r in rows:
        print(f"| {r['sparsity']:.1f} | {r['kept_heads']} | {r['step_ms_dropout']:.0f} | "
              f"{base['step_ms_dropout'] / r['step_ms_dropout']:.2f}x | {r['step_ms_no_dropout']:.0f} | "
              f"{base['step_ms_no_dropout'] / r['step_ms_no_dropout']:.2f}x | {r['flops'] / 1e9:.1f} | "
              f"{base['flops'] / r['flops']:.2f}x | {r['attention_flops'] / 1e9:.1f} | "
              f"{base['attention_flops'] / max(r['attention_flops'], 1):.2f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
