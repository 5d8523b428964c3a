"""What a dense training step's saved activations are made of, and so how much peak training memory pruning
heads can save at most.

Every tensor autograd saves for the backward of one forward (the memory `fedhead.federated.accounting.
saved_activation_bytes` counts) is sorted by shape into: attention maps (..., T, T), the per-head query / key /
value operands of the attention matmuls (B*H, T, d) and (B*H, d, T), the feed-forward intermediate (..., 4D)
and the hidden-size tensors (..., D: layer-norm inputs, projections, residuals). Only the first two belong to
heads. A client whose autograd graph holds k of a block's H heads (remove, sparse_backward, mixed) keeps about
k / H of them, so against dense its saving is at most

    dense_total / (client_other_bytes + client_head_bytes * k / H)

where the client's model is dense's, or with `lora.freeze_a` (A frozen also drops the saved inputs of A).

    python bench/activation_breakdown.py --tokens 64 128 --kept 2

Model: the paper_base config's (MiniLM with LoRA on query and value), in training mode, batch 32.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from common import ROOT

from fedhead.config import load_config
from fedhead.federated.accounting import saved_activation_bytes
from fedhead.models import build_model


def breakdown(tokens: int, batch: int, freeze_a: bool = False,
              cfg_path=ROOT / "configs" / "paper_base.toml") -> tuple[dict[str, float], int]:
    """Bytes of saved activations by kind for one forward of a batch of `batch` x `tokens` token ids, and the
    model's heads per block."""
    cfg = load_config(cfg_path, {"model.max_length": tokens, "lora.freeze_a": freeze_a})
    lm = build_model(cfg, num_labels=3)
    model = lm.model.train()
    heads, dim = lm.head_map.num_heads, lm.head_map.head_dim
    hidden = heads * dim
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, tokens), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(batch, dtype=torch.long)}
    storages: list[tuple[int, tuple[int, ...]]] = []
    with saved_activation_bytes(model, storages):
        loss = model(**inputs).loss
    loss.backward()
    kinds: dict[str, float] = defaultdict(float)
    for nbytes, shape in storages:
        if len(shape) >= 2 and shape[-1] == shape[-2] == tokens:
            kind = "attention maps"
        elif len(shape) == 3 and shape[0] == batch * heads and dim in shape[1:] and tokens in shape[1:]:
            kind = "per-head q/k/v"
        elif shape and shape[-1] == 4 * hidden:
            kind = "feed-forward intermediate"
        elif shape and shape[-1] == hidden:
            kind = "hidden-size"
        else:
            kind = "other"
        kinds[kind] += nbytes
    return dict(kinds), heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--kept", type=int, default=2, help="heads of a block in the client's autograd graph")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = {}
    for tokens in args.tokens:
        dense_total = 0.0
        for freeze_a in (False, True):
            kinds, heads = breakdown(tokens, args.batch, freeze_a)
            total = sum(kinds.values())
            dense_total = dense_total or total
            head = kinds.get("attention maps", 0.0) + kinds.get("per-head q/k/v", 0.0)
            bound = dense_total / (total - head * (1 - args.kept / heads))
            name = "freeze_a" if freeze_a else "dense"
            out[f"{tokens}/{name}"] = {"bytes": dict(kinds), "total": total, "head_share": head / total,
                                       "max_saving_vs_dense": bound}
            print(f"{tokens} tokens, batch {args.batch}, {name}: {total / 1e6:.1f} MB saved for the backward")
            for kind, nbytes in sorted(kinds.items(), key=lambda kv: -kv[1]):
                print(f"  {kind:28s} {nbytes / 1e6:8.1f} MB  {100 * nbytes / total:5.1f}%")
            print(f"  heads' share {100 * head / total:.1f}%: with {args.kept} of {heads} heads in the graph, at most "
                  f"{bound:.2f}x less than dense")
    print(json.dumps(out))

if __name__ == "__main__":
    main()
