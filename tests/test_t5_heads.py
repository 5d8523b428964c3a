"""Physical head pruning of T5 (encoder self-, decoder self- and cross-attention) against exact head gates."""

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

from fedhead.heads.importance import attention_masks_by_block
from fedhead.models.head_map import ROLES, HeadLayout, head_map_for
from fedhead.models.slicing import gather_kept
from fedhead.models.t5_heads import PrunedT5Attention
from tests.conftest import gated_and_pruned

TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared/models/t5-small-tokenizer"
PREFIX = "base_model.model."

# blocks: enc0.self, enc1.self, dec0.self, dec0.cross, dec1.self, dec1.cross (4 heads each)
MASKS = {
    # block 0 of each stack (and the first cross-attention) keeps some heads; enc1 keeps none; dec1.self keeps all
    "partial_first": [[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 0, 1], [1, 1, 1, 1], [1, 0, 1, 1]],
    # the blocks that compute the position bias (and the first cross-attention) keep no head
    "empty_first": [[0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1], [1, 1, 1, 0]],
}


@pytest.fixture(scope="module")
def lora_t5():
    """A tiny random T5 with LoRA on q/k/v/o of every block, LoRA B random (non-zero), and its head map."""
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=32128, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                   num_decoder_layers=2, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # t5-small's special ids
    model = T5ForConditionalGeneration(cfg)
    head_map = head_map_for(model)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=head_map.lora_target_regex(list(ROLES))))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return lora.eval(), head_map


@pytest.fixture(scope="module")
def batch():
    """Two source/target pairs of different lengths: both sides padded; labels -100 on padding."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    src = tok(["translate English to German: The house is wonderful.", "Hello there"], padding=True,
              return_tensors="pt")
    tgt = tok(["Das Haus ist wunderbar.", "Hallo, wie geht es dir heute?"], padding=True, return_tensors="pt")
    labels = tgt.input_ids.masked_fill(tgt.attention_mask == 0, -100)
    assert (src.attention_mask == 0).any() and (labels == -100).any()
    return {"input_ids": src.input_ids, "attention_mask": src.attention_mask, "labels": labels}


def _gated_and_pruned(lora_t5, mask: str, attn: str | None = None):
    base, head_map = lora_t5
    kept = torch.tensor(MASKS[mask], dtype=torch.bool)
    full, pruned = gated_and_pruned(base, head_map, kept, PREFIX, attn)
    return full, pruned, kept, head_map


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mask", list(MASKS))
def test_pruned_logits_equal_gated(lora_t5, batch, mask, attn):
    full, pruned, kept, head_map = _gated_and_pruned(lora_t5, mask, attn)
    # the pruned blocks really are smaller
    for b, block in enumerate(head_map.blocks):
        attention = pruned.get_submodule(PREFIX + block.attention)
        k = int(kept[b].sum())
        assert attention.n_heads == k
        assert isinstance(attention, PrunedT5Attention) == (k < block.num_heads)
        assert attention.q.base_layer.weight.shape[0] == k * block.head_dim
        assert attention.o.base_layer.weight.shape[1] == k * block.head_dim
    with torch.no_grad():
        expected = full(**batch)
        actual = pruned(**batch)
    assert actual.logits.shape == expected.logits.shape
    assert (actual.logits - expected.logits).abs().max() < 1e-5
    assert abs(float(actual.loss) - float(expected.loss)) < 1e-5
    # gating really changes the model (the test would be vacuous otherwise)
    with torch.no_grad():
        ungated = lora_t5[0](**batch)
    assert (ungated.logits - expected.logits).abs().max() > 1e-3


@pytest.mark.parametrize("mask", list(MASKS))
def test_pruned_gradients_equal_gated_slices(lora_t5, batch, mask):
    full, pruned, kept, head_map = _gated_and_pruned(lora_t5, mask)
    full(**batch).loss.backward()
    pruned(**batch).loss.backward()
    trainable = [n for n, p in full.named_parameters() if p.requires_grad]
    layout = HeadLayout.from_model(head_map, trainable, PREFIX)
    assert len(layout.sliced) == 4 * head_map.num_blocks  # q/k/v lora_B and o lora_A of every block

    def grads(model):
        return {n: p.grad if p.grad is not None else torch.zeros_like(p)
                for n, p in model.named_parameters() if p.requires_grad}

    expected = gather_kept(grads(full), kept, layout)  # kept-head rows (q/k/v B) and columns (o A); shared as is
    actual = grads(pruned)
    assert expected.keys() == actual.keys()
    for name, grad in actual.items():
        assert grad.shape == expected[name].shape, name
        assert torch.allclose(grad, expected[name], rtol=0, atol=1e-5), name  # empty for heads-less blocks
    assert all(float(g.abs().sum()) > 0 for n, g in actual.items() if n in layout.sliced and g.numel())


@pytest.mark.parametrize("mask", list(MASKS))
def test_pruned_generation_with_cache_equals_gated(lora_t5, batch, mask):
    full, pruned, _, _ = _gated_and_pruned(lora_t5, mask)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    kwargs = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    expected = full.generate(**inputs, **kwargs)
    actual = pruned.generate(**inputs, **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    assert (torch.stack(actual.scores) - torch.stack(expected.scores)).abs().max() < 1e-5


def test_attentions_by_block_t5(lora_t5, batch):
    full, pruned, kept, head_map = _gated_and_pruned(lora_t5, "partial_first", "eager")
    src_len, tgt_len = batch["input_ids"].shape[1], batch["labels"].shape[1]
    for model, heads in ((full, [4] * head_map.num_blocks), (pruned, kept.sum(dim=1).tolist())):
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
        attentions = attention_masks_by_block(out, batch, head_map, special_ids=[0, 1])
        assert len(attentions) == head_map.num_blocks
        for block, (attn, queries, keys), h in zip(head_map.blocks, attentions, heads, strict=True):
            q = src_len if block.name.startswith("enc") else tgt_len
            k = tgt_len if block.name.startswith("dec") and block.kind == "self" else src_len
            assert attn.shape == (2, h, q, k), block.name
            assert queries.shape == (2, q) and keys.shape == (2, k), block.name
            # decoder positions are real where a label is; encoder tokens where neither padding nor </s>
            source_real = (batch["attention_mask"] == 1) & (batch["input_ids"] != 1)
            assert torch.equal(keys, (batch["labels"] != -100) if k == tgt_len and q == tgt_len else source_real)
            if h:
                assert torch.allclose(attn.sum(-1), torch.ones(2, h, q))


def test_headwise_lora_on_t5_prunes_exactly_and_equals_its_standard_lora(batch):
    """Head-wise LoRA (`lora.head_rank`) on T5's q/k/v/o, every block kind (encoder self, decoder self and
    cross-attention): the compact factors equal their block-diagonal standard LoRA, and physically pruning both
    factors of every projection gives the gated whole model's logits and kept-head gradients of both factors."""
    import copy

    from fedhead.models.headwise import HeadwiseDown, HeadwiseUp, headwise_patterns, make_headwise_, standard_lora_

    torch.manual_seed(1)
    cfg = T5Config(vocab_size=32128, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                   num_decoder_layers=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(cfg)
    head_map = head_map_for(model)
    r_h = 2
    ranks, alphas = headwise_patterns(head_map, list(ROLES), r_h, 8.0, prefix="")
    # the default rank and alpha differ from the patterns': a pattern that missed its module would show
    lora = get_peft_model(model, LoraConfig(r=3, lora_alpha=5.0, rank_pattern=ranks, alpha_pattern=alphas,
                                            target_modules=head_map.lora_target_regex(list(ROLES))))
    make_headwise_(lora, head_map, list(ROLES), r_h, prefix=PREFIX)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    lora.eval()
    q0 = lora.get_submodule(PREFIX + head_map.blocks[3].projections["query"])  # a cross-attention block
    assert isinstance(q0.lora_B["default"], HeadwiseUp)
    assert q0.r["default"] == 4 * r_h and q0.scaling["default"] == 8.0 / r_h  # alpha / r_h, each head
    assert isinstance(lora.get_submodule(PREFIX + head_map.blocks[3].projections["output"]).lora_A["default"],
                      HeadwiseDown)
    with torch.no_grad():
        ref = lora(**batch).logits
        standard = copy.deepcopy(lora)
        standard_lora_(standard)
        assert (standard(**batch).logits - ref).abs().max() < 1e-5
    kept = torch.tensor(MASKS["partial_first"], dtype=torch.bool)
    full, pruned = gated_and_pruned(lora, head_map, kept, PREFIX)
    out_full, out_pruned = full(**batch), pruned(**batch)
    assert (out_pruned.logits - out_full.logits).abs().max() < 1e-5
    out_full.loss.backward()
    out_pruned.loss.backward()
    trainable = [n for n, p in full.named_parameters() if p.requires_grad]
    layout = HeadLayout.from_model(head_map, trainable, PREFIX, head_rank=r_h)
    assert len(layout.sliced) == 8 * head_map.num_blocks  # both factors of q/k/v/o in every block

    def grads(m):
        return {n: p.grad if p.grad is not None else torch.zeros_like(p)
                for n, p in m.named_parameters() if p.requires_grad}

    expected, actual = gather_kept(grads(full), kept, layout), grads(pruned)
    assert expected.keys() == actual.keys()
    for name, grad in actual.items():
        assert grad.shape == expected[name].shape, name
        assert torch.allclose(grad, expected[name], rtol=0, atol=1e-5), name
    a_q = f"{PREFIX}{head_map.blocks[0].projections['query']}.lora_A.default.weight"
    assert actual[a_q].shape[0] == int(kept[0].sum()) * r_h and float(actual[a_q].abs().sum()) > 0
