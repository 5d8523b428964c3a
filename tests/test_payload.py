"""Payloads: real safetensors bytes, round trips, and the upload saving of head slicing and freeze_a."""

import pytest
import torch

from fedhead.config import Config
from fedhead.federated.payload import ClientUpdate, decode_update, encode_state, encode_update
from fedhead.federated.state import trainable_state
from fedhead.heads.pruning import kept_heads_mask
from fedhead.models import build_model
from fedhead.models.slicing import gather_kept


def _upload(lm, sparsity: float) -> bytes:
    state = trainable_state(lm.model)
    scores = torch.rand(lm.head_map.num_blocks, lm.head_map.num_heads, generator=torch.Generator().manual_seed(0))
    kept = kept_heads_mask(scores, sparsity)
    update = ClientUpdate(3, 100, kept, scores, gather_kept(state, kept, lm.layout), 1.0, 0.5, 0.7, {"steps": 2})
    return encode_update(update)


@pytest.fixture(scope="module")
def minilm_models():
    return build_model(Config(), 3), build_model(Config(lora={"freeze_a": True}), 3)


def test_round_trip_is_exact(minilm_models):
    lm, _ = minilm_models
    blob = _upload(lm, 0.5)
    update = decode_update(blob)
    assert update.client_id == 3 and update.num_examples == 100 and update.stats == {"steps": 2}
    assert int(update.kept_heads.sum()) == 36
    state = trainable_state(lm.model)
    expected = gather_kept(state, update.kept_heads, lm.layout)
    assert all(torch.equal(update.tensors[k], expected[k]) for k in expected)


def test_upload_bytes_at_90_percent_sparsity(minilm_models):
    lm, frozen = minilm_models
    dense = len(_upload(lm, 0.0))
    assert 74_883 * 4 < dense < 74_883 * 4 * 1.02  # float32 values plus a small header
    sparse = len(_upload(lm, 0.9))
    sparse_frozen = len(_upload(frozen, 0.9))
    assert sparse <= 0.60 * dense  # A stays shared: about 42k of 75k values (the paper's 1.8x)
    assert sparse_frozen <= 0.12 * dense  # only kept B rows and the head: about 5k values
    # freeze_a: A is neither trained nor sent, in either direction
    assert not any(".lora_A." in n for n in trainable_state(frozen.model))
    assert len(encode_state(trainable_state(frozen.model))) < 0.55 * len(encode_state(trainable_state(lm.model)))


def test_frozen_a_is_rebuilt_from_the_seed():
    a = build_model(Config(lora={"freeze_a": True}), 3).model.state_dict()
    b = build_model(Config(lora={"freeze_a": True}), 3).model.state_dict()
    names = [n for n in a if ".lora_A." in n]
    assert names and all(torch.equal(a[n], b[n]) for n in names)


def test_garbage_is_not_an_update():
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own error type
        decode_update(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a fedhead client update"):
        decode_update(encode_state({"x": torch.zeros(2)}))
