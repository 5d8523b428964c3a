"""Grouped-query attention (LLaMA family): head map, physical pruning against exact head gates, slicing and
aggregation of key/value units shared by several query heads."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fedhead.federated.aggregation import aggregate, head_weights
from fedhead.federated.payload import ClientUpdate
from fedhead.federated.privacy import dp_aggregate
from fedhead.federated.validation import check_update, screen_updates
from fedhead.models.head_map import HeadLayout, head_map_for, unit_index
from fedhead.models.llama_heads import PrunedGQAAttentionMixin, PrunedLlamaAttention
from fedhead.models.slicing import gate_heads, gather_kept, prune_heads_, scatter_kept
from tests.conftest import gated_and_pruned

PREFIX = "base_model.model."
H, G, D = 8, 2, 8  # query heads, key/value heads, head_dim: units of 4 query heads (0-3 -> kv 0, 4-7 -> kv 1)
SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
         "num_attention_heads": H, "num_key_value_heads": G, "head_dim": D, "max_position_embeddings": 64,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": None}

MASKS = {
    # layer 0: kv unit 1 loses all its query heads; layer 1 keeps no head; layer 2 all; layer 3 both units partial
    "mixed": [[1, 0, 1, 1, 0, 0, 0, 0], [0] * 8, [1] * 8, [0, 1, 0, 0, 1, 0, 0, 1]],
    # layer 0 (whose cache length the model reads) keeps no head; layer 1 keeps one query head of unit 1
    "empty_first": [[0] * 8, [0, 0, 0, 0, 0, 0, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0], [1] * 8],
}


def _lora(model, head_map):
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=head_map.lora_target_regex(["query", "value"])))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return lora.eval()


@pytest.fixture(scope="module")
def lora_llama():
    """A tiny random LlamaForCausalLM (8 query heads, 2 KV heads), LoRA on q/v with random B, and its head map."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, attn_implementation="eager"))
    head_map = head_map_for(model)
    return _lora(model, head_map), head_map


@pytest.fixture(scope="module")
def batch():
    """Two left-padded sequences (row 1 has 3 padding tokens); causal-LM labels -100 on padding."""
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _gated_and_pruned(lora_llama, mask: str, attn: str | None = None):
    base, head_map = lora_llama
    kept = torch.tensor(MASKS[mask], dtype=torch.bool)
    full, pruned = gated_and_pruned(base, head_map, kept, PREFIX, attn)
    return full, pruned, kept, head_map


def _layout(model, head_map) -> HeadLayout:
    return HeadLayout.from_model(head_map, [n for n, p in model.named_parameters() if p.requires_grad], PREFIX)


def test_head_map_and_kv_rule(lora_llama):
    lora, head_map = lora_llama
    assert head_map.architecture == "llama" and head_map.num_blocks == 4
    block = head_map.blocks[0]
    assert (block.num_heads, block.num_kv_heads, block.head_dim, block.kv_group) == (H, G, D, 4)
    assert block.projections["key"] == "model.layers.0.self_attn.k_proj" and block.attention.endswith("self_attn")
    assert (block.group_of("query"), block.group_of("key"), block.group_of("value"), block.group_of("output")) == (
        1, 4, 4, 1)
    bare = head_map_for(LlamaModel(LlamaConfig(**SMALL)))  # a bare decoder: paths start at `layers.`
    assert bare.blocks[1].projections["output"] == "layers.1.self_attn.o_proj"
    for cfg, cls in ((MistralConfig, MistralForCausalLM), (Qwen2Config, Qwen2ForCausalLM)):
        other = head_map_for(cls(cfg(**SMALL)))
        assert other.architecture == "llama" and other.blocks[3].num_kv_heads == G
    # a unit is pruned only when all its query heads are; its rows are unit*d:(unit+1)*d
    kept = torch.tensor(MASKS["mixed"], dtype=torch.bool)
    assert torch.equal(unit_index(kept[0], 4, D), torch.arange(D))
    assert unit_index(kept[1], 4, D).numel() == 0
    assert torch.equal(unit_index(kept[3], 4, D), torch.arange(2 * D))
    layout = _layout(lora, head_map)
    assert len(layout.sliced) == 2 * head_map.num_blocks  # q and v LoRA B of every block
    v_b = next(n for n in layout.sliced if "layers.0.self_attn.v_proj.lora_B" in n)
    q_b = next(n for n in layout.sliced if "layers.0.self_attn.q_proj.lora_B" in n)
    assert layout.group_of(v_b) == 4 and layout.group_of(q_b) == 1
    assert torch.equal(layout.index_of(v_b, kept), torch.arange(D))
    assert torch.equal(layout.index_of(q_b, kept), layout.kept_index(kept, 0))
    w = torch.tensor([[1.0, 0, 1, 2, 0, 0, 0, 0]])  # (C=1, H): unit 0 mean 1, unit 1 mean 0
    assert torch.equal(layout.row_weights(v_b, w), torch.tensor([[1.0] * D + [0.0] * D]))
    assert torch.equal(layout.row_weights(q_b, w), w.repeat_interleave(D, dim=1))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mask", list(MASKS))
def test_pruned_logits_equal_gated(lora_llama, batch, mask, attn):
    full, pruned, kept, head_map = _gated_and_pruned(lora_llama, mask, attn)
    for b, block in enumerate(head_map.blocks):  # the pruned blocks really are smaller
        attention = pruned.get_submodule(PREFIX + block.attention)
        k, m = int(kept[b].sum()), int(kept[b].view(G, -1).any(-1).sum())
        assert isinstance(attention, PrunedLlamaAttention) == (k < H)
        assert attention.q_proj.base_layer.weight.shape[0] == k * D
        assert attention.k_proj.weight.shape[0] == attention.v_proj.base_layer.weight.shape[0] == m * D
        assert attention.v_proj.lora_B["default"].weight.shape[0] == m * D
        assert attention.o_proj.weight.shape[1] == k * D
    with torch.no_grad():
        expected, actual = full(**batch), pruned(**batch)
    assert (actual.logits - expected.logits).abs().max() < 1e-5
    assert abs(float(actual.loss) - float(expected.loss)) < 1e-5
    with torch.no_grad():  # gating really changes the model (the test would be vacuous otherwise)
        ungated = lora_llama[0](**batch)
    assert (ungated.logits - expected.logits).abs().max() > 1e-3


def test_attention_weights_of_pruned_blocks(lora_llama, batch):
    _, pruned, kept, _ = _gated_and_pruned(lora_llama, "mixed", "eager")
    with torch.no_grad():
        out = pruned(**batch, output_attentions=True)
    assert [a.shape[1] for a in out.attentions] == kept.sum(1).tolist()  # (B, kept query heads, T, T)


@pytest.mark.parametrize("mask", list(MASKS))
def test_pruned_gradients_equal_gated_slices(lora_llama, batch, mask):
    full, pruned, kept, head_map = _gated_and_pruned(lora_llama, mask)
    full(**batch).loss.backward()
    pruned(**batch).loss.backward()
    layout = _layout(full, head_map)

    def grads(model):
        return {n: p.grad if p.grad is not None else torch.zeros_like(p)
                for n, p in model.named_parameters() if p.requires_grad}

    expected = gather_kept(grads(full), kept, layout)  # kept query heads' q rows, kept units' v rows
    actual = grads(pruned)
    assert expected.keys() == actual.keys()
    for name, grad in actual.items():
        assert grad.shape == expected[name].shape, name
        assert torch.allclose(grad, expected[name], rtol=0, atol=1e-5), name
    assert all(float(g.abs().sum()) > 0 for n, g in actual.items() if n in layout.sliced and g.numel())


def test_gather_scatter_round_trip_with_groups(lora_llama):
    lora, head_map = lora_llama
    layout = _layout(lora, head_map)
    kept = torch.tensor(MASKS["mixed"], dtype=torch.bool)
    state = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    sliced = gather_kept(state, kept, layout)
    for name, (b, dim) in layout.sliced.items():
        units = kept[b].view(-1, layout.group_of(name)).any(-1).sum()
        assert sliced[name].shape[dim] == int(units) * D, name
    changed = {n: t + 1.0 for n, t in sliced.items()}
    back = scatter_kept(changed, kept, layout, state)
    assert all(torch.equal(gather_kept(back, kept, layout)[n], changed[n]) for n in changed)
    for name, (_, dim) in layout.sliced.items():  # rows of pruned heads / units are bit-identical to the base
        rest = torch.ones(state[name].shape[dim], dtype=torch.bool)
        rest[layout.index_of(name, kept)] = False
        assert torch.equal(back[name][rest] if dim == 0 else back[name][:, rest],
                           state[name][rest] if dim == 0 else state[name][:, rest]), name


@pytest.mark.parametrize("mask", list(MASKS))
def test_pruned_generation_with_cache_equals_gated(lora_llama, batch, mask):
    full, pruned, _, _ = _gated_and_pruned(lora_llama, mask)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    kwargs = {"max_new_tokens": 5, "do_sample": False, "use_cache": True, "output_scores": True,
              "return_dict_in_generate": True}
    expected = full.generate(**inputs, **kwargs)
    actual = pruned.generate(**inputs, **kwargs)
    assert actual.sequences.shape == (2, 9 + 5)
    assert torch.equal(actual.sequences, expected.sequences)
    assert (torch.stack(actual.scores) - torch.stack(expected.scores)).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_families_prune_like_gating(batch, family):
    """Mistral (sliding window in the config) and Qwen2 (q/k/v biases) share the map and the pruned forward."""
    cfg_cls, model_cls = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        family]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**SMALL, attn_implementation="eager"))
    head_map = head_map_for(model)
    full, kept = _lora(model, head_map), torch.tensor(MASKS["mixed"], dtype=torch.bool)
    pruned = copy.deepcopy(full)
    prune_heads_(pruned, head_map, kept, PREFIX)
    gate_heads(full, head_map, kept.float(), PREFIX)
    attention = pruned.get_submodule(PREFIX + head_map.blocks[0].attention)
    assert isinstance(attention, PrunedGQAAttentionMixin) and type(attention).__name__.startswith("Pruned")
    with torch.no_grad():
        assert (pruned(**batch).logits - full(**batch).logits).abs().max() < 1e-5


def _update(cid: int, n: int, kept: torch.Tensor, scores: torch.Tensor, full: dict, layout) -> ClientUpdate:
    return ClientUpdate(cid, n, kept, scores, gather_kept(full, kept, layout), 0.0, 0.0, 0.0)


def test_aggregation_of_kv_units(lora_llama):
    lora, head_map = lora_llama
    layout = _layout(lora, head_map)
    state = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    kept_a = torch.tensor(MASKS["mixed"], dtype=torch.bool)
    kept_b = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0], [0] * 8, [0] * 8, [1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    scores_a = torch.rand(4, H, generator=torch.Generator().manual_seed(2))
    scores_b = torch.rand(4, H, generator=torch.Generator().manual_seed(3))
    a = _update(0, 10, kept_a, scores_a, {k: torch.full_like(v, 1.0) for k, v in state.items()}, layout)
    b = _update(1, 30, kept_b, scores_b, {k: torch.full_like(v, 3.0) for k, v in state.items()}, layout)
    assert check_update(a, state, layout) is None and check_update(b, state, layout) is None
    accepted, rejected = screen_updates([a, b], state, layout)
    assert len(accepted) == 2 and not rejected
    v0 = next(n for n in layout.sliced if "layers.0.self_attn.v_proj.lora_B" in n)
    v3 = next(n for n in layout.sliced if "layers.3.self_attn.v_proj.lora_B" in n)
    q0 = next(n for n in layout.sliced if "layers.0.self_attn.q_proj.lora_B" in n)
    bad = copy.copy(b)
    bad.tensors = {**b.tensors, v0: b.tensors[v0].repeat(2, 1)}  # rows for both units: wrong for this mask
    assert "expected" in check_update(bad, state, layout)

    fedavg = aggregate(state, [a, b], layout, "fedavg")
    # layer 0, unit 0 kept by both, with weights n_c * (its kept query heads) / 4: a 10 * 3/4, b 30 * 2/4;
    # unit 1 kept by nobody: unchanged
    expected = (7.5 * 1.0 + 15.0 * 3.0) / 22.5
    assert torch.allclose(fedavg[v0][:D], torch.full_like(fedavg[v0][:D], expected))
    assert torch.equal(fedavg[v0][D:], state[v0][D:])
    # layer 3: unit 0 kept by both through one head each (10/4, 30/4), unit 1 by a only
    assert torch.allclose(fedavg[v3][:D], torch.full_like(fedavg[v3][:D], 2.5))
    assert torch.allclose(fedavg[v3][D:], torch.ones_like(fedavg[v3][D:]))
    # query rows stay per head: head 0 both, head 1 b only, head 2 a only, head 4 nobody
    assert [float(fedavg[q0][h * D, 0]) for h in (0, 1, 2)] == pytest.approx([2.5, 3.0, 1.0])
    assert torch.equal(fedavg[q0][4 * D : 5 * D], state[q0][4 * D : 5 * D])

    weighted = aggregate(state, [a, b], layout, "head_weighted", "product")
    w = head_weights([a, b], 0, "product")  # (C, H), zero where the client pruned the head
    w_unit0 = w[:, :4].mean(1)  # (C,): mean over the unit's query heads
    expected = (w_unit0[0] * 1.0 + w_unit0[1] * 3.0) / w_unit0.sum()
    assert torch.allclose(weighted[v0][:D].double(), torch.full((D, 4), float(expected), dtype=torch.float64),
                          atol=1e-6)
    assert torch.equal(weighted[v0][D:], state[v0][D:])

    median = aggregate(state, [a, b], layout, "median")
    assert torch.equal(median[v3][D:], state[v3][D:])  # only a kept it: one value is no median, kept as it was
    noisy = dp_aggregate(state, [a, b], layout, noise_multiplier=0.0, clipping_norm=1e9,
                         generator=torch.Generator().manual_seed(0))
    assert torch.allclose(noisy[v0][D:], state[v0][D:])  # a unit nobody kept gets a zero delta
    assert torch.allclose(noisy[v0][:D], state[v0][:D] + ((1.0 - state[v0][:D]) + (3.0 - state[v0][:D])) / 2)
