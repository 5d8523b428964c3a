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
    python bench/step_cost.py --device cuda --modes remove --sparsities 0 0.9 --presets configs/save_*.toml

`--presets`: a row for each MiniLM classification preset, its model built with the preset's LoRA options (rank, targets,
layers, freeze_a, head_rank), its heads options as a mode (`preset_mode`) and its activation checkpointing; the
heads are ranked by the same random scores as the other rows. With activation checkpointing the autograd count
(`peak_memory_bytes`) misses the layer recomputed in the backward; `cuda_peak_memory_bytes` does not.

`--device cuda` (default: cpu): the model, batch and steps on the GPU, the clock read after
`torch.cuda.synchronize()`, and each timed row also gets `cuda_peak_memory_bytes`: `torch.cuda.max_memory_allocated`
over the warm-up and timed steps minus what was allocated before them (activations, gradients, AdamW state and
kernel workspace).
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

from fedhead.config import MINILM, Config, HeadsSection, load_config
from fedhead.federated.accounting import saved_activation_bytes
from fedhead.heads.pruning import kept_heads_mask
from fedhead.models import build_model
from fedhead.models.loading import enable_activation_checkpointing_
from fedhead.models.slicing import attach_frozen_heads, prune_heads_

MNLI = Path(__file__).resolve().parents[1].parent / "shared/data/mnli/train.jsonl"


def make_batch(tokenizer, batch: int, length: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    rows = [json.loads(line) for _, line in zip(range(batch), MNLI.open(), strict=False)]
    enc = tokenizer([r["premise"] for r in rows], [r["hypothesis"] for r in rows], padding="max_length",
                    truncation=True, max_length=length, return_tensors="pt")
    out = dict(enc)
    out["labels"] = torch.arange(batch) % 3
    return {name: tensor.to(device) for name, tensor in out.items()}


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


def time_steps(model, batch, warmup: int, repeats: int) -> tuple[float, int | None]:
    """Median seconds of a training step (forward + backward + AdamW step) over `repeats` steps after `warmup`
    ones, and on CUDA the memory those steps added at their peak (max_memory_allocated minus what was allocated
    before them; None on other devices)."""
    device = next(model.parameters()).device
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if on_cuda:
            torch.cuda.synchronize(device)  # CUDA kernels run asynchronously: wait for them before the clock
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - allocated_before if on_cuda else None
    return statistics.median(times), peak


def memory(model, batch) -> int:
    """Peak training memory of one step as the client reports it (fedhead.federated.local_training.train_local):
    the bytes autograd saves for the backward (activations) + a gradient and AdamW's two moments per trainable value.
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
    `mixed@c`: the same with frozen_autograd = true: the other pruned heads stay in autograd (their gradients
    masked after the step, which costs nothing here).
    """
    model = copy.deepcopy(lm.model)
    if bool(kept.all()) or mode == "train_sparse":
        return model  # train_sparse: every head computed, the pruned heads' LoRA gradients masked after the step
    if mode.startswith(("mixed@", "mixed_no_grad@")):
        computed = kept_heads_mask(scores, float(mode.split("@")[1]), "per_block") | kept
    if mode.startswith("mixed@"):
        prune_heads_(model, lm.head_map, computed, lm.prefix)
        return model
    prune_heads_(model, lm.head_map, kept, lm.prefix)
    if mode == "sparse_backward":
        attach_frozen_heads(model, copy.deepcopy(lm.model), lm.head_map, kept, lm.prefix)
    elif mode.startswith("mixed_no_grad@"):
        attach_frozen_heads(model, copy.deepcopy(lm.model), lm.head_map, kept, lm.prefix, computed & ~kept)
    return model


def preset_mode(heads: HeadsSection) -> str:
    """This script's mode of a preset's heads options, for client 0 after any warm-up: 'dense' without sparsity,
    'mixed@C' / 'mixed_no_grad@C' for heads.mode = 'mixed' with compute_sparsity C and frozen_autograd true /
    false, else heads.mode."""
    if heads.sparsity_of(0) == 0:
        return "dense"
    if heads.mode == "mixed":
        return f"{'mixed' if heads.frozen_autograd else 'mixed_no_grad'}@{heads.compute_sparsity}"
    return heads.mode


def load_preset(path: Path, max_length: int, device: str) -> tuple[Config, object]:
    """A preset's config (eager attention, `max_length`, `device`) and its MiniLM classifier with the preset's
    LoRA options. Exits with one line for a preset of another model or task (the batches are MiniLM's MNLI pairs)."""
    cfg = load_config(path, {"model.attn_implementation": "eager", "model.max_length": max_length,
                             "device": device})
    if cfg.model.name != MINILM or cfg.model.task != "classification":
        raise SystemExit(f"step_cost: {path} is a {cfg.model.name} {cfg.model.task} preset; only MiniLM "
                         "classification presets are measured")
    return cfg, build_model(cfg, 3)


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
    parser.add_argument("--presets", type=Path, nargs="+", default=[], help="Also a row for each of these MiniLM "
                        "classification presets (configs/*.toml): its LoRA options, heads options and activation "
                        "checkpointing.")
    parser.add_argument("--device", default="cpu", help="Where the model and the steps run: cpu (default), cuda, "
                        "cuda:N.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    max_length = max(args.lengths)
    cfg = Config(model={"attn_implementation": "eager", "pooling": "mean", "max_length": max_length},
                 device=args.device)
    lm = build_model(cfg, 3)
    presets = {path.stem: load_preset(path, max_length, args.device) for path in args.presets}
    scores = torch.rand(lm.head_map.num_blocks, lm.head_map.num_heads, generator=torch.Generator().manual_seed(0))
    # (row's name, its mode, sparsity, model to build it from, activation checkpointing): dense once (the same
    # model in every mode), then each mode's sparsities, then each preset
    plans = [(mode if s > 0 else "dense", mode if s > 0 else "dense", s, lm, False)
             for mode in args.modes for s in args.sparsities if s > 0 or mode == args.modes[0]]
    plans += [(f"preset:{name}", preset_mode(p_cfg.heads), p_cfg.heads.sparsity_of(0), p_lm,
               p_cfg.federated.checkpointing_of(0)) for name, (p_cfg, p_lm) in presets.items()]
    rows = []
    for length in args.lengths:
        batch_size = args.batch or (32 if length <= 128 else 8)
        batch = make_batch(lm.tokenizer, batch_size, length, args.device)
        for name, working_mode, s, base_lm, checkpointing in plans:
            kept = kept_heads_mask(scores, s, "per_block")
            model = working_model(base_lm, working_mode, kept, scores)
            if checkpointing:
                enable_activation_checkpointing_(model)
            flops, attn_flops = count(model, batch)
            row = {"length": length, "batch": batch_size, "mode": name, "sparsity": s,
                   "kept_heads": int(kept.sum()), "flops": flops, "attention_flops": attn_flops,
                   "peak_memory_bytes": memory(model, batch), "device": args.device}
            if name.startswith("preset:"):
                row.update(heads_mode=working_mode, activation_checkpointing=checkpointing)
            if args.repeats:
                seconds, cuda_peak = time_steps(model, batch, args.warmup, args.repeats)
                row["step_ms"] = 1000 * seconds
                if cuda_peak is not None:
                    row["cuda_peak_memory_bytes"] = cuda_peak
            rows.append(row)
            print(f"  {length} tokens, {row['mode']} {s}: {row['peak_memory_bytes'] / 1e6:.0f} MB", flush=True)

    header = ("| tokens x batch | mode | sparsity | kept heads | step ms | speed-up | fwd+bwd GFLOPs | reduction "
              "| attention GFLOPs | peak training memory MB | reduction |")
    where = args.device if args.device != "cpu" else f"{torch.get_num_threads()} threads"
    print(f"\nMiniLM-L6 + LoRA r=8 (query, value), per-block pruning, {where}, "
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
