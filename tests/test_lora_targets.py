"""Client updates beyond the defaults: LoRA on the feed-forward layers (shared, sent whole) and kept heads
sampled by score (`heads.selection = "sample"`)."""

from __future__ import annotations

import pytest
import torch

from fedhead.federated.client import client_update
from fedhead.federated.state import trainable_state
from fedhead.heads.pruning import kept_heads_mask, sampled_scores
from fedhead.runners.local import Simulation
from fedhead.seeds import derived_seed
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def sim(tiny_bert_dir, tmp_path_factory):
    cfg = tiny_config(tiny_bert_dir, tmp_path_factory.mktemp("targets"),
                      lora={"target_modules": ["query", "value", "feed_forward"]},
                      heads={"sparsity": 0.5, "scope": "per_block"}, federated={"local_steps": 2})
    return Simulation.setup(cfg)


def test_feed_forward_lora_is_trained_whole_by_a_pruned_client(sim):
    # Prepare
    state = trainable_state(sim.lm.model)
    ffn = [n for n in state if ".intermediate.dense.lora_" in n
           or (".output.dense.lora_" in n and ".attention." not in n)]
    assert len(ffn) == 2 * 2 * 2  # 2 layers x (intermediate, output) x (A, B)
    # Execute: a client prunes half of the heads
    update = client_update(sim.lm, state, sim.client_data(1), sim.cfg, client_id=1, round_=1)
    # Assert: feed-forward adapters are not split by heads, sent in full and trained (B leaves zero)
    assert not any(n in sim.lm.layout.sliced for n in ffn)
    for name in ffn:
        assert update.tensors[name].shape == state[name].shape, name
        if "lora_B" in name:
            assert update.tensors[name].abs().sum() > 0, name
    query_b = next(n for n in state if ".query.lora_B." in n)
    assert update.tensors[query_b].shape[0] == state[query_b].shape[0] // 2  # half of the heads' rows


def test_sampled_selection_draws_kept_heads_from_the_seeded_stream(sim):
    cfg = sim.cfg.model_copy(deep=True)
    cfg.heads.selection = "sample"
    state = trainable_state(sim.lm.model)
    masks = set()
    for round_ in (1, 2, 3, 4):
        update = client_update(sim.lm, state, sim.client_data(1), cfg, client_id=1, round_=round_)
        draw = torch.Generator().manual_seed(derived_seed(cfg.seed, round_, 1, stream=2))
        expected = kept_heads_mask(sampled_scores(update.head_scores, 1.0, draw), 0.5, "per_block")
        assert update.kept_heads.equal(expected)
        masks.add(tuple(update.kept_heads.flatten().tolist()))
    assert len(masks) > 1  # the same client keeps different heads from round to round


@pytest.mark.parametrize("arch", ["t5", "t5_gated", "llama"])
def test_feed_forward_paths_are_the_feed_forward_linears(arch):
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    from fedhead.models.head_map import head_map_for

    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))
        per_layer = 3
    else:
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=2,
            feed_forward_proj="gated-gelu" if arch == "t5_gated" else "relu"))
        per_layer = 3 if arch == "t5_gated" else 2
    paths = head_map_for(model).feed_forward
    assert len(paths) == per_layer * 2 * (1 if arch == "llama" else 2)  # T5: encoder and decoder layers
    for path in paths:
        linear = model.get_submodule(path)
        assert isinstance(linear, torch.nn.Linear) and 48 in (linear.in_features, linear.out_features), path
