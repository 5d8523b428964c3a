"""Pruned deployment: a finished run's global model with the heads its clients kept least often removed, scored
beside the whole model, with the inference FLOPs and latency each needs.

The mask is the consensus of the client updates of the last `--window` rounds (`fedhead.trained.
consensus_mask_of_run`, what `fedhead evaluate --pruned` uses: heads ranked by how often a client kept them, ties
by mean confidence), at each of `--sparsities` (per block). The pruned model is the global model physically sliced to
those heads (`prune_heads_`, LoRA included). Inference FLOPs are counted by `torch.utils.flop_counter` on one
evaluation batch (eager attention); latency is the median forward time of that batch at `--threads`, the
whole and the pruned model timed in the same process (compare the ratio, not the milliseconds).

    python bench/pruned_deployment.py bench/results/frontier/seed0/remove-0.9 --sparsities 0.5 0.7 0.9
    python bench/pruned_deployment.py RUN_DIR --pairs 2000     # fewer evaluation pairs: screening only

With --ranking, the heads are instead ranked on the model itself, scored (`fedhead.heads.importance.
score_heads`) on the first --score-examples training pairs of the run's task: `confidence` (the method's score:
the lowest-scored heads go), `confidence_reversed` (the most confident heads go: does the score carry
information?), `gradient`, `random` (seeded). A dense run's clients never score their heads, so its consensus has
no ranking (`consensus_mask_of_run` refuses it); rank such a run this way:

    python bench/pruned_deployment.py bench/results/frontier/seed0/dense --tail-average --pairs 2000 \
        --sparsities 0.25 0.5 --ranking confidence confidence_reversed gradient random

Writes docs/results/pruned_deployment/<run name>.seed<S>[.pairs<P>][.tail][.ranked].json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import ROOT, load_finished_run

from fedhead.data.batching import batches_of, collate
from fedhead.data.tasks import load_task_data
from fedhead.federated.accounting import count_flops
from fedhead.federated.evaluation import evaluate
from fedhead.heads.importance import score_heads
from fedhead.heads.pruning import kept_heads_mask
from fedhead.models.slicing import prune_heads_
from fedhead.run_dir import RunDir
from fedhead.run_metrics import client_head_masks
from fedhead.trained import consensus_mask_of_run

RESULTS = ROOT / "docs" / "results" / "pruned_deployment"


def inference_cost(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int) -> tuple[int, float]:
    """(forward FLOPs, median forward seconds) of `model` on `batch`, eval mode, no gradient."""
    model.eval()
    with torch.no_grad():
        with count_flops() as flops:
            model(**batch)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - start)
    return flops[0], statistics.median(times[1:])


RANKINGS = ("confidence", "confidence_reversed", "gradient", "random")


def head_rankings(run, rankings: list[str], examples: int) -> dict[str, torch.Tensor]:
    """Per ranking, scores [blocks, heads] of `run`'s global model (higher: kept first), scored on the first
    `examples` training pairs of its task in batches of 32."""
    lm = run.lm
    batches = batches_of(load_task_data(run.cfg, lm.tokenizer).train, list(range(examples)), 32, lm.tokenizer)
    special = lm.tokenizer.all_special_ids
    out = {}
    for name in rankings:
        method = "confidence" if name.startswith("confidence") else name
        scores, _ = score_heads(lm.model, lm.head_map, batches, method, special_ids=special, prefix=lm.prefix,
                                generator=torch.Generator().manual_seed(run.cfg.seed))
        out[name] = -scores if name == "confidence_reversed" else scores
    return out


def measure(run_dir: Path, sparsities: list[float], window: int, pairs: int | None, repeats: int,
            tail_average: bool = False, rankings: list[str] | None = None,
            score_examples: int = 128) -> dict[str, Any]:
    rd = RunDir(run_dir)
    run, eval_pairs = load_finished_run(run_dir, pairs, tail_average)
    lm, cfg = run.lm, run.cfg
    hm = lm.head_map
    kept, _ = client_head_masks(rd.metrics(), window)
    rows = eval_pairs[: cfg.federated.eval_batch_size]
    rows.pop("references", None)
    batch = collate(rows, lm.tokenizer)
    out: dict[str, Any] = {"run": run_dir.name, "seed": cfg.seed, "round": run.round, "window": window,
                           "model": "tail_average" if tail_average else "last_round",
                           "updates": int(kept.shape[0]), "pairs": len(eval_pairs), "models": []}
    ranked = head_rankings(run, rankings, score_examples) if rankings else {}
    if ranked:
        out["score_examples"] = score_examples
    whole = torch.ones(hm.num_blocks, hm.num_heads, dtype=torch.bool)
    variants = [(0.0, "whole", whole)]
    for s in sparsities:
        if ranked:
            variants += [(s, name, kept_heads_mask(scores, s, "per_block")) for name, scores in ranked.items()]
        else:
            variants.append((s, "consensus", consensus_mask_of_run(run_dir, s, window)))
    for s, ranking, mask in variants:
        model = copy.deepcopy(lm.model)
        if s > 0:
            prune_heads_(model, hm, mask, lm.prefix)
        flops, seconds = inference_cost(model, batch, repeats)
        result = evaluate(model, eval_pairs, lm.tokenizer, cfg.federated.eval_batch_size)
        out["models"].append({"sparsity": s, "ranking": ranking, "kept_heads": int(mask.sum()),
                              "accuracy": result["accuracy"], "eval_loss": result["eval_loss"],
                              "inference_flops": flops, "inference_seconds": seconds, "mask": mask.int().tolist()})
        print(f"{run_dir.name}: sparsity {s:.2f} by {ranking} ({int(mask.sum())} heads) accuracy "
              f"{result['accuracy']:.4f}, {flops / 1e9:.1f} GFLOPs, {1000 * seconds:.0f} ms a batch", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="Finished run folders.")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    parser.add_argument("--window", type=int, default=5, help="Rounds whose client masks form the consensus.")
    parser.add_argument("--pairs", type=int, default=None, help="Evaluation pairs (default: the whole file).")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tail-average", action="store_true",
                        help="Prune the run's tail-averaged model (federated.tail_average_rounds), not its last one.")
    parser.add_argument("--ranking", nargs="+", choices=RANKINGS, default=None,
                        help="Rank heads on the model itself instead of by the clients' consensus (see above).")
    parser.add_argument("--score-examples", type=int, default=128, help="--ranking: training pairs scored.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for run_dir in args.runs:
        result = measure(run_dir, args.sparsities, args.window, args.pairs, args.repeats, args.tail_average,
                         args.ranking, args.score_examples)
        whole = result["models"][0]
        for m in result["models"]:
            m["accuracy_drop_points"] = 100 * (whole["accuracy"] - m["accuracy"])
            m["inference_flops_saved"] = whole["inference_flops"] / m["inference_flops"]
            m["latency_saved"] = whole["inference_seconds"] / m["inference_seconds"]
        suffix = (("" if args.pairs is None else f".pairs{args.pairs}") + (".tail" if args.tail_average else "")
                  + (".ranked" if args.ranking else ""))
        path = RESULTS / f"{result['run']}.seed{result['seed']}{suffix}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
