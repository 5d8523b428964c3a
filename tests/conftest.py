"""Shared fixtures: tiny randomly initialised BERT, T5 and LLaMA models with real tokenizers (MiniLM's, t5-small's),
and the shared data."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from fedhead.config import Config, config_from_dict
from fedhead.models.loading import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MNLI_TRAIN = SHARED / "data/mnli/train.jsonl"
MNLI_EVAL = SHARED / "data/mnli/validation_matched.jsonl"
T5_TOKENIZER = SHARED / "models/t5-small-tokenizer"

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the 2 cores: one thread each, subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    return resolve_model_path("minilm")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_path) -> str:
    """A 2-layer, 4-head BERT (hidden 32) with random weights, saved beside MiniLM's tokenizer."""
    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def t5_tokenizer():
    return AutoTokenizer.from_pretrained(T5_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, t5_tokenizer) -> str:
    """A 2+2-layer, 4-head T5 (d_model 64) with random weights, saved beside the real t5-small tokenizer."""
    path = tmp_path_factory.mktemp("tiny_t5")
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=32128, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                   num_decoder_layers=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(cfg).save_pretrained(path)
    t5_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, t5_tokenizer) -> str:
    """A 2-layer LLaMA with grouped-query attention (8 query heads, 2 KV heads), random weights."""
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(path)
    t5_tokenizer.save_pretrained(path)
    return str(path)


def tiny_config(model_dir: str, tmp_path: Path, **sections) -> Config:
    """A seconds-long federated config on the tiny BERT and a small MultiNLI subset."""
    data = {
        "model": {"name": model_dir, "max_length": 64},
        "data": {"train": str(MNLI_TRAIN), "eval": str(MNLI_EVAL), "train_size": 240, "eval_size": 64},
        "partition": {"method": "dirichlet", "alpha": 1.0, "num_clients": 6},
        "federated": {"rounds": 2, "clients_per_round": 3, "local_steps": 2, "batch_size": 8},
        "heads": {"samples": 8},
        "out": str(tmp_path),
        "run_name": "tiny",
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return config_from_dict(data)


def gated_and_pruned(base, head_map, kept: torch.Tensor, prefix: str, attn: str | None = None):
    """Two copies of a LoRA model: one with the heads not in `kept` gated to zero (forward hooks), one with
    them physically pruned; `attn` sets the attention kernel of both."""
    import copy

    from fedhead.models.slicing import gate_heads, prune_heads_

    full = copy.deepcopy(base)
    if attn is not None:
        full.base_model.model.set_attn_implementation(attn)
    pruned = copy.deepcopy(full)
    prune_heads_(pruned, head_map, kept, prefix)
    gate_heads(full, head_map, kept.float(), prefix)
    return full, pruned


def pruned_and_gated_backward(lm, kept: torch.Tensor, batch: dict):
    """Forward and backward `batch` through two copies of `lm.model` (eval mode): the heads not in `kept` gated to
    zero (hooks removed afterwards), and physically pruned. Returns (gated output, pruned output, gated grads,
    pruned grads); a trainable parameter outside the graph (e.g. LoRA A of a block with no head left) gets 0."""
    from fedhead.models.slicing import gate_heads, prune_heads_

    def grads(model):
        return {n: torch.zeros_like(p) if p.grad is None else p.grad
                for n, p in model.named_parameters() if p.requires_grad}

    full = copy.deepcopy(lm.model).eval()
    handles = gate_heads(full, lm.head_map, kept.float(), lm.prefix)
    ref = full(**batch)
    ref.loss.backward()
    for h in handles:
        h.remove()
    pruned = copy.deepcopy(lm.model).eval()
    prune_heads_(pruned, lm.head_map, kept, lm.prefix)
    out = pruned(**batch)
    out.loss.backward()
    return ref, out, grads(full), grads(pruned)


def load_bench(name: str):
    """The module bench/<name>.py (bench scripts are no package; they import their neighbour common.py)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_metrics(run_dir: Path) -> list[dict]:
    """The metrics lines of a run directory."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def strip_timings(metrics: list[dict]) -> list[dict]:
    """Metrics without wall-clock fields (keys containing 'seconds'), for equality across runs."""
    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if "seconds" not in k}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        return obj
    return [clean(m) for m in metrics]


def write_tiny_toml(path: Path, model_dir: str, **sections: dict) -> Path:
    """A TOML config file for CLI tests: the tiny BERT on a small MultiNLI subset, `sections` overriding."""
    tables: dict[str, dict] = {
        "model": {"name": model_dir, "max_length": 48},
        "data": {"train": str(MNLI_TRAIN), "eval": str(MNLI_EVAL), "train_size": 120, "eval_size": 32},
        "partition": {"num_clients": 4},
        "federated": {"rounds": 2, "clients_per_round": 2, "local_steps": 1, "batch_size": 8},
        "heads": {"samples": 8},
    }
    for name, values in sections.items():
        tables.setdefault(name, {}).update(values)
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]  # JSON scalars are TOML
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_lora(tiny_bert_dir, tmp_path_factory):
    """The tiny BERT with LoRA on q, k, v and o (B drawn at random, so every adapter acts) and a 2-pair batch."""
    from fedhead.models import build_model

    cfg = tiny_config(tiny_bert_dir, tmp_path_factory.mktemp("lora"),
                      lora={"target_modules": ["query", "key", "value", "output"]})
    lm = build_model(cfg, 3)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = dict(lm.tokenizer(["the cat sat on the mat", "hi"], ["a dog", "yes it is"], padding=True,
                              return_tensors="pt"))
    batch["labels"] = torch.tensor([0, 2])
    return lm, batch
