"""Cost of one local training step of MiniLM + LoRA at head sparsity 0, 0.5, 0.7 and 0.9 for each pruning mode
(remove, train_sparse, sparse_backward; mixed with frozen_autograd = false on request), at 128 and 512 tokens,
in one run.

For each mode and sparsity it builds the model a client trains (fedhead's `prune_heads_`, plus the no-grad side
heads of sparse_backward) and measures the forward+backward FLOPs counted by `torch.utils.flop_counter` under
eager attention (whole model and attention blocks), the peak training memory a client reports (the bytes autograd
saves for the backward + LoRA gradients + AdamW state; see `fedhead.federated.accounting`), and, unless
--repeats 0, the median step time (forward + backward + AdamW step after warm-up). Ratios are against dense at
the same length, in the same run.

    python bench/step_cost.py                       # 32 x 128 and 8 x 512 tokens, LoRA r=8 on query/value
    python bench/step_cost.py --repeats 0 --json bench/results/step_cost.json   # FLOPs and memory only
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
from fedhead.federated.accounting import saved_activation_bytes
from fedhead.heads.pruning import kept_heads_mask
from fedhead.models import build_model
from fedhead.models.slicing import attach_frozen_heads, prune_heads_

MNLI = Path(__file__).resolve().parents[1].parent / "shared/data/mnli/train.jsonl"


def make_batch(tokenizer, batch: int, length: int) -> dict[str, torch.Tensor]:
    rows = [json.loads(line) for _, line in zip(range(batch), MNLI.open(), strict=False)]
    enc = tokenizer([r["premise"] for r in rows], [r["hypothesis"] for r in rows], padding="max_length",
                    truncation=True, max_length=length, return_tensors="pt")
    out = dict(enc)
    out["labels"] = torch.arange(batch) % 3
    return out


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


def memory(model, batch) -> int:
    """Peak training memory of one step as the client reports it (fedhead.federated.client.train_local): the
    bytes autograd saves for the backward (activations) + a gradient and AdamW's two moments per trainable value.
    In training mode, as a client trains: dropout keeps its masks for the backward."""
    model.train()
    with saved_activation_bytes(model) as saved:
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return saved[0] + 3 * trainable


def working_model(lm, mode: str, kept: torch.Tensor, scores: torch.Tensor):
    """The model a client trains in `mode` with `kept` heads (as fedhead.federated.client.client_update builds it).

    `mixed_no_grad@c`: heads.mode = "mixed" with frozen_autograd = false and compute_sparsity = c: the
    lowest-scored fraction c of each block's heads removed, the other pruned heads computed without autograd.
    """
    model = copy.deepcopy(lm.model)
    if bool(kept.all()) or mode == "train_sparse":
        return model  # train_sparse: every head computed, the pruned heads' LoRA gradients masked after the step
    prune_heads_(model, lm.head_map, kept, lm.prefix)
    if mode == "sparse_backward":
        attach_frozen_heads(model, copy.deepcopy(lm.model), lm.head_map, kept, lm.prefix)
    elif mode.startswith("mixed_no_grad@"):
        computed = kept_heads_mask(scores, float(mode.split("@")[1]), "per_block") | kept
        attach_frozen_heads(model, copy.deepcopy(lm.model), lm.head_map, kept, lm.prefix, computed & ~kept)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="Batch size (default: 32 at 128 tokens or fewer, "
                        "else 8).")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.9])
    parser.add_argument("--modes", nargs="+", default=["remove", "train_sparse", "sparse_backward"],
                        help="remove, train_sparse, sparse_backward, mixed_no_grad@C (C: compute_sparsity)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="Timed steps (0: FLOPs and memory only).")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = Config(model={"attn_implementation": "eager", "pooling": "mean", "max_length": max(args.lengths)})
    lm = build_model(cfg, 3)
    scores = torch.rand(lm.head_map.num_blocks, lm.head_map.num_heads, generator=torch.Generator().manual_seed(0))
    rows = []
    for length in args.lengths:
        batch_size = args.batch or (32 if length <= 128 else 8)
        batch = make_batch(lm.tokenizer, batch_size, length)
        for mode in args.modes:
            for s in args.sparsities:
                if s == 0 and mode != args.modes[0]:
                    continue  # dense is the same model in every mode
                kept = kept_heads_mask(scores, s, "per_block")
                model = working_model(lm, mode if s > 0 else "dense", kept, scores)
                flops, attn_flops = count(model, batch)
                row = {"length": length, "batch": batch_size, "mode": mode if s > 0 else "dense", "sparsity": s,
                       "kept_heads": int(kept.sum()), "flops": flops, "attention_flops": attn_flops,
                       "peak_memory_bytes": memory(model, batch)}
                if args.repeats:
                    row["step_ms"] = 1000 * time_steps(model, batch, args.warmup, args.repeats)
                rows.append(row)
                print(f"  {length} tokens, {row['mode']} {s}: {row['peak_memory_bytes'] / 1e6:.0f} MB", flush=True)

    header = ("| tokens x batch | mode | sparsity | kept heads | step ms | speed-up | fwd+bwd GFLOPs | reduction "
              "| attention GFLOPs | peak training memory MB | reduction |")
    print(f"\nMiniLM-L6 + LoRA r=8 (query, value), per-block pruning, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} steps; ratios against dense at the same length\n")
    print(header)
    print("|" + "---|" * 11)
    for r in rows:
        base = next(b for b in rows if b["length"] == r["length"] and b["mode"] == "dense")
        ms = f"{r['step_ms']:.0f} | {base['step_ms'] / r['step_ms']:.2f}x" if "step_ms" in r else "- | -"
        print(f"| {r['length']} x {r['batch']} | {r['mode']} | {r['sparsity']:.1f} | {r['kept_heads']} | {ms} | "
              f"{r['flops'] / 1e9:.1f} | {base['flops'] / r['flops']:.2f}x | {r['attention_flops'] / 1e9:.1f} | "
              f"{r['peak_memory_bytes'] / 1e6:.0f} | {base['peak_memory_bytes'] / r['peak_memory_bytes']:.2f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
