"""Head-wise LoRA (`lora.head_rank`): each head's own adapter, both factors split by head.

What could break: the compact factors computing something other than the block-diagonal standard LoRA they
stand for; a head's adapter reaching another head; physical pruning slicing one factor and not the other (the
pruned model would then differ from the gated whole model, or crash); the layout's unit sizes (r_h rows of A
against head_dim rows of B) disagreeing with the tensors; and the reason the adapter exists: with a trained A,
standard LoRA's sparse_backward drifts from the whole model after a step, head-wise LoRA does not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from fedhead.config import ConfigError, config_from_dict
from fedhead.federated.client import client_update
from fedhead.federated.state import load_state_, trainable_state
from fedhead.models import build_model
from fedhead.models.headwise import HeadwiseDown, HeadwiseUp, is_headwise, standard_lora_
from fedhead.models.loading import build_backbone_classifier
from fedhead.models.slicing import attach_frozen_heads, gather_kept, prune_heads_, scatter_kept
from fedhead.runners.local import Simulation
from tests.conftest import pruned_and_gated_backward, tiny_config

ROLES = ["query", "key", "value", "output"]
KEPT = torch.tensor([[True, False, True, False], [False, True, False, False]])  # tiny BERT: 2 blocks x 4 heads


def _headwise(tiny_bert_dir, tmp_path, head_rank: int = 2, **lora):
    cfg = tiny_config(tiny_bert_dir, tmp_path, lora={"target_modules": ROLES, "head_rank": head_rank, **lora})
    lm = build_model(cfg, 3)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:  # B starts at zero: draw it so every adapter acts
                p.normal_(0, 0.1)
    batch = dict(lm.tokenizer(["the cat sat on the mat", "hi"], ["a dog", "yes it is"], padding=True,
                              return_tensors="pt"))
    batch["labels"] = torch.tensor([0, 2])
    return cfg, lm, batch


@pytest.fixture(scope="module")
def hw(tiny_bert_dir, tmp_path_factory):
    return _headwise(tiny_bert_dir, tmp_path_factory.mktemp("headwise"))


def test_factors_are_split_by_head_with_their_own_unit_sizes(hw):
    _, lm, _ = hw
    params = dict(lm.model.named_parameters())
    r_h, d, heads = 2, lm.head_map.head_dim, lm.head_map.num_heads
    for role in ROLES:
        path = lm.prefix + lm.head_map.blocks[0].projections[role]
        a, b = f"{path}.lora_A.default.weight", f"{path}.lora_B.default.weight"
        if role == "output":
            assert tuple(params[a].shape) == (r_h, heads * d) and tuple(params[b].shape) == (32, heads * r_h)
            assert lm.layout.sliced[a] == (0, 1) and lm.layout.sliced[b] == (0, 1)
            assert (lm.layout.unit_of(a), lm.layout.unit_of(b)) == (d, r_h)
        else:
            assert tuple(params[a].shape) == (heads * r_h, 32) and tuple(params[b].shape) == (heads * d, r_h)
            assert lm.layout.sliced[a] == (0, 0) and lm.layout.sliced[b] == (0, 0)
            assert (lm.layout.unit_of(a), lm.layout.unit_of(b)) == (r_h, d)
    sliced = gather_kept(trainable_state(lm.model), KEPT, lm.layout)
    q = lm.prefix + lm.head_map.blocks[0].projections["query"]
    assert sliced[f"{q}.lora_A.default.weight"].shape[0] == 2 * r_h  # 2 kept heads' A rows, no shared A
    assert sliced[f"{q}.lora_B.default.weight"].shape[0] == 2 * d


def test_compact_factors_equal_the_block_diagonal_standard_lora(hw, tmp_path):
    """The forward, peft's merge and a saved-and-reloaded peft adapter all give the head-wise model's logits."""
    cfg, lm, batch = hw
    model = copy.deepcopy(lm.model).eval()
    with torch.no_grad():
        ref = model(**batch).logits
        standard = copy.deepcopy(model)
        standard_lora_(standard)
        assert is_headwise(model) and not is_headwise(standard)
        assert torch.allclose(standard(**batch).logits, ref, atol=1e-6)
        merged = copy.deepcopy(standard).merge_and_unload()
        assert torch.allclose(merged(**batch).logits, ref, atol=1e-5)
        standard.save_pretrained(tmp_path / "adapter")
        reloaded = PeftModel.from_pretrained(build_backbone_classifier(cfg, 3), tmp_path / "adapter").eval()
        assert torch.allclose(reloaded(**batch).logits, ref, atol=1e-5)
        # the block-diagonal structure is real: zeroing one head's B block changes the output
        q = lm.prefix + lm.head_map.blocks[0].projections["query"]
        up = model.get_submodule(q).lora_B["default"]
        assert isinstance(up, HeadwiseUp)
        up.weight[:lm.head_map.head_dim].zero_()
        assert not torch.allclose(model(**batch).logits, ref, atol=1e-4)


def test_a_heads_adapter_changes_only_that_head(hw):
    """Moving head 1's slices of both factors changes only head 1's query rows and output columns of dW."""
    _, lm, _ = hw
    model = copy.deepcopy(lm.model)
    block = 0
    only_h1 = torch.zeros_like(KEPT)
    only_h1[block, 1] = True
    before = {}
    for role in ("query", "output"):
        module = model.get_submodule(lm.prefix + lm.head_map.blocks[block].projections[role])
        standard = copy.deepcopy(module)
        standard_lora_(standard)
        before[role] = standard.get_delta_weight("default")
    state = trainable_state(model)
    moved = {n: t + 0.5 for n, t in gather_kept(state, only_h1, lm.layout).items()
             if n in lm.layout.sliced and lm.layout.sliced[n][0] == block}
    load_state_(model, scatter_kept(moved, only_h1, lm.layout, state))
    d = lm.head_map.head_dim
    for role, dim in (("query", 0), ("output", 1)):
        module = model.get_submodule(lm.prefix + lm.head_map.blocks[block].projections[role])
        standard = copy.deepcopy(module)
        standard_lora_(standard)
        changed = (standard.get_delta_weight("default") - before[role]).abs().amax(dim=1 - dim) > 1e-6
        assert changed.nonzero().flatten().tolist() == list(range(d, 2 * d)), role


def test_pruned_headwise_model_equals_the_gated_whole_one(hw):
    """Physical pruning slices A's r_h-rows (q/k/v) and B's r_h-columns (o) with the head's own rows and
    columns: the pruned model's logits and gradients are the gated whole model's."""
    _, lm, batch = hw
    ref, out, full_grads, pruned_grads = pruned_and_gated_backward(lm, KEPT, batch)
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    sliced = gather_kept(full_grads, KEPT, lm.layout)
    for name, grad in pruned_grads.items():
        assert grad.shape == sliced[name].shape, name
        assert torch.allclose(grad, sliced[name], atol=1e-5), name
    pruned = copy.deepcopy(lm.model)
    prune_heads_(pruned, lm.head_map, KEPT, lm.prefix)
    o = pruned.get_submodule(lm.prefix + lm.head_map.blocks[1].projections["output"])
    assert isinstance(o.lora_A["default"], HeadwiseDown) and o.lora_B["default"].in_features == 2  # 1 head x r_h


def _sgd_drift(lm, batch, steps: int = 3) -> float:
    """Train the kept heads of a sparse_backward copy (pruned heads computed without autograd from a frozen side
    copy) for a few SGD steps, then compare its logits with the whole model holding the trained tensors."""
    work = copy.deepcopy(lm.model).train()
    side = copy.deepcopy(lm.model)
    prune_heads_(work, lm.head_map, KEPT, lm.prefix)
    attach_frozen_heads(work, side, lm.head_map, KEPT, lm.prefix)
    for m in (work, side):
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    params = [p for p in work.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        work(**batch).loss.backward()
        opt.step()
    whole = copy.deepcopy(lm.model).eval()
    global_state = trainable_state(lm.model)
    load_state_(whole, scatter_kept(trainable_state(work), KEPT, lm.layout, global_state))
    with torch.no_grad():
        return float((work.eval()(**batch).logits - whole(**batch).logits).abs().max())


def test_sparse_backward_stays_exact_after_training_only_with_headwise_lora(hw, tiny_lora):
    """Standard LoRA with a trained A: the kept heads' steps move the shared A, which the frozen side heads do
    not see, so the client's model drifts from the whole model it stands for. Head-wise LoRA has no shared
    factor in the attention: the client's model stays the whole model."""
    _, lm, batch = hw
    assert _sgd_drift(lm, batch) < 1e-5
    standard_lm, standard_batch = tiny_lora
    assert _sgd_drift(standard_lm, standard_batch) > 1e-3


def test_client_update_sends_only_the_kept_heads_of_both_factors(tiny_bert_dir, tmp_path):
    cfg = tiny_config(tiny_bert_dir, tmp_path, lora={"head_rank": 1},
                      heads={"sparsity": 0.75, "scope": "per_block", "mode": "sparse_backward"})
    sim = Simulation.setup(cfg)
    state = trainable_state(sim.lm.model)
    update = client_update(sim.lm, state, sim.client_data(0), cfg, client_id=0, round_=1)
    kept = update.kept_heads
    assert int(kept.sum()) == 2  # 1 of 4 heads a block
    for name, tensor in update.tensors.items():
        if name in sim.lm.layout.sliced:
            block, dim = sim.lm.layout.sliced[name]
            assert tensor.shape[dim] == int(kept[block].sum()) * sim.lm.layout.unit_of(name), name
    trained = scatter_kept(update.tensors, kept, sim.lm.layout, state)
    moved = [n for n in sim.lm.layout.sliced if ".lora_A." in n and not torch.equal(trained[n], state[n])]
    assert moved  # A is trained (and sent) per head
    sent = sum(t.numel() for t in update.tensors.values())
    assert sent < sum(t.numel() for t in state.values()) / 2


def test_head_rank_needs_an_attention_target(tiny_bert_dir, tmp_path):
    with pytest.raises((ConfigError, ValueError), match="head_rank"):
        config_from_dict({"model": {"name": tiny_bert_dir}, "out": str(tmp_path),
                          "lora": {"head_rank": 1, "target_modules": ["feed_forward"]}})


def test_grouped_query_attention_prunes_headwise_units_like_gating():
    """LLaMA with 8 query heads and 2 key/value heads: k/v get one adapter per key/value head (rank 2 * r_h),
    q and o one per query head; pruning cuts each factor by its own units and equals gating."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedhead.models.head_map import HeadLayout, head_map_for
    from fedhead.models.headwise import headwise_patterns, make_headwise_
    from tests.conftest import gated_and_pruned
    from tests.test_llama_heads import MASKS, PREFIX, SMALL

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMALL, attn_implementation="eager"))
    head_map = head_map_for(base)
    ranks, alphas = headwise_patterns(head_map, ROLES, 2, 16.0, prefix="")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16.0, rank_pattern=ranks, alpha_pattern=alphas,
                                            target_modules=head_map.lora_target_regex(ROLES)))
    make_headwise_(model, head_map, ROLES, 2, prefix=PREFIX)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.eval()
    layout = HeadLayout.from_model(head_map, [n for n, p in model.named_parameters() if p.requires_grad], PREFIX,
                                   head_rank=2)
    v_a = next(n for n in layout.sliced if "layers.0.self_attn.v_proj.lora_A" in n)
    assert dict(model.named_parameters())[v_a].shape[0] == 2 * 2 and layout.group_of(v_a) == 4
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    kept = torch.tensor(MASKS["mixed"], dtype=torch.bool)
    full, pruned = gated_and_pruned(model, head_map, kept, PREFIX)
    with torch.no_grad():
        assert (full(**batch).logits - pruned(**batch).logits).abs().max() < 1e-5
    state = {n: p.detach() for n, p in pruned.named_parameters() if p.requires_grad}
    expected = gather_kept({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, kept, layout)
    assert all(state[n].shape == expected[n].shape for n in state)


def test_principal_a_is_the_top_right_singular_vectors_of_w(tiny_bert_dir, tmp_path):
    """lora.init_a = 'principal': A's rows span W's top input directions, at peft's row norm, with fixed signs
    (two builds agree), and A is no longer peft's random draw."""
    cfg = tiny_config(tiny_bert_dir, tmp_path, lora={"init_a": "principal", "freeze_a": True})
    lm, again = build_model(cfg, 3), build_model(cfg, 3)
    random = build_model(tiny_config(tiny_bert_dir, tmp_path, lora={"freeze_a": True}), 3)
    q = lm.prefix + lm.head_map.blocks[0].projections["query"]
    module = lm.model.get_submodule(q)
    a = module.lora_A["default"].weight.detach()  # (r, in)
    w = module.get_base_layer().weight.detach()
    _, s, vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(a.norm(dim=1), torch.full((a.shape[0],), 3 ** -0.5), atol=1e-5)
    assert torch.allclose((a @ vh[: a.shape[0]].T).abs() * 3 ** 0.5, torch.eye(a.shape[0]), atol=1e-4)
    assert torch.equal(a, again.model.get_submodule(q).lora_A["default"].weight.detach())
    assert not torch.allclose(a, random.model.get_submodule(q).lora_A["default"].weight.detach(), atol=1e-3)
    with pytest.raises((ConfigError, ValueError), match="init_a"):
        tiny_config(tiny_bert_dir, tmp_path, lora={"init_a": "principal", "head_rank": 1})


def test_input_principal_a_reads_where_real_inputs_vary_without_seeing_text(minilm_path, tmp_path):
    """lora.init_a = 'input_principal': A's rows are the top principal directions of each projection's inputs
    on seeded random tokens (orthogonal, at peft's row norm, the same on every build). Fit on random tokens, they
    still hold more of the variance of the inputs real MultiNLI pairs produce than W's principal directions or
    peft's random A: the property that makes it a better frozen A."""
    lms = {init: build_model(tiny_config(minilm_path, tmp_path, lora={"init_a": init, "freeze_a": True}), 3)
           for init in ("input_principal", "principal", "random")}
    lm = lms["input_principal"]
    again = build_model(tiny_config(minilm_path, tmp_path, lora={"init_a": "input_principal", "freeze_a": True}), 3)
    pairs = [("A man inspects the uniform of a figure in some East Asian country.", "The man is sleeping."),
             ("An older and younger man smiling.", "Two men are smiling and laughing at the cats playing."),
             ("A soccer game with multiple males playing.", "Some men are playing a sport."),
             ("A black race car starts up in front of a crowd of people.", "A man is driving down a lonely road.")]
    batch = dict(lm.tokenizer([p for p, _ in pairs], [h for _, h in pairs], padding=True, return_tensors="pt"))
    inputs: dict[str, torch.Tensor] = {}
    paths = [lm.prefix + block.projections["query"] for block in lm.head_map.blocks]
    model = lm.model.eval()
    hooks = [model.get_submodule(p).get_base_layer().register_forward_hook(
        lambda _, i, __, p=p: inputs.__setitem__(p, i[0][batch["attention_mask"].bool()])) for p in paths]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()

    def held(init: str, path: str) -> float:  # share of the real inputs' energy in A's row space
        a = lms[init].model.get_submodule(path).lora_A["default"].weight.detach()
        q, _ = torch.linalg.qr(a.T)
        return float((inputs[path] @ q).pow(2).sum() / inputs[path].pow(2).sum())

    a = model.get_submodule(paths[0]).lora_A["default"].weight.detach()
    assert torch.allclose(a @ a.T * 3, torch.eye(a.shape[0]), atol=1e-4)
    assert torch.equal(a, again.model.get_submodule(paths[0]).lora_A["default"].weight.detach())
    shares = {init: sum(held(init, p) for p in paths) / len(paths) for init in lms}
    assert shares["input_principal"] > 1.5 * max(shares["principal"], shares["random"]), shares
    with pytest.raises((ConfigError, ValueError), match="input_principal"):
        tiny_config(minilm_path, tmp_path, lora={"init_a": "input_principal", "head_rank": 1})


@pytest.mark.parametrize("model_dir,task", [("tiny_t5_dir", "seq2seq"), ("tiny_llama_dir", "causal_lm")])
def test_input_principal_a_covers_text_to_text_and_decoder_models(model_dir, task, request, tmp_path):
    """The encoder-decoder (random decoder tokens too) and decoder-only paths: every LoRA A, in the decoder's
    cross-attention and under grouped-query attention as well, is orthogonal at peft's row norm and holds well
    above its chance share r / in of its projection's input energy on unseen random tokens, near the best share
    any r directions could (random tiny models have flat input spectra, so the margins are modest)."""
    from fedhead.models.loading import random_token_inputs
    from tests.conftest import SHARED

    e2e = {"train": str(SHARED / "data/e2e_nlg/validation.jsonl"), "eval": str(SHARED / "data/e2e_nlg/test.jsonl"),
           "text_fields": ["meaning_representation"], "target_field": "human_reference"}
    cfg = config_from_dict({
        "model": {"name": request.getfixturevalue(model_dir), "task": task, "max_length": 24,
                  "max_target_length": 12},
        "data": e2e, "partition": {"method": "iid"},
        "lora": {"rank": 4, "target_modules": ROLES, "freeze_a": True, "init_a": "input_principal"},
        "out": str(tmp_path)})
    lm = build_model(cfg)
    generator = torch.Generator().manual_seed(123)
    batch = {"input_ids": random_token_inputs(lm.tokenizer, 16, 24, generator)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if task == "seq2seq":
        batch["decoder_input_ids"] = random_token_inputs(lm.tokenizer, 16, 12, generator)
    inputs: dict[str, torch.Tensor] = {}
    modules = {n: m for n, m in lm.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    hooks = [m.get_base_layer().register_forward_hook(
        lambda _, i, __, n=n: inputs.__setitem__(n, i[0].reshape(-1, i[0].shape[-1]))) for n, m in modules.items()]
    with torch.no_grad():
        lm.model.eval()(**batch)
    for h in hooks:
        h.remove()
    assert len(inputs) == len(modules) == 4 * lm.head_map.num_blocks
    for name, module in modules.items():
        a = module.lora_A["default"].weight.detach()
        assert torch.allclose(a @ a.T * 3, torch.eye(a.shape[0]), atol=1e-4), name
        q, _ = torch.linalg.qr(a.T)
        x = inputs[name].double()
        share = float((x @ q.double()).pow(2).sum() / x.pow(2).sum())
        best = float(torch.linalg.eigvalsh(x.T @ x)[-a.shape[0]:].sum() / x.pow(2).sum())
        # the best r-dimensional subspace of these inputs holds `best`; chance is r / in (0.0625 here)
        assert share > 1.5 * a.shape[0] / a.shape[1] and share > 0.4 * best, (name, share, best)
