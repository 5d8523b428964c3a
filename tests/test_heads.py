import copy

import pytest
import torch

from fedhead.config import HeadsSection
from fedhead.heads import head_confidence, kept_heads_mask, score_heads
from fedhead.heads.importance import real_token_mask
from fedhead.heads.plan import head_plan
from fedhead.heads.pruning import consensus_heads_mask, heads_to_keep, sampled_scores
from fedhead.models import head_map_for
from fedhead.models.head_map import UnsupportedModelError
from fedhead.models.slicing import gather_kept, prune_heads_, scatter_kept
from tests.conftest import pruned_and_gated_backward


def test_confidence_on_hand_built_attention():
    # Prepare: 1 example, 2 heads, 3 tokens, the last is padding
    attn = torch.tensor([[[[0.5, 0.5, 0.0], [0.9, 0.1, 0.0], [0.3, 0.3, 0.4]],
                          [[0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [1.0, 0.0, 0.0]]]])
    real = torch.tensor([[True, True, False]])
    # Execute
    sums, count = head_confidence(attn, real, real)
    # Assert: mean over the 2 real queries of the max over the 2 real keys
    assert count == 2
    assert torch.allclose(sums / count, torch.tensor([(0.5 + 0.9) / 2, (0.8 + 0.6) / 2]))


def test_confidence_ignores_padding_and_special_tokens():
    attn = torch.tensor([[[[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.25, 0.25]]]])  # (1, 1, 3, 3)
    ids = torch.tensor([[101, 2000, 2001]])
    all_tokens = real_token_mask(ids, torch.ones(1, 3), [])
    no_special = real_token_mask(ids, torch.ones(1, 3), [101])
    s_all, c_all = head_confidence(attn, all_tokens, all_tokens)
    s_real, c_real = head_confidence(attn, no_special, no_special)
    assert torch.allclose(s_all / c_all, torch.tensor([(0.7 + 0.6 + 0.5) / 3]))
    assert torch.allclose(s_real / c_real, torch.tensor([(0.3 + 0.25) / 2]))  # [CLS] neither query nor key
    # padding: the same example padded with two more positions gives the same confidence
    padded = torch.zeros(1, 1, 5, 5)
    padded[..., :3, :3] = attn
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    real = real_token_mask(torch.tensor([[101, 2000, 2001, 0, 0]]), mask, [101])
    s_pad, c_pad = head_confidence(padded, real, real)
    assert torch.allclose(s_pad / c_pad, s_real / c_real)


def test_heads_to_keep_and_masks():
    assert heads_to_keep(72, 0.9) == 8 and heads_to_keep(72, 0.5) == 36 and heads_to_keep(12, 0.7) == 4
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.05, 0.06, 0.07, 0.5]])
    assert kept_heads_mask(scores, 0.0).all()
    top = kept_heads_mask(scores, 0.75)  # keep 2 of 8
    assert top.tolist() == [[True, True, False, False], [False, False, False, False]]
    floor = kept_heads_mask(scores, 0.75, min_per_block=1)
    assert floor.tolist() == [[True, False, False, False], [False, False, False, True]]
    per_block = kept_heads_mask(scores, 0.5, scope="per_block")
    assert per_block.tolist() == [[True, True, False, False], [False, False, True, True]]


# head_plan's table on one block of 4 heads ranked 0 > 1 > 2 > 3 where the client keeps head 3 only (as a
# schedule may), at sparsity 0.75 and compute_sparsity 0.5: top(0.5) = heads {0, 1}; (computed, side) by mode
PLAN_ROWS = {
    "remove": ({}, [0, 0, 0, 1], [0, 0, 0, 0]),
    "train_sparse": ({}, [1, 1, 1, 1], [0, 0, 0, 0]),
    "sparse_backward": ({}, [0, 0, 0, 1], [1, 1, 1, 0]),
    "mixed": ({}, [1, 1, 0, 1], [0, 0, 0, 0]),
    "mixed_no_grad": ({"mode": "mixed", "frozen_autograd": False}, [0, 0, 0, 1], [1, 1, 0, 0]),
    "mixed_removes_all_pruned": ({"mode": "mixed", "compute_sparsity": 0.75}, [0, 0, 0, 1], [0, 0, 0, 0]),
}


@pytest.mark.parametrize("row", sorted(PLAN_ROWS))
def test_head_plan_follows_its_table(row):
    # Prepare
    options, computed, side = PLAN_ROWS[row]
    heads = HeadsSection(**{"mode": row, "sparsity": 0.75, "compute_sparsity": 0.5, "scope": "per_block", **options})
    ranking = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    kept = torch.tensor([[False, False, False, True]])
    # Execute
    plan = head_plan(heads, 0.75, kept, ranking)
    # Assert
    assert torch.equal(plan.kept, kept)
    assert plan.computed.int().tolist() == [computed], "computed"
    assert plan.side.int().tolist() == [side], "side"


def test_consensus_keeps_the_most_often_kept_heads_ties_by_mean_score():
    """Rules out a consensus from the scores alone (head 3 has the highest mean score but is kept least often)
    or from the last mask only, and a tie-break that overturns a frequency."""
    kept = torch.tensor([[[1, 1, 0, 0]], [[1, 0, 1, 0]], [[1, 0, 1, 0]], [[0, 1, 0, 1]]], dtype=torch.bool)
    scores = torch.tensor([[[0.1, 0.2, 0.3, 0.9]]] * 4)
    # frequencies 3/4, 2/4, 2/4, 1/4; heads 1 and 2 tie and head 2 has the higher mean score
    assert consensus_heads_mask(kept, scores, 0.5).tolist() == [[True, False, True, False]]
    assert consensus_heads_mask(kept, scores, 0.75).tolist() == [[True, False, False, False]]
    rolling = torch.ones(2, 1, 4, dtype=torch.bool)  # every head kept equally often: the scores decide
    assert consensus_heads_mask(rolling, scores[:2], 0.5).tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError, match="N, blocks, heads"):
        consensus_heads_mask(kept[0], scores[0], 0.5)


def test_sampled_selection_spreads_over_heads_in_score_order():
    # Prepare: one block of 6 heads with clearly ordered scores; keep 1 head per draw
    scores = torch.tensor([[0.9, 0.6, 0.4, 0.2, 0.1, 0.05]])
    gen = torch.Generator().manual_seed(0)
    # Execute: 3,000 draws at temperature 1
    counts = torch.zeros(6)
    for _ in range(3000):
        counts += kept_heads_mask(sampled_scores(scores, 1.0, gen), 5 / 6, scope="per_block")[0].float()
    # Assert: every head is drawn sometimes, in proportion to its score (Gumbel top-1 = softmax of log score)
    expected = scores[0] / scores[0].sum()
    assert (counts > 0).all()
    assert torch.allclose(counts / 3000, expected, atol=0.03)
    # A low temperature gives back the top head; the same seed gives the same draw
    cold = sampled_scores(scores, 0.01, torch.Generator().manual_seed(1))
    assert kept_heads_mask(cold, 5 / 6, scope="per_block")[0].tolist() == [True] + [False] * 5
    assert sampled_scores(scores, 1.0, torch.Generator().manual_seed(3)).equal(
        sampled_scores(scores, 1.0, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="temperature"):
        sampled_scores(scores, 0.0, gen)


KEPT = torch.tensor([[True, False, True, False], [False, False, False, False]])  # block 1 loses every head


def test_pruned_forward_and_grads_equal_gated_full_model(tiny_lora):
    lm, batch = tiny_lora
    ref, out, full_grads, pruned_grads = pruned_and_gated_backward(lm, KEPT, batch)
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    assert set(full_grads) == set(pruned_grads)
    sliced_ref = gather_kept(full_grads, KEPT, lm.layout)
    for name, grad in pruned_grads.items():
        assert torch.allclose(grad, sliced_ref[name], atol=1e-5), name
    assert sum(g.numel() for g in pruned_grads.values()) < sum(g.numel() for g in full_grads.values())


def test_scatter_is_inverse_of_gather(tiny_lora):
    lm, _ = tiny_lora
    state = {n: p.detach().clone() for n, p in lm.model.named_parameters() if p.requires_grad}
    sliced = gather_kept(state, KEPT, lm.layout)
    q_b = next(n for n in lm.layout.sliced if "query.lora_B" in n)
    assert sliced[q_b].shape[0] == int(KEPT[lm.layout.sliced[q_b][0]].sum()) * lm.layout.head_dim
    changed = {n: t + 1.0 for n, t in sliced.items()}
    back = scatter_kept(changed, KEPT, lm.layout, state)
    assert all(torch.equal(gather_kept(back, KEPT, lm.layout)[n], changed[n]) for n in changed)
    for name, (b, dim) in lm.layout.sliced.items():  # pruned heads' rows are bit-identical to the base
        pruned_heads = (~KEPT[b]).nonzero().flatten()
        idx = lm.layout.head_index(pruned_heads)
        assert torch.equal(back[name].index_select(dim, idx), state[name].index_select(dim, idx))


def test_scores_shapes_and_ranges(tiny_lora):
    lm, batch = tiny_lora
    for method in ["confidence", "gradient", "random"]:
        scores, loss = score_heads(lm.model, lm.head_map, [batch], method, special_ids=lm.tokenizer.all_special_ids,
                                   prefix=lm.prefix, generator=torch.Generator().manual_seed(0))
        assert scores.shape == (2, 4) and float(scores.min()) >= 0 and float(scores.max()) <= 1 + 1e-6
        assert loss > 0
    assert not any(p.grad is not None for p in lm.model.parameters() if p.requires_grad)


def test_unsupported_architecture_names_the_class():
    from transformers import GPT2Config, GPT2Model

    with pytest.raises(UnsupportedModelError, match="GPT2Model"):
        head_map_for(GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2)))


def test_mean_compensated_pruning_equals_mean_ablation(tiny_lora):
    from fedhead.heads.mean_context import HeadContextMeans

    lm, batch = tiny_lora
    full = copy.deepcopy(lm.model).eval()
    with HeadContextMeans(full, lm.head_map, lm.prefix) as recorder, torch.no_grad():
        full(**batch)
    means = recorder.means()
    # Reference: the full model with the pruned heads' contexts replaced by their means
    handles = []
    for b, block in enumerate(lm.head_map.blocks):
        module = full.get_submodule(lm.prefix + block.projections["output"])
        pruned = lm.layout.head_index((~KEPT[b]).nonzero().flatten())

        def hook(_m, args, b=b, pruned=pruned):
            x = args[0].clone()
            x[..., pruned] = means[b][pruned]
            return (x, *args[1:])

        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        ref = full(**batch).logits
    for h in handles:
        h.remove()
    pruned_model = copy.deepcopy(lm.model).eval()
    prune_heads_(pruned_model, lm.head_map, KEPT, lm.prefix, means)
    with torch.no_grad():
        out = pruned_model(**batch).logits
        zeroed = copy.deepcopy(lm.model).eval()
        prune_heads_(zeroed, lm.head_map, KEPT, lm.prefix)
        assert not torch.allclose(zeroed(**batch).logits, ref, atol=1e-3)  # compensation changes something
    assert torch.allclose(out, ref, atol=1e-5)
    assert not any(p.requires_grad for n, p in pruned_model.named_parameters() if n.endswith("dense.base_layer.bias"))
