"""The frontier's protocol and rows (bench/frontier.py): the base config and the overrides every run takes
(PROTOCOL), where records and run folders live, and each row's config overrides (ROWS)."""

from __future__ import annotations

from typing import Any

from common import ROOT

BASE = ROOT / "configs" / "paper_base.toml"
# tail average of the last 5 rounds' global models: the model scored on the full set beside the last round's
PROTOCOL = {"federated.rounds": 60, "federated.eval_every": 4, "federated.tail_average_rounds": 5}
RESULTS = ROOT / "docs" / "results" / "frontier"
RUNS = ROOT / "bench" / "results" / "frontier"
COSTS = ROOT / "docs" / "results" / "frontier_costs.json"
# rounds at which a row's global model is also scored on the full set, on the way to the last round: dense at 30
# and 45 shows whether 60 rounds reach convergence (the issue: "enough rounds that dense has converged")
CONVERGENCE_ROUNDS = {"dense": (30, 45)}
# The rows of the protocol, docs/head_pruning.md's copy of the table: dense, today's best at 90% (train_sparse,
# remove), and the survivors of screening at 90% and 70%; docs/results/frontier.md has every row.
PROTOCOL_ROWS = ("dense", "sparse-0.9", "remove-0.9", "sparse-rolling-0.9", "mixed-ng-rolling-fapc-0.9",
                 "sparse-rolling-0.7", "mixed-ng-rolling-fapc-0.7")

SPARSE = {"heads.mode": "train_sparse"}
FREEZE = {"lora.freeze_a": True}
HEADWISE = {"lora.head_rank": 1}
SHARED_WINDOW = {"heads.schedule": "rolling", "heads.rolling_window": "shared"}
MIXED_NO_GRAD = {"heads.mode": "mixed", "heads.compute_sparsity": 0.25, "heads.frozen_autograd": False}

ROWS: dict[str, dict[str, Any]] = {
    "dense": {},
    "dense-freeze_a": FREEZE,
    # today's best: train_sparse keeps accuracy best, remove saves compute
    "sparse-0.9": {"heads.sparsity": 0.9, **SPARSE},
    "remove-0.9": {"heads.sparsity": 0.9},
    "sparse-0.7": {"heads.sparsity": 0.7, **SPARSE},
    "remove-0.7": {"heads.sparsity": 0.7},
    # mechanisms (issue "Head pruning that pays"), screened at 90%
    "sb-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward"},
    "sb-rolling-fa-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward", "heads.schedule": "rolling",
                          **FREEZE},
    "sparse-rolling-0.9": {"heads.sparsity": 0.9, **SPARSE, "heads.schedule": "rolling"},
    "sparse-adam-0.9": {"heads.sparsity": 0.9, **SPARSE, "federated.server_optimizer": "adam",
                        "federated.server_learning_rate": 3e-3},
    "sparse-momentum-0.9": {"heads.sparsity": 0.9, **SPARSE, "federated.server_optimizer": "momentum",
                            "federated.server_learning_rate": 1.0, "federated.server_momentum": 0.5},
    "remove-rolling-scaled-0.9": {"heads.sparsity": 0.9, "heads.schedule": "rolling", "heads.scale_kept": True},
    "remove-scaled-0.9": {"heads.sparsity": 0.9, "heads.scale_kept": True},
    "sb-fa-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward", **FREEZE},
    "sb-fa-r16-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward", **FREEZE, "lora.rank": 16,
                      "lora.alpha": 32.0},
    "sb-fa-r32-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward", **FREEZE, "lora.rank": 32,
                      "lora.alpha": 64.0},
    "sb-warmup10-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward", "heads.warmup_rounds": 10},
    "sb-momentum-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward",
                        "federated.server_optimizer": "momentum", "federated.server_momentum": 0.5},
    "sb-0.7": {"heads.sparsity": 0.7, "heads.mode": "sparse_backward"},
    "sb-rolling-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward", "heads.schedule": "rolling"},
    "sparse-rolling-fa-0.9": {"heads.sparsity": 0.9, **SPARSE, "heads.schedule": "rolling", **FREEZE},
    "sparse-rolling-0.7": {"heads.sparsity": 0.7, **SPARSE, "heads.schedule": "rolling"},
    # coverage-balanced: the least-trained among the client's top half by confidence
    "sparse-coverage-0.9": {"heads.sparsity": 0.9, **SPARSE, "heads.schedule": "coverage", "heads.coverage_pool": 0.5},
    "mixed-ng-rolling-fa-0.7": {"heads.sparsity": 0.7, **MIXED_NO_GRAD, "heads.schedule": "rolling", **FREEZE},
    # mixed without autograd: the 3 lowest-scored heads of a block removed (1.23x fewer FLOPs at 64 tokens),
    # the other 7 pruned computed without autograd, the rolling window of 2 trained; with freeze_a, as heads
    # computed without autograd need (sb-rolling-0.9, a trained A: 23.1 points below dense at 30 rounds)
    "mixed-ng-rolling-fa-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, "heads.schedule": "rolling", **FREEZE},
    # LoRA capacity where heads are kept: with A frozen a higher rank uploads no more A; rank 16 is the largest
    # whose upload stays 5x below dense's rank-8 A + B (issue goal), alpha / rank kept at 2
    "mixed-ng-rolling-fa-r16-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, "heads.schedule": "rolling", **FREEZE,
                                    "lora.rank": 16, "lora.alpha": 32.0},
    # freeze_a's learning speed: with A fixed at its init (row norm 0.58) and Adam on B, alpha / rank only scales
    # how fast B A moves; a trained A grows to row norm 1.06 by round 60 (dense seed 0). alpha 64 (x4) doubled the
    # local loss gain but not the accuracy (mixed: 0.4039 against 0.4317 at alpha 16): screened out
    "mixed-ng-rolling-fa-a64-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, "heads.schedule": "rolling", **FREEZE,
                                    "lora.alpha": 64.0},
    "sparse-rolling-fa-a64-0.9": {"heads.sparsity": 0.9, **SPARSE, "heads.schedule": "rolling", **FREEZE,
                                  "lora.alpha": 64.0},
    "remove-rolling-fa-a64-0.9": {"heads.sparsity": 0.9, "heads.schedule": "rolling", **FREEZE, "lora.alpha": 64.0},
    # is dense's alpha (16, alpha / r = 2) itself too small? the fairness check for the alpha-64 rows
    "dense-a64": {"lora.alpha": 64.0},
    # head-wise LoRA (lora.head_rank, fedhead.models.headwise): every head its own rank-1 adapter, A and B both
    # split by head, so A is trained and only the kept heads' rows of both are sent (a client keeping 2 of 12
    # heads a block sends 2 x (384 + 32) values a projection against rank-8 LoRA's 6,144) and a head's training
    # moves no other head: the heads computed without autograd stay exact (no shared-A drift, sb-rolling-0.9)
    "dense-hw1": HEADWISE,
    "sparse-rolling-hw1-0.9": {"heads.sparsity": 0.9, **SPARSE, "heads.schedule": "rolling", **HEADWISE},
    "sb-rolling-hw1-0.9": {"heads.sparsity": 0.9, "heads.mode": "sparse_backward", "heads.schedule": "rolling",
                           **HEADWISE},
    "mixed-ng-rolling-hw1-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, "heads.schedule": "rolling", **HEADWISE},
    # FedRolex's own window (heads.rolling_window = "shared"): the round's clients all train the same 2 heads a
    # block, so each trained head's update is averaged over 4 clients instead of coming from about one (the
    # per-client windows rarely overlap); mixed-ng-rolling-hw1-0.9 sat near chance (0.34) through round 28
    "mixed-ng-shared-hw1-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, **SHARED_WINDOW, **HEADWISE},
    "mixed-ng-shared-fa-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, **SHARED_WINDOW, **FREEZE},
    "sparse-shared-hw1-0.9": {"heads.sparsity": 0.9, **SPARSE, **SHARED_WINDOW, **HEADWISE},
    # freeze_a with A at W's top right singular vectors (lora.init_a = "principal") instead of a random draw:
    # does a frozen A that reads the input directions W already uses cost dense less than 10.6 points?
    "dense-fa-principal": {**FREEZE, "lora.init_a": "principal"},
    "mixed-ng-rolling-fapc-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, "heads.schedule": "rolling", **FREEZE,
                                  "lora.init_a": "principal"},
    # A frozen at the principal directions of its inputs on random tokens (lora.init_a = "input_principal"):
    # bench/frozen_a_subspace.py puts 0.059 of dense's trained update in its row space (W's principal: 0.043)
    "mixed-ng-rolling-fain-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, "heads.schedule": "rolling", **FREEZE,
                                  "lora.init_a": "input_principal"},
    # the two frozen-A gains together: W's principal directions (60 rounds: 0.4633 against 0.4317 random) and
    # rank 16 (30 rounds, random A: 0.4437 against rank 8's 0.4252), upload still 5.4x below dense. Screened out:
    # 0.4487 last round, 0.4301 5-round mean at 30 rounds, against rank 8's 0.4543 / 0.4403
    "mixed-ng-rolling-fapc-r16-0.9": {"heads.sparsity": 0.9, **MIXED_NO_GRAD, "heads.schedule": "rolling", **FREEZE,
                                      "lora.init_a": "principal", "lora.rank": 16, "lora.alpha": 32.0},
    # the compute-saving row's survivor (60 rounds, seed 0: 0.4633 against the random frozen A's 0.4317), at 70%
    "mixed-ng-rolling-fapc-0.7": {"heads.sparsity": 0.7, **MIXED_NO_GRAD, "heads.schedule": "rolling", **FREEZE,
                                  "lora.init_a": "principal"},
    # the levers users already have (issue "What a small device should run"), dense heads: fewer local steps
    # (training FLOPs fall with the steps: 8 / 6 = 1.33x, 8 / 5 = 1.6x)
    "dense-steps6": {"federated.local_steps": 6},
    "dense-steps5": {"federated.local_steps": 5},
    # quantised upload with error feedback (federated.upload_bits): upload falls with the bits (+ a float32 scale
    # a group of 64 values)
    "dense-up8": {"federated.upload_bits": 8},
    "dense-up4": {"federated.upload_bits": 4},
    "dense-up2": {"federated.upload_bits": 2},
    # the same uploads deflated (federated.upload_deflate: lossless, so dense-up4-z trains exactly as dense-up4), and
    # rank-4 LoRA (alpha / rank kept at 2) under them: the upload >= 10x budget's candidate
    "dense-up4-z": {"federated.upload_bits": 4, "federated.upload_deflate": True},
    "dense-r4-up4-z": {"lora.rank": 4, "lora.alpha": 8.0, "federated.upload_bits": 4,
                       "federated.upload_deflate": True},
    # 3 bits (seven levels, two a byte) deflated: the values deflate toward their entropy; 9.35x, short of the
    # upload >= 10x budget (a float32 scale a group of 64 and values near-uniform over the levels: about 3.3 bits)
    "dense-up3-z": {"federated.upload_bits": 3, "federated.upload_deflate": True},
    # 2 bits (ternary) deflated: trains exactly as dense-up2, the upload >= 10x budget's protocol row
    "dense-up2-z": {"federated.upload_bits": 2, "federated.upload_deflate": True},
    # LoRA in the top blocks only (lora.layers): the blocks below run without autograd
    # a smaller local batch, same local steps: training FLOPs and activation memory fall with the batch
    # (32 / 16 = 2x, 32 / 8 = 4x), each client still takes 8 optimizer steps
    "dense-b16": {"federated.batch_size": 16},
    "dense-b8": {"federated.batch_size": 8},
    "dense-top3": {"lora.layers": [3, 4, 5]},
    "dense-top4": {"lora.layers": [2, 3, 4, 5]},
    "dense-top5": {"lora.layers": [1, 2, 3, 4, 5]},
    # activation checkpointing: exact (no training needed: tests/test_levers.py), measured by `costs` only
    "dense-ckpt": {"federated.activation_checkpointing": True},
    "dense-sdpa": {"model.attn_implementation": "sdpa"},
    "dense-ckpt-sdpa": {"federated.activation_checkpointing": True, "model.attn_implementation": "sdpa"},
    "dense-top3-ckpt": {"lora.layers": [3, 4, 5], "federated.activation_checkpointing": True},
    "dense-steps5-ckpt": {"federated.local_steps": 5, "federated.activation_checkpointing": True},
    "dense-up2-top4": {"federated.upload_bits": 2, "lora.layers": [2, 3, 4, 5]},
    # the weak device of the mixed federation (bench/heterogeneous.py) on its own, for `budget.py costs`: at most
    # half of dense's peak training memory and of its training FLOPs a round
    "weak-ckpt-steps2": {"federated.activation_checkpointing": True, "federated.local_steps": 2},
    "weak-remove-0.9-ckpt-steps3": {"heads.sparsity": 0.9, "federated.activation_checkpointing": True,
                                    "federated.local_steps": 3},
    "weak-remove-0.9-steps4": {"heads.sparsity": 0.9, "federated.local_steps": 4},
    # batches of 16 run as two micro-batches of 8 (federated.micro_batch_size): dense-b16's steps, at most its FLOPs
    # (each micro-batch padded to its own longest), the activations of a batch of 8
    "dense-b16-m8": {"federated.batch_size": 16, "federated.micro_batch_size": 8},
    # dense's batches of 32 as four micro-batches of 8: dense's gradient (up to dropout draws), a quarter of its
    # activations, no more FLOPs (activation checkpointing's alternative for a device short of compute too)
    "dense-m8": {"federated.micro_batch_size": 8},
    # the mixed federation (bench/heterogeneous.py): clients c % 4 == 0 capable (5 of 20), the rest weak
    "mixfed-capable-only": {"federated.tier_selectable": [True, False, False, False]},
    "mixfed-weak-heads": {"heads.tiers": [0.0, 0.9, 0.9, 0.9], "federated.activation_checkpointing":
                          [False, True, True, True], "federated.tier_local_steps": [8, 3, 3, 3]},
    "mixfed-weak-ckpt": {"federated.activation_checkpointing": [False, True, True, True],
                         "federated.tier_local_steps": [8, 2, 2, 2]},
    # weak devices take the capable ones' 8 steps on batches of 8 (dense-b8): a quarter of the FLOPs and activations
    "mixfed-weak-b8": {"federated.tier_batch_size": [32, 8, 8, 8]},
    # weak devices take 8 steps on batches of 16, each run as two micro-batches of 8 (dense-b16-m8): half the FLOPs,
    # a quarter of the activations
    "mixfed-weak-b16m8": {"federated.tier_batch_size": [32, 16, 16, 16], "federated.micro_batch_size": [32, 8, 8, 8]},
    "sparse-rolling-0.9-up4": {"heads.sparsity": 0.9, **SPARSE, "heads.schedule": "rolling",
                               "federated.upload_bits": 4},
}
