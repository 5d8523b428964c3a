"""The levers a small device has besides head pruning (issue "What a small device should run"): LoRA in some blocks
only, activation checkpointing, quantised upload with error feedback, and per-tier local steps; each on the tiny
BERT (2 blocks, 4 heads) with real data."""

from __future__ import annotations

import copy
import gc
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from transformers import T5ForConditionalGeneration

from fedhead.config import ConfigError, load_config
from fedhead.data.batching import collate
from fedhead.data.tasks import load_task_data
from fedhead.federated.accounting import count_flops
from fedhead.federated.client import ClientOptions, client_update
from fedhead.federated.compression import GROUP, compress, dequantize, levels, pack_bits, quantize, unpack_bits
from fedhead.federated.payload import (
    DEFLATED,
    MAX_INFLATION,
    decode_state,
    decode_update,
    encode_state,
    encode_update,
    update_size_limit,
)
from fedhead.federated.selection import ClientStats
from fedhead.federated.server import materialize
from fedhead.federated.state import trainable_state
from fedhead.federated.validation import receive_update
from fedhead.models.head_map import UnsupportedModelError, head_map_for
from fedhead.models.loading import build_model, enable_activation_checkpointing_, load_tokenizer
from fedhead.models.slicing import gather_kept, prune_heads_
from fedhead.run_dir import RESIDUALS
from fedhead.runners.local import Simulation, run_round, run_simulation
from tests.conftest import read_metrics, strip_timings, tiny_config


def _setup(tiny_bert_dir, tmp_path, **sections):
    cfg = tiny_config(tiny_bert_dir, tmp_path, **sections)
    tokenizer = load_tokenizer(cfg)
    data = load_task_data(cfg, tokenizer)
    return cfg, build_model(cfg, data.num_labels, tokenizer), data


def _batch(data, lm, n=8):
    return collate(data.train[:n], lm.tokenizer)


# ------------------------------------------------------------------------------------ LoRA in some blocks


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_in_the_top_block_only_leaves_the_blocks_below_out_of_autograd(tiny_bert_dir, tmp_path, checkpointing):
    cfg, lm, data = _setup(tiny_bert_dir, tmp_path, lora={"layers": [1]})
    _, full, _ = _setup(tiny_bert_dir, tmp_path)
    if checkpointing:  # transformers' input-embedding hook for reentrant checkpointing must not pull block 0 in
        enable_activation_checkpointing_(lm.model)
        enable_activation_checkpointing_(full.model)
    trainable = [n for n, p in lm.model.named_parameters() if p.requires_grad]
    assert any(".layer.1." in n for n in trainable) and not any(".layer.0." in n for n in trainable)
    assert all(b == 1 for b, _ in lm.layout.sliced.values()) and lm.layout.sliced
    outputs = {}
    block0 = lm.model.base_model.model.backbone.encoder.layer[0]
    block0.register_forward_hook(lambda _, __, out: outputs.setdefault("block0", out))
    batch = _batch(data, lm)

    def step_flops(model):
        model.train()
        with count_flops() as forward:
            loss = model(**batch).loss
        with count_flops() as backward:
            loss.backward()
        return forward[0], backward[0]

    fwd, bwd = step_flops(lm.model)
    fwd_full, bwd_full = step_flops(full.model)
    out = outputs["block0"][0] if isinstance(outputs["block0"], tuple) else outputs["block0"]
    assert not out.requires_grad  # no graph below the lowest adapted block: no backward, no saved activations
    assert fwd < fwd_full and bwd < bwd_full  # block 0 has no LoRA to compute or differentiate
    # the backward skips block 0 entirely: what it saves is at least one block's backward
    assert bwd_full - bwd >= (bwd_full - fwd_full) / 4


def test_lora_layers_outside_the_model_is_refused_naming_the_option(tiny_bert_dir, tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"lora\.layers: block 2 does not exist; this model has 2"):
        _setup(tiny_bert_dir, tmp_path, lora={"layers": [1, 2]})
    with pytest.raises(ConfigError, match="lora.layers repeats a block"):
        load_config(None, {"lora.layers": [1, 1]})


def test_feed_forward_targets_follow_the_adapted_layers(tiny_t5_dir, tmp_path):
    head_map = head_map_for(T5ForConditionalGeneration.from_pretrained(tiny_t5_dir))
    names = [b.name for b in head_map.blocks]
    last_decoder = [i for i, n in enumerate(names) if n.startswith("dec1.")]
    regex = head_map.lora_target_regex(["query", "feed_forward"], blocks=last_decoder)
    assert "decoder\\.block\\.1\\.layer\\.2\\.DenseReluDense" in regex and "encoder" not in regex
    assert "decoder\\.block\\.0\\." not in regex


# ------------------------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize("prune", [False, True])
def test_a_checkpointed_step_has_the_plain_steps_gradients(tiny_bert_dir, tmp_path, prune):
    cfg, lm, data = _setup(tiny_bert_dir, tmp_path)
    batch = _batch(data, lm)
    plain, checkpointed = copy.deepcopy(lm.model), copy.deepcopy(lm.model)
    if prune:  # head slicing and checkpointing together: one head of each block removed
        kept = torch.tensor([[True, False, True, True], [False, True, True, True]])
        for model in (plain, checkpointed):
            prune_heads_(model, lm.head_map, kept, lm.prefix)
    layers = enable_activation_checkpointing_(checkpointed)
    assert len(layers) == 2
    grads = []
    for model in (plain, checkpointed):
        model.train()  # dropout on: checkpointing must replay the same dropout masks
        torch.manual_seed(3)
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7), name


def test_checkpointing_saves_memory_costs_flops_and_changes_no_update(tiny_bert_dir, tmp_path):
    cfg, lm, data = _setup(tiny_bert_dir, tmp_path)
    state = trainable_state(lm.model)
    part = data.train.select(range(24))
    plain = client_update(lm, state, part, cfg, 0, 1)
    cfg_ckpt = cfg.model_copy(update={"federated": cfg.federated.model_copy(
        update={"activation_checkpointing": True})})
    ckpt = client_update(lm, state, part, cfg_ckpt, 0, 1)
    # equal gradients (the test above); over several AdamW steps float32 rounding of the recomputed forward can
    # move an element whose gradient is near 0 by up to a step of the learning rate, never more
    lr, steps = cfg.federated.learning_rate, plain.stats["steps"]
    for name in plain.tensors:
        assert bool(((plain.tensors[name] - ckpt.tensors[name]).abs() <= 2 * lr * steps).all()), name
    assert ckpt.stats["steps"] == steps
    assert ckpt.stats["peak_memory_bytes"] < plain.stats["peak_memory_bytes"]
    assert ckpt.stats["train_flops"] > plain.stats["train_flops"]  # the backward recomputes each layer


def test_checkpointed_client_rounds_keep_no_working_copy_alive(tiny_bert_dir, tmp_path):
    """Rules out the leak that killed a 60-round mixed federation (19.7 GB after 22 rounds): measuring the
    recomputed layer ran a forward that was never differentiated under a saved-tensors hook that kept what it
    saved, and each client round left its working copy alive, held by its own graph."""
    # Prepare
    cfg, lm, data = _setup(tiny_bert_dir, tmp_path, federated={"activation_checkpointing": True, "local_steps": 2})
    state, part = trainable_state(lm.model), data.train.select(range(24))

    def live_parameters() -> int:
        gc.collect()
        return sum(isinstance(o, torch.nn.Parameter) for o in gc.get_objects())

    # Execute: three client rounds, counting the parameters alive after each
    alive = []
    for round_ in (1, 2, 3):
        client_update(lm, state, part, cfg, 0, round_)
        alive.append(live_parameters())
    # Assert: a round's working copy is gone once its update is
    assert alive[0] == alive[1] == alive[2], alive


# -------------------------------------------------------------------------------------- quantised upload


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_quantisation_error_is_below_one_step_of_its_group_and_unbiased(bits):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 75) * torch.logspace(-3, 1, 10)[:, None]  # groups of very different magnitudes
    packed, scale = quantize(x, bits, gen)
    assert packed.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert packed.numel() == -(-x.numel() // (8 // bits))  # 3 bits: two a byte, as 4
    assert scale.numel() == -(-x.numel() // GROUP)
    x_hat = dequantize(packed, scale, bits, tuple(x.shape))
    step = scale.repeat_interleave(GROUP)[: x.numel()].reshape(x.shape)
    assert bool(((x_hat - x).abs() < step).all())
    # stochastic rounding: the mean of many draws approaches x (E[x^] = x)
    mean = torch.stack([dequantize(*quantize(x, bits, gen), bits, tuple(x.shape)) for _ in range(400)]).mean(0)
    assert bool(((mean - x).abs() < step / 8).all())
    assert levels(bits) == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_packed_values_round_trip_any_count(bits):
    top = levels(bits)
    for n in (1, 5, 8, 63):
        q = torch.randint(-top, top + 1, (n,), generator=torch.Generator().manual_seed(n)).to(torch.int8)
        packed = pack_bits(q, bits)
        assert packed.numel() == -(-n // (8 // bits)) and torch.equal(unpack_bits(packed, n, bits), q)
    # the wire format: each value stored as q + L + 1 in `bits` bits, the first in the high bits, a short last byte
    # padded with stored zeros (q = 0)
    known = {4: ([-7, 7], [0x1F]), 3: ([-3, 3, 0], [0b001111, 0b100100]),
             2: ([-1, 0, 1, 1, 0], [0b01101111, 0b10101010])}
    values, wire = known[bits]
    assert pack_bits(torch.tensor(values, dtype=torch.int8), bits).tolist() == wire
    # a stored 0 would read as q = -(L + 1), outside the levels: refused
    with pytest.raises(ValueError, match="outside"):
        dequantize(torch.zeros(1, dtype=torch.uint8), torch.ones(1), bits, (8 // bits,))


def test_error_feedback_carries_what_rounding_lost_into_the_next_participation(tiny_bert_dir, tmp_path):
    cfg, lm, data = _setup(tiny_bert_dir, tmp_path, federated={"upload_bits": 4, "local_steps": 2, "batch_size": 8},
                           heads={"sparsity": 0.5, "mode": "train_sparse"})
    state = trainable_state(lm.model)
    part = data.train.select(range(24))
    first = client_update(lm, state, part, cfg, 0, 1)
    assert first.quantized is not None and first.residual is not None
    assert first.residual.keys() == state.keys()
    assert all(first.residual[n].shape == state[n].shape for n in state)  # full-shaped: heads not trained keep theirs
    second = client_update(lm, state, part, cfg, 0, 2, residual=first.residual)
    # what the client meant to send in round 2 (its trained delta) + what round 1 lost = what it sent + what it keeps
    fresh = client_update(lm, state, part, cfg.model_copy(update={"federated": cfg.federated.model_copy(
        update={"upload_bits": 32})}), 0, 2)
    sent = gather_kept(state, second.kept_heads, lm.layout)
    old = gather_kept(first.residual, second.kept_heads, lm.layout)
    new = gather_kept(second.residual, second.kept_heads, lm.layout)
    for name, value in fresh.tensors.items():
        meant = value - sent[name] + old[name]
        assert torch.allclose(meant, second.tensors[name] + new[name], atol=1e-6), name
        assert not torch.allclose(old[name], torch.zeros_like(old[name]))
    # the server reads received + delta: the trained values up to the rounding the residual keeps
    values = materialize(decode_update(encode_update(second)), state, lm.layout)
    for name, value in fresh.tensors.items():
        assert torch.allclose(values.tensors[name], value + old[name] - new[name], atol=1e-6), name


def test_quantised_upload_is_smaller_and_a_bad_one_is_refused(tiny_bert_dir, tmp_path):
    cfg, lm, data = _setup(tiny_bert_dir, tmp_path, federated={"local_steps": 1, "batch_size": 8})
    state = trainable_state(lm.model)
    part = data.train.select(range(16))
    sizes = {}
    for bits in (32, 8, 4):
        c = cfg.model_copy(update={"federated": cfg.federated.model_copy(update={"upload_bits": bits})})
        update = client_update(lm, state, part, c, 0, 1)
        blob = encode_update(update)
        sizes[bits] = len(blob)
        decoded = decode_update(blob)
        assert decoded.upload_bits == bits and decoded.tensors.keys() == update.tensors.keys()
    assert sizes[32] > sizes[8] > sizes[4]
    # what travels: one int8 (8 bits) or half a byte (4 bits) a value, and a float32 scale a group of GROUP
    values = sum(t.numel() for t in update.tensors.values())
    scales = sum(-(-t.numel() // GROUP) for t in update.tensors.values())
    assert sum(p.numel() * p.element_size() + s.numel() * 4 for p, s in update.quantized.values()) == \
        sum((t.numel() + 1) // 2 for t in update.tensors.values()) + 4 * scales
    assert values * 4 - sum(p.numel() + 4 * s.numel() for p, s in update.quantized.values()) > 3 * values
    wire, _, _ = compress(update.tensors, state, None, update.kept_heads, lm.layout, 4, torch.Generator())
    name = next(iter(wire))
    bad = dict(update.quantized)
    bad[name] = (wire[name][0][:-1], wire[name][1])  # one byte short
    with pytest.raises(ValueError, match="4-bit values"):
        decode_update(encode_update(replace(update, quantized=bad)))


def test_quantised_runs_resume_with_their_residuals(tiny_bert_dir, tmp_path):
    # 4 clients, all in every round: each round after the first adds a residual to every upload
    cfg = tiny_config(tiny_bert_dir, tmp_path, federated={"rounds": 3, "clients_per_round": 4, "upload_bits": 4,
                                                          "local_steps": 1},
                      partition={"num_clients": 4}, data={"train_size": 96, "eval_size": 16})
    run_simulation(cfg, tmp_path / "whole")
    run_simulation(cfg, tmp_path / "r", stop_after=1)
    run_simulation(cfg, tmp_path / "r", resume=True)
    assert strip_timings(read_metrics(tmp_path / "r")) == strip_timings(read_metrics(tmp_path / "whole"))
    # the residuals travel in the checkpoint: without them the resumed rounds would differ
    saved = tmp_path / "r" / "checkpoint.safetensors"
    keys = decode_state(saved.read_bytes()).keys()
    assert {k.split("/")[1] for k in keys if k.startswith(RESIDUALS)} == {str(c) for c in range(4)}


def test_a_deflated_upload_is_the_same_update_in_fewer_bytes_and_a_bomb_is_refused(tiny_bert_dir, tmp_path):
    cfg, lm, data = _setup(tiny_bert_dir, tmp_path, federated={"local_steps": 1, "batch_size": 8, "upload_bits": 4})
    update = client_update(lm, trainable_state(lm.model), data.train.select(range(16)), cfg, 0, 1)
    plain, deflated = encode_update(update), encode_update(update, deflate=True)
    assert len(deflated) < 0.9 * len(plain)
    a, b = decode_update(plain), decode_update(deflated)
    assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert (a.client_id, a.num_examples, a.loss_after) == (b.client_id, b.num_examples, b.loss_after)
    # a zlib bomb: 6 KB that would inflate to 6.4 MB, 16 times the limit of 64 times what arrived
    bomb = DEFLATED + zlib.compress(b"\0" * (100 * MAX_INFLATION * 1000), 9)
    assert receive_update(bomb)[0] is None and "inflates beyond" in receive_update(bomb)[1]
    # where the server knows the state it sent, the update may weigh at most twice that + 1 MiB, however it came
    down = len(encode_state(trainable_state(lm.model)))
    assert receive_update(deflated, update_size_limit(down))[0] is not None
    assert "inflates beyond" in receive_update(deflated, len(plain) - 1)[1]
    for broken, reason in ((deflated[:-8], "cut short"), (deflated + b"x", "followed by"),
                           (DEFLATED + b"not zlib", "broken deflate")):
        assert reason in receive_update(broken)[1]


def test_three_bits_are_refused_undeflated_and_deflate_below_four(tiny_bert_dir, tmp_path):
    with pytest.raises((ConfigError, ValueError), match="upload_deflate"):
        tiny_config(tiny_bert_dir, tmp_path, federated={"upload_bits": 3})
    # three steps: after one, LoRA's A has not moved (B starts at zero) and its zero deltas deflate to nothing
    cfg, lm, data = _setup(tiny_bert_dir, tmp_path, federated={"local_steps": 3, "batch_size": 8,
                                                              "upload_bits": 3, "upload_deflate": True})
    state, part, sizes = trainable_state(lm.model), data.train.select(range(16)), {}
    for bits in (4, 3):
        c = cfg.model_copy(update={"federated": cfg.federated.model_copy(update={"upload_bits": bits})})
        update = client_update(lm, state, part, c, 0, 1)
        sizes[bits] = (len(encode_update(update)), len(encode_update(update, deflate=True)))
        decoded = decode_update(encode_update(update, deflate=True))
        assert decoded.upload_bits == bits and all(torch.equal(decoded.tensors[k], update.tensors[k])
                                                   for k in update.tensors)
    assert sizes[3][0] == sizes[4][0]  # two values a byte either way
    # seven levels deflate further than fifteen: over 15% of the packed values' bytes saved (same header)
    packed_bytes = sum(p.numel() for p, _ in update.quantized.values())
    assert sizes[4][1] - sizes[3][1] > 0.15 * packed_bytes, (sizes, packed_bytes)


def test_deflating_the_upload_changes_only_the_bytes(tiny_bert_dir, tmp_path):
    sections = {"federated": {"rounds": 2, "clients_per_round": 2, "upload_bits": 4, "local_steps": 1},
                "partition": {"num_clients": 2}, "data": {"train_size": 64, "eval_size": 16}}
    run_simulation(tiny_config(tiny_bert_dir, tmp_path, **sections), tmp_path / "plain")
    sections["federated"]["upload_deflate"] = True
    run_simulation(tiny_config(tiny_bert_dir, tmp_path, **sections), tmp_path / "deflated")

    def without_bytes(obj):  # every upload byte count, the round's and each client's, left out
        if isinstance(obj, dict):
            return {k: without_bytes(v) for k, v in obj.items() if "bytes_up" not in k}
        return [without_bytes(v) for v in obj] if isinstance(obj, list) else obj

    plain, deflated = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "deflated")
    assert without_bytes(strip_timings(plain)) == without_bytes(strip_timings(deflated))
    rounds = [(p["bytes_up"], d["bytes_up"]) for p, d in zip(plain, deflated, strict=True) if "bytes_up" in p]
    assert rounds and all(d < p for p, d in rounds)


# ------------------------------------------------------------------------------------ per-tier local steps


def test_tier_local_steps_are_the_optimizer_steps_each_client_takes(tiny_bert_dir, tmp_path):
    cfg, lm, data = _setup(tiny_bert_dir, tmp_path, federated={"tier_local_steps": [3, 1], "batch_size": 4})
    state = trainable_state(lm.model)
    part = data.train.select(range(24))
    steps = []
    hook = register_optimizer_step_post_hook(lambda *_: steps.append(1))
    try:
        counted = []
        for client in (0, 1, 2):
            before = len(steps)
            update = client_update(lm, state, part, cfg, client, 1)
            counted.append((len(steps) - before, update.stats["steps"]))
    finally:
        hook.remove()
    assert counted == [(3, 3), (1, 1), (3, 3)]


def test_tier_batch_size_is_the_batch_each_client_trains_on(tiny_bert_dir, tmp_path):
    # client c trains on batches of tier_batch_size[c % 2] examples, for the same optimizer steps; a smaller batch
    # costs fewer training FLOPs
    cfg, lm, data = _setup(tiny_bert_dir, tmp_path, federated={"tier_batch_size": [4, 1], "local_steps": 2})
    state = trainable_state(lm.model)
    part = data.train.select(range(24))
    batches: list[int] = []
    hook = lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(len(kwargs["input_ids"])) if module.training else None,
        with_kwargs=True)
    try:
        seen, flops = [], []
        for client in (0, 1, 2):
            before = len(batches)
            update = client_update(lm, state, part, cfg, client, 1)
            seen.append(batches[before:])
            flops.append(update.stats["train_flops"])
    finally:
        hook.remove()
    assert seen == [[4, 4], [1, 1], [4, 4]]
    assert flops[1] < min(flops[0], flops[2]) / 2  # (batches are padded to their longest: FLOPs vary by batch)
    with pytest.raises(ConfigError, match="tier_batch_size"):
        tiny_config(tiny_bert_dir, tmp_path, federated={"tier_batch_size": [4, 0]})


def test_a_micro_batched_step_has_the_whole_batchs_gradient_and_keeps_one_micro_batch(tiny_bert_dir, tmp_path):
    # dropout off, so the batch's gradient is one number: the step with micro-batches of 3 (3 + 3 + 2 examples)
    # must reach the optimizer with the gradient of the 8 examples at once, keep a micro-batch's activations
    # and count the same examples' FLOPs
    cfg, lm, data = _setup(tiny_bert_dir, tmp_path, federated={"local_steps": 1, "batch_size": 8})
    for module in lm.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    state = trainable_state(lm.model)
    part = data.train.select(range(8))
    grads, stats, losses = {}, {}, {}

    def keep_gradients(optim, *_):
        grads[len(grads)] = [p.grad.clone() for g in optim.param_groups for p in g["params"] if p.grad is not None]

    hook = register_optimizer_step_pre_hook(keep_gradients)
    try:
        for micro in (None, 3):
            c = cfg.model_copy(update={"federated": cfg.federated.model_copy(update={"micro_batch_size": micro})})
            update = client_update(lm, state, part, c, 0, 1)
            stats[micro], losses[micro] = update.stats, update.train_loss
    finally:
        hook.remove()
    whole, accumulated = grads[0], grads[1]
    assert len(whole) == len(accumulated) > 0 and any(bool(g.abs().sum() > 0) for g in whole)
    for a, b in zip(whole, accumulated, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    assert losses[3] == pytest.approx(losses[None], rel=1e-5)  # the step's loss: the batch's mean
    assert stats[3]["peak_memory_bytes"] < 0.7 * stats[None]["peak_memory_bytes"]
    # the same 8 examples (micro-batches padded to their own longest: at most the whole batch's FLOPs)
    assert 0.5 * stats[None]["train_flops"] < stats[3]["train_flops"] <= stats[None]["train_flops"]
    # per tier: client c uses micro_batch_size[c % len]; one of the whole batch (8) or more is none
    tiers = cfg.model_copy(update={"federated": cfg.federated.model_copy(update={"micro_batch_size": [8, 2]})})
    assert [ClientOptions.from_config(tiers).training_of(c).micro_batch_size for c in (0, 1, 2)] == [None, 2, None]
    with pytest.raises(ConfigError, match="micro_batch_size"):
        tiny_config(tiny_bert_dir, tmp_path, federated={"micro_batch_size": [4, 0]})


def test_micro_batches_are_refused_where_the_loss_averages_over_tokens(tiny_t5_dir, tmp_path):
    with pytest.raises(ConfigError, match="micro_batch_size needs model.task = 'classification'"):
        tiny_config(tiny_t5_dir, tmp_path, model={"task": "seq2seq"}, federated={"micro_batch_size": 4})


def test_simulation_keeps_each_clients_residual(tiny_bert_dir, tmp_path):
    cfg = tiny_config(tiny_bert_dir, tmp_path, federated={"rounds": 1, "upload_bits": 8})
    sim = Simulation.setup(cfg)
    state = trainable_state(sim.lm.model)
    _, metrics = run_round(sim, state, 1, np.random.default_rng(0), ClientStats())
    assert sorted(sim.residuals) == sorted(metrics["selected"])


# ------------------------------------------------------------------------- tiers left out of the federation


def test_a_tier_that_cannot_train_is_never_selected(tiny_bert_dir, tmp_path):
    cfg = tiny_config(tiny_bert_dir, tmp_path, federated={"rounds": 3, "clients_per_round": 3, "local_steps": 1,
                                                          "tier_selectable": [True, False]},
                      data={"train_size": 96, "eval_size": 16})
    run_simulation(cfg, tmp_path / "run")
    picked = {c for m in read_metrics(tmp_path / "run")[1:] for c in m["selected"]}
    assert picked == {0, 2, 4}  # the 3 selectable of 6, every round
    with pytest.raises(ConfigError, match="leaves 3 of partition.num_clients = 6 clients selectable"):
        load_config(None, {"partition.num_clients": 6, "federated.clients_per_round": 4,
                           "federated.tier_selectable": [True, False]})
