"""More promises a plausible wrong implementation would break without any other test noticing (issue "Prove the
promises", point 7 and the end-to-end parts of point 4): each test's docstring names the wrong implementation it
rules out."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

import fedhead.federated.client as client_module
from fedhead.federated.aggregation import aggregate
from fedhead.federated.client import client_update
from fedhead.federated.payload import ClientUpdate
from fedhead.federated.state import trainable_state
from fedhead.heads.importance import score_heads
from fedhead.metrics import score_generations
from fedhead.models import build_model
from fedhead.models.head_map import HeadLayout
from fedhead.models.slicing import gather_kept
from fedhead.report import write_report
from fedhead.runners.local import Simulation, run_simulation
from tests.conftest import ROOT, read_metrics, tiny_config

# ---------------------------------------------------------------------------------------------------------------
# mixed mode end to end


@pytest.fixture
def spy_training(monkeypatch):
    """Record every working model a client trains (after its local steps) with the frozen-row masks it got."""
    seen: list[tuple[torch.nn.Module, dict | None]] = []
    real = client_module.train_local

    def recording(model, data, cfg, tokenizer, generator, frozen_rows=None, checkpointed=None):
        result = real(model, data, cfg, tokenizer, generator, frozen_rows, checkpointed)
        seen.append((model, frozen_rows))
        return result

    monkeypatch.setattr(client_module, "train_local", recording)
    return seen


def test_mixed_mode_freezes_computed_heads_and_sends_only_kept_ones(tiny_bert_dir, tmp_path, spy_training):
    """heads.mode = 'mixed', one client round each for two clients, then FedAvg. Rules out frozen heads that
    drift through the shared AdamW step (its weight decay shrinks every entry of a parameter, gradient or not),
    frozen heads that get trained, removed heads left in the client's graph, and frozen or removed heads' slices
    that travel (or reach the global state through aggregation)."""
    # Prepare: 4 heads a block; a client trains 1, computes 1 more frozen and removes 2; every adapter non-zero
    cfg = tiny_config(tiny_bert_dir, tmp_path, lora={"target_modules": ["query", "key", "value", "output"]},
                      heads={"sparsity": 0.75, "mode": "mixed", "compute_sparsity": 0.5},
                      federated={"local_steps": 2, "learning_rate": 0.05, "weight_decay": 0.5})
    sim = Simulation.setup(cfg)
    layout, d = sim.lm.layout, sim.lm.layout.head_dim
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in trainable_state(sim.lm.model).items()}
    # Execute
    updates = [client_update(sim.lm, state, sim.client_data(c), cfg, c, round_=1) for c in range(2)]
    # Assert
    assert {dim for _, dim in layout.sliced.values()} == {0, 1}  # q/k/v LoRA B rows and o LoRA A columns
    for (work, frozen_rows), update in zip(spy_training, updates, strict=True):
        assert update.kept_heads.sum(1).tolist() == [1, 1]
        trained = {n: p.detach() for n, p in work.named_parameters() if p.requires_grad}
        for name, (block, dim) in layout.sliced.items():
            assert trained[name].shape[dim] == 2 * d, name  # the removed heads are not in the client's graph
            per_index = frozen_rows[name][0].sum(1 - dim)  # > 0 where the entry belongs to a trained head
            kept_part = trained[name].index_select(dim, (per_index > 0).nonzero().flatten())
            frozen_part = trained[name].index_select(dim, (per_index == 0).nonzero().flatten())
            kept = update.kept_heads
            assert torch.equal(update.tensors[name], kept_part), name  # what travels: the trained head only
            assert not torch.equal(kept_part, state[name].index_select(dim, layout.index_of(name, kept))), name
            others = [h for h in range(4) if not kept[block, h]]
            assert any(torch.equal(frozen_part, state[name].index_select(dim, torch.arange(h * d, (h + 1) * d)))
                       for h in others), f"{name}: the frozen head's slice moved"
        assert update.stats["sparsity"] == 0.75
    kept_by_someone = torch.stack([u.kept_heads for u in updates]).any(0)
    assert not kept_by_someone.all()
    new_state = aggregate(state, updates, layout, "fedavg")
    for name, (_, dim) in layout.sliced.items():
        untouched = layout.index_of(name, ~kept_by_someone)
        assert torch.equal(new_state[name].index_select(dim, untouched), state[name].index_select(dim, untouched))


# ---------------------------------------------------------------------------------------------------------------
# freeze_a: the frozen LoRA A rebuilt in another process

_BUILD_A = """
import json, sys
import torch
from safetensors.torch import save_file
from fedhead.config import config_from_dict
from fedhead.models import build_model
torch.set_num_threads(1)
lm = build_model(config_from_dict(json.loads(sys.argv[1])), 3)
save_file({n: p.detach().contiguous() for n, p in lm.model.named_parameters() if ".lora_A." in n}, sys.argv[2])
"""


def test_freeze_a_rebuilds_the_same_a_in_another_process(tiny_bert_dir, tmp_path):
    """A Flower node never receives A under freeze_a: it rebuilds it from the config. Rules out an A drawn from
    whatever state the process's random generator is in (the server has loaded data and drawn partitions
    before building its model, a node has not), from Python's per-process salted hash() or the OS entropy,
    and an A frozen at zero (B would then get no gradient): the A of a fresh process with another hash seed and
    thread count equals this process's bit for bit."""
    cfg = tiny_config(tiny_bert_dir, tmp_path, lora={"freeze_a": True, "target_modules": ["query", "value", "output"]})
    torch.manual_seed(12345)
    torch.rand(1000)  # this process's generator is somewhere else than a fresh one's
    lm = build_model(cfg, 3)
    here = {n: p.detach() for n, p in lm.model.named_parameters() if ".lora_A." in n}
    subprocess.run([sys.executable, "-c", _BUILD_A, cfg.model_dump_json(), str(tmp_path / "a.safetensors")],
                   check=True, cwd=ROOT, env={**__import__("os").environ, "PYTHONHASHSEED": "4242"}, timeout=120)
    there = load_file(tmp_path / "a.safetensors")
    assert len(here) == 6 and here.keys() == there.keys()
    for name, a in here.items():
        assert torch.equal(a, there[name]), name
        assert float(a.abs().sum()) > 0 and not lm.model.get_parameter(name).requires_grad, name
    assert not any(".lora_A." in n for n in trainable_state(lm.model))  # never sent


# ---------------------------------------------------------------------------------------------------------------
# BLEU and chrF with several references


def test_bleu_and_chrf_with_several_references_equal_sacrebleu():
    """Rules out scoring against the first reference only, transposing references with zip() (which truncates
    every example to the fewest references), or one reference list per example handed to sacrebleu as if it were
    a reference stream: each score equals sacrebleu's corpus score of reference streams written out by hand."""
    import sacrebleu

    preds = ["the cat sat on the mat today", "a dog barked loudly at the postman", "it is raining in the city"]
    refs = [["a cat was sitting on a mat", "the cat sat on the mat today"],
            ["the dog barked at the postman"],
            ["rain falls on the town", "it rains in town", "it is raining in the city centre"]]
    streams = [  # stream i holds every example's i-th reference (None where it has fewer)
        ["a cat was sitting on a mat", "the dog barked at the postman", "rain falls on the town"],
        ["the cat sat on the mat today", None, "it rains in town"],
        [None, None, "it is raining in the city centre"],
    ]
    got = score_generations(preds, refs, ["bleu", "chrf"])
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score, abs=1e-9)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score, abs=1e-9)
    first_only = [[r[0] for r in refs]]
    assert got["bleu"] > sacrebleu.corpus_bleu(preds, first_only).score + 10  # the later references count
    assert got["chrf"] > sacrebleu.corpus_chrf(preds, first_only).score + 10
    shuffled = [list(reversed(r)) for r in refs]  # the order of an example's references does not matter
    assert score_generations(preds, shuffled, ["bleu", "chrf"]) == pytest.approx(got, abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# eval_every > 1 in the run summary and the report


def test_eval_every_summary_and_report_use_evaluated_rounds_only(tiny_bert_dir, tmp_path):
    """federated.eval_every = 2 over 3 rounds evaluates rounds 2 and 3 (the last). Rules out a summary or report
    that counts round 1 (which has no metric) as 0 or carries round 0's value forward into it: the headline
    final, best and tail mean use the evaluated rounds only."""
    cfg = tiny_config(tiny_bert_dir, tmp_path, federated={"rounds": 3, "eval_every": 2, "clients_per_round": 1,
                                                          "local_steps": 2, "learning_rate": 0.02})
    summary = run_simulation(cfg, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert [("accuracy" in m) for m in metrics] == [True, False, True, True]
    r0, r2, r3 = (metrics[i]["accuracy"] for i in (0, 2, 3))
    tail = (r2 + r3) / 2
    assert r0 != pytest.approx(tail) and 0 not in (r2, r3)  # a stale or zero round 1 would move the mean
    assert summary["tail_mean_score"] == pytest.approx(tail) and summary["final_score"] == r3
    assert summary["best_score"] == max(r0, r2, r3) and summary["rounds"] == 3
    write_report([tmp_path / "run"], tmp_path / "report")
    row = json.loads((tmp_path / "report" / "summary.json").read_text())["rows"][0]
    assert row["tail_mean"] == pytest.approx(tail) and row["final"] == r3 and row["best"] == max(r2, r3)


# ---------------------------------------------------------------------------------------------------------------
# pooling


def test_mean_pooling_ignores_padding(tiny_lora):
    """Rules out a mean over every position (padding included) or over the padded length: each example of a
    padded batch gets the logits it gets alone, unpadded."""
    lm, _ = tiny_lora
    model = copy.deepcopy(lm.model).eval()
    assert model.base_model.model.pooling == "mean"
    pairs = [("the cat sat on the mat near the door", "a cat is sitting"), ("hi", "yes"), ("no", "maybe so")]
    batch = lm.tokenizer([p for p, _ in pairs], [h for _, h in pairs], padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        together = model(**batch).logits  # (3, C)
        for i, (p, h) in enumerate(pairs):
            alone = model(**lm.tokenizer([p], [h], return_tensors="pt")).logits  # (1, C)
            assert torch.allclose(together[i], alone[0], atol=1e-5), i


@pytest.mark.parametrize("train_pooler", [True, False])
def test_cls_pooler_trains_and_travels_only_with_train_pooler(tiny_bert_dir, tmp_path, spy_training,
                                                             train_pooler):
    """model.pooling = 'cls' feeds the checkpoint's pooler to the classifier. Rules out a train_pooler that does
    not make the pooler trainable (or trains it but leaves it out of the update, so the server never sees it)
    and a pooler that trains although train_pooler is off."""
    cfg = tiny_config(tiny_bert_dir, tmp_path, model={"pooling": "cls", "train_pooler": train_pooler},
                      federated={"local_steps": 2, "learning_rate": 0.05})
    sim = Simulation.setup(cfg)
    state = trainable_state(sim.lm.model)
    pooler_before = {n: p.detach().clone() for n, p in sim.lm.model.named_parameters()
                     if "pooler" in n and "original_module" not in n}
    assert len(pooler_before) == 2  # dense.weight and dense.bias (the copy peft trains, when it does)
    with torch.no_grad():  # the classifier reads the pooler: changing it changes the logits
        batch = sim.lm.tokenizer(["a premise"], ["a hypothesis"], return_tensors="pt")
        probe = copy.deepcopy(sim.lm.model).eval()
        before = probe(**batch).logits
        next(p for n, p in probe.named_parameters() if n in pooler_before and n.endswith("weight")).mul_(2)
        assert not torch.allclose(probe(**batch).logits, before)
    update = client_update(sim.lm, state, sim.client_data(0), cfg, 0, round_=1)
    (work, _), = spy_training
    pooler_after = {n: p.detach() for n, p in work.named_parameters() if n in pooler_before}
    sent = {n for n in update.tensors if "pooler" in n}
    if train_pooler:
        assert sent == set(pooler_before)
        assert all(not torch.equal(update.tensors[n], pooler_before[n]) for n in sent)
        assert all(torch.equal(update.tensors[n], pooler_after[n]) for n in sent)
        new = aggregate(state, [update], sim.lm.layout, "fedavg")
        assert all(torch.equal(new[n], update.tensors[n]) for n in sent)
    else:
        assert not sent and all(torch.equal(pooler_after[n], pooler_before[n]) for n in pooler_before)


# ---------------------------------------------------------------------------------------------------------------
# local_epochs


@pytest.mark.parametrize("local_steps,local_epochs", [(None, 2), (3, 2)])
def test_local_epochs_make_passes_over_the_data(tiny_bert_dir, tmp_path, local_steps, local_epochs):
    """federated.local_steps wins when set; with local_steps = None a client makes local_epochs passes over its
    data. Rules out epochs read as steps, a floor(n / batch) step count that skips each pass's last partial
    batch, and local_epochs applied on top of local_steps: the optimizer's own step count and the examples fed
    to the model in training are what the config implies."""
    cfg = tiny_config(tiny_bert_dir, tmp_path, data={"train_size": 40}, partition={"num_clients": 4},
                      federated={"local_steps": local_steps, "local_epochs": local_epochs, "batch_size": 4})
    sim = Simulation.setup(cfg)
    client = next(c for c in range(4) if len(sim.parts[c]) % 4 != 0)  # a pass ends with a partial batch
    n = len(sim.parts[client])
    steps, fed = [], []
    hooks = [
        register_optimizer_step_post_hook(lambda *_: steps.append(1)),
        torch.nn.modules.module.register_module_forward_hook(
            lambda m, args, out: fed.append(len(args[0])) if type(m) is torch.nn.Linear and m.training
            and m.out_features == 3 else None),  # the classifier of a model in training mode
    ]
    try:
        update = client_update(sim.lm, trainable_state(sim.lm.model), sim.client_data(client), cfg, client, 1)
    finally:
        for h in hooks:
            h.remove()
    one_pass = [min(4, n - i) for i in range(0, n, 4)]  # batch sizes of a pass, the last one partial
    expected = one_pass * local_epochs if local_steps is None else (one_pass * local_steps)[:local_steps]
    assert len(steps) == len(expected) == update.stats["steps"]
    assert fed == expected


# ---------------------------------------------------------------------------------------------------------------
# robust aggregation with partial head masks

# 2 blocks of 2 heads, head_dim 2: "qb" is split by block 0's heads along rows, "oa" by block 1's along columns
ROBUST_LAYOUT = HeadLayout(num_blocks=2, num_heads=2, head_dim=2, sliced={"qb": (0, 0), "oa": (1, 1)})
ROBUST_GLOBAL = {"qb": torch.arange(8.0).view(4, 2), "oa": torch.ones(3, 4), "cls": torch.zeros(5)}
ROBUST_MASKS = [  # kept by: block 0 head 0 all 6, head 1 three; block 1 head 0 four, head 1 two (too few)
    [[1, 1], [1, 1]], [[1, 0], [1, 0]], [[1, 1], [0, 1]], [[1, 0], [1, 0]], [[1, 1], [1, 0]], [[1, 0], [0, 0]]]


def _robust_by_hand(fulls, masks, method: str, trim: float) -> dict[str, torch.Tensor]:
    """Per element, over the clients that kept the element's head: the lower median, or the mean after cutting
    max(1, floor(n * trim)) values at each end; fewer than 3 values keep the global value."""
    out = {}
    for name, previous in ROBUST_GLOBAL.items():
        value = previous.clone().double()
        for index in np.ndindex(*previous.shape):
            if name in ROBUST_LAYOUT.sliced:
                block, dim = ROBUST_LAYOUT.sliced[name]
                head = index[dim] // ROBUST_LAYOUT.head_dim
                voters = [c for c, m in enumerate(masks) if m[block][head]]
            else:
                voters = list(range(len(masks)))
            xs = sorted(float(fulls[c][name][index]) for c in voters)
            n = len(xs)
            if n < 3:
                continue
            if method == "median":
                value[index] = xs[(n - 1) // 2]
            else:
                cut = max(1, math.floor(n * trim))
                value[index] = sum(xs[cut : n - cut]) / (n - 2 * cut)
        out[name] = value.float()
    return out


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_aggregation_per_element_with_partial_masks(method):
    """Distinct honest values and partial head masks. Rules out counting a client that did not keep a head
    (with the global value or a zero in its place), a trim computed from the number of clients instead of the
    values present, a median or trim over fewer than 3 values, and a robust statistic applied to whole tensors
    instead of per element: every element equals the hand computation over the clients that trained its head."""
    g = torch.Generator().manual_seed(0)
    fulls = [{k: v + torch.randn(v.shape, generator=g) for k, v in ROBUST_GLOBAL.items()} for _ in ROBUST_MASKS]
    updates = []
    for c, (full, mask) in enumerate(zip(fulls, ROBUST_MASKS, strict=True)):
        kept = torch.tensor(mask, dtype=torch.bool)
        updates.append(ClientUpdate(c, 10 + c, kept, torch.full((2, 2), 0.5), gather_kept(full, kept, ROBUST_LAYOUT),
                                    1.0, 0.9, 0.9))
    got = aggregate(ROBUST_GLOBAL, updates, ROBUST_LAYOUT, method, trim_fraction=0.34)
    expected = _robust_by_hand(fulls, ROBUST_MASKS, method, 0.34)
    for name in ROBUST_GLOBAL:
        assert torch.allclose(got[name], expected[name], atol=1e-6), name
    assert torch.equal(got["oa"][:, 2:], ROBUST_GLOBAL["oa"][:, 2:])  # block 1 head 1: two values, unchanged


# ---------------------------------------------------------------------------------------------------------------
# gradient importance


def test_gradient_importance_equals_grad_times_context(tiny_lora):
    """heads.importance = 'gradient' (Michel et al. 2019): per batch |dL/dg_h| for a gate g_h on head h's
    context, summed over batches and divided by the largest. Computed here without gates: dL/dg_h at g = 1 is
    the sum over tokens and head dimensions of dL/dcontext * context at the output projection's input. Rules out
    the signed gradient, the absolute value of the summed gradient (|sum| instead of sum of ||), a gate at the
    wrong place, and a per-block scaling."""
    lm, _ = tiny_lora
    model = copy.deepcopy(lm.model).eval()
    texts = [(["the cat sat on the mat", "hi there"], ["a dog", "yes it is"], [0, 2]),
             (["rain in the city", "no"], ["it rains", "maybe not at all"], [1, 1])]
    batches = []
    for premises, hypotheses, labels in texts:
        batch = dict(lm.tokenizer(premises, hypotheses, padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor(labels)
        batches.append(batch)
    scores, _ = score_heads(model, lm.head_map, batches, "gradient", special_ids=[], prefix=lm.prefix)
    H, d = lm.head_map.num_heads, lm.head_map.head_dim
    total = torch.zeros(lm.head_map.num_blocks, H)
    contexts: list[torch.Tensor] = []

    def keep(_module, args):
        args[0].retain_grad()
        contexts.append(args[0])  # (B, T, H * d)

    handles = [model.get_submodule(lm.prefix + block.projections["output"]).register_forward_pre_hook(keep)
               for block in lm.head_map.blocks]
    signed = torch.zeros_like(total)
    for batch in batches:
        contexts.clear()
        model.zero_grad()
        model(**batch).loss.backward()
        # dL/dg_h = sum over batch, tokens and the head's dimensions of dL/dcontext * context: (blocks, H)
        per_head = torch.stack([(c.grad * c.detach()).unflatten(-1, (H, d)).sum((0, 1, 3)) for c in contexts])
        total += per_head.abs()
        signed += per_head
    for h in handles:
        h.remove()
    expected = total / total.max()
    assert torch.allclose(scores, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(scores, signed.abs() / signed.abs().max(), rtol=1e-3)  # the batches disagree in sign


# ---------------------------------------------------------------------------------------------------------------
# beam search


def test_beam_search_reaches_generate(tmp_path):
    """generation.num_beams > 1 on a tiny random T5 (the real t5-small tokenizer). Rules out a num_beams that
    never reaches generate (greedy whatever the config says) or beams whose extra hypotheses end up in the
    decoded texts: the evaluation's texts equal transformers' own generate(num_beams=4) decoded, and differ from
    greedy decoding on this model."""
    import datasets
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from fedhead.config import GenerationSection, config_from_dict
    from fedhead.federated.evaluation import generate_texts

    tokenizer = AutoTokenizer.from_pretrained(ROOT.parent / "shared/models/t5-small-tokenizer")
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=32128, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                                        num_decoder_layers=2, decoder_start_token_id=0, pad_token_id=0,
                                        eos_token_id=1)).save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    lm = build_model(config_from_dict({"model": {"name": str(tmp_path / "t5"), "task": "seq2seq"},
                                       "partition": {"method": "iid"}, "out": str(tmp_path)}))
    texts = ["name[The Eagle], eatType[coffee shop], food[French]", "name[Alimentum], area[city centre]",
             "translate English to German: The house is wonderful.", "hello"]
    data = datasets.Dataset.from_dict(dict(tokenizer(texts)))
    hf = lm.model.get_base_model().eval()

    def direct(num_beams: int) -> list[str]:
        out = []
        for i in range(0, len(texts), 2):  # the evaluation's batches: 2 inputs, right-padded
            batch = tokenizer(texts[i : i + 2], padding=True, return_tensors="pt")
            ids = hf.generate(**batch, num_beams=num_beams, max_new_tokens=8, do_sample=False)
            out += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return out

    beams = generate_texts(lm.model, data, tokenizer, 2, "seq2seq", GenerationSection(num_beams=4, max_new_tokens=8))
    greedy = generate_texts(lm.model, data, tokenizer, 2, "seq2seq", GenerationSection(num_beams=1, max_new_tokens=8))
    with torch.no_grad():
        assert beams == direct(4) and greedy == direct(1)
    assert beams != greedy
