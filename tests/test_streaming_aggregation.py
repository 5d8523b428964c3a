"""The streaming server aggregation (running float64 sums, robust methods by chunks) equals the aggregation it
replaced (tests/aggregation_reference.py, which stacked every client's full-size copy) within float64 rounding,
and its memory does not grow with the number of clients."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedhead.federated.aggregation import aggregate, robust_aggregate
from fedhead.federated.payload import ClientUpdate
from fedhead.federated.privacy import dp_aggregate
from fedhead.models.head_map import HeadLayout
from fedhead.models.slicing import gather_kept
from tests import aggregation_reference as reference
from tests.conftest import ROOT

# 2 blocks of 4 heads (head_dim 3), LoRA rank 5: q B (rows by head), grouped k B (2 query heads a unit), o A
# (columns by head), a shared q A and a task head
LAYOUT = HeadLayout(2, 4, 3, sliced={"q0": (0, 0), "k0": (0, 0), "o1": (1, 1), "q1": (1, 0)}, groups={"k0": 2})
SHAPES = {"q0": (12, 5), "k0": (6, 5), "o1": (5, 12), "q1": (12, 5), "qa0": (5, 7), "cls": (3,)}


def random_round(seed, clients=9, dtype=torch.float64):
    """A global state and `clients` updates: random kept heads (some heads kept by nobody, some by one client),
    random scores with some exact zeros (block 1 head 3: zero for everyone, the data-size fallback), sizes 1-50."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in SHAPES.items()}
    updates = []
    for c in range(clients):
        kept = torch.rand(2, 4, generator=g) < 0.5
        kept[0, 0] = False  # kept by nobody: keeps its value
        kept[1, 1] = c == 3  # kept by one client
        scores = torch.rand(2, 4, generator=g) * (torch.rand(2, 4, generator=g) < 0.7)
        scores[1, 3] = 0.0
        full = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in SHAPES.items()}
        size = int(torch.randint(1, 50, (1,), generator=g))
        updates.append(ClientUpdate(c, size, kept, scores, gather_kept(full, kept, LAYOUT), 0.0, 0.0, 0.0))
    return state, updates


def assert_close(new, old):
    assert new.keys() == old.keys()
    for k in old:
        assert new[k].dtype == old[k].dtype, k
        torch.testing.assert_close(new[k], old[k], rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("method, weighting", [("fedavg", "product"), ("head_weighted", "data_size"),
                                               ("head_weighted", "importance"), ("head_weighted", "product"),
                                               ("median", "product"), ("trimmed_mean", "product")])
def test_streaming_aggregation_equals_the_stacked_one(method, weighting):
    for seed in range(4):
        # Prepare
        state, updates = random_round(seed)
        # Execute: the updates as a generator, read once
        new = aggregate(state, (u for u in updates), LAYOUT, method, weighting, trim_fraction=0.25)
        # Assert
        assert_close(new, reference.aggregate(state, updates, LAYOUT, method, weighting, trim_fraction=0.25))


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_aggregation_by_chunks_of_one_column_equals_the_whole(method):
    state, updates = random_round(5, clients=7)
    new = robust_aggregate(state, updates, LAYOUT, method, 0.2, chunk_bytes=1)  # one column (or element) a chunk
    old = reference.aggregate(state, updates, LAYOUT, method)
    assert_close(new, old)  # the median is bit-exact; the trimmed mean's sum may be ordered differently
    if method == "median":
        assert all(torch.equal(new[k], old[k]) for k in state)


def test_streaming_dp_equals_the_stacked_one_with_the_same_noise():
    for seed in range(3):
        state, updates = random_round(seed)
        for clip in (0.5, 1e9):  # clipped, and not
            new = dp_aggregate(state, iter(updates), LAYOUT, 0.7, clip, torch.Generator().manual_seed(seed))
            old = reference.dp_aggregate(state, updates, LAYOUT, 0.7, clip, torch.Generator().manual_seed(seed))
            assert_close(new, old)


def test_streaming_aggregation_in_float32_within_float32_rounding():
    state, updates = random_round(7, dtype=torch.float32)
    for method in ("fedavg", "head_weighted", "median", "trimmed_mean"):
        new, old = aggregate(state, updates, LAYOUT, method), reference.aggregate(state, updates, LAYOUT, method)
        assert all(torch.allclose(new[k], old[k], rtol=1e-6, atol=1e-6) for k in state), method


_PEAK_MEMORY_OF_AGGREGATION = """
import json, sys, torch
torch.set_num_threads(1)
from fedhead.federated.aggregation import aggregate
from fedhead.federated.payload import ClientUpdate
from fedhead.federated.privacy import dp_aggregate
from fedhead.models.head_map import HeadLayout

BLOCKS, HEADS, HEAD_DIM, RANK, HIDDEN = 12, 12, 64, 64, 768
names = [(b, p) for b in range(BLOCKS) for p in ("query", "value")]
layout = HeadLayout(BLOCKS, HEADS, HEAD_DIM, sliced={f"{b}.{p}.lora_B": (b, 0) for b, p in names})
g = torch.Generator().manual_seed(0)
state = {}
for b, p in names:  # q/v LoRA of rank 64: A (r, hidden) shared, B (hidden, r) split by head
    state[f"{b}.{p}.lora_A"] = torch.randn(RANK, HIDDEN, generator=g) * 0.01
    state[f"{b}.{p}.lora_B"] = torch.randn(HIDDEN, RANK, generator=g) * 0.01  # touched: counted in the baseline

def one_update(c):
    kept = torch.zeros(BLOCKS, HEADS, dtype=torch.bool)
    for b in range(BLOCKS):
        kept[b, torch.randperm(HEADS, generator=g)[:2]] = True
    tensors = {n: torch.randn(v.shape, generator=g) * 0.01 for n, v in state.items() if n.endswith("lora_A")}
    tensors.update({f"{b}.{p}.lora_B": torch.randn(2 * HEAD_DIM, RANK, generator=g) * 0.01 for b, p in names})
    return ClientUpdate(c, 10 + c, kept, torch.rand(BLOCKS, HEADS, generator=g), tensors, 1.0, 1.0, 1.0)

POOL = [one_update(c) for c in range(8)]  # made before the baseline: what is measured is the aggregation's own

def updates(k):  # k updates at 90% head sparsity (2 of 12 heads a block), one at a time, as replies arrive
    for c in range(k):
        u = POOL[c % len(POOL)]
        yield ClientUpdate(c, 10 + c, u.kept_heads, u.head_scores, u.tensors, 1.0, 1.0, 1.0)

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

runs = {"fedavg": lambda u: aggregate(state, u, layout, "fedavg"),
        "head_weighted": lambda u: aggregate(state, u, layout, "head_weighted", "product"),
        "dp": lambda u: dp_aggregate(state, u, layout, 1.0, 1.0, torch.Generator().manual_seed(0))}
run = runs[sys.argv[2]]
small = ClientUpdate(0, 1, torch.ones(BLOCKS, HEADS, dtype=torch.bool), torch.ones(BLOCKS, HEADS), {}, 1.0, 1.0, 1.0)
aggregate({}, [small], HeadLayout(BLOCKS, HEADS, HEAD_DIM), "head_weighted")  # warm-up on an empty state: first
dp_aggregate({}, [small], HeadLayout(BLOCKS, HEADS, HEAD_DIM), 1.0, 1.0, torch.Generator())  # uses, no buffers
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts at the current size
before = kib("VmRSS")
new = run(updates(int(sys.argv[1])))
grown = (kib("VmHWM") - before) * 1024
state_bytes = sum(t.numel() * t.element_size() for t in state.values())
print(json.dumps({"grown": grown, "state_bytes": state_bytes}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak memory through Linux's /proc")
def test_aggregating_200_updates_raises_peak_memory_by_at_most_4x_the_state():
    """K = 200 updates at 90% head sparsity of a 12-block, rank-64 q/v adapter (9 MiB of state): fedavg,
    head_weighted and DP, each fed a generator of updates, raise the peak resident memory of a fresh process by at
    most 4x the state (the stacked aggregation raised it by 127x). Each update is let go once folded."""
    for method in ("fedavg", "head_weighted", "dp"):  # a fresh process each: none inherits another's freed pages
        done = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_OF_AGGREGATION, "200", method], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        state = result["state_bytes"]
        assert state == 9 * 2**20
        assert result["grown"] <= 4 * state, f"{method}: peak memory grew {result['grown'] / state:.1f}x the state"
