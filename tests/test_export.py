"""`fedhead export`: trained runs exported, loaded back by plain transformers in a process that never imports
fedhead, and compared with fedhead's own (unmerged LoRA) model on a batch.

Tolerance: |logits_exported - logits_fedhead| <= ATOL = 1e-5 elementwise. Merging changes the order of float32
sums (W x + s B (A x) against (W + s B A) x) and plain transformers attends with sdpa where fedhead used eager
attention; measured: 0 (BERT, cls), 2e-7 (MiniLM, mean), 4e-7 (LLaMA), 2.4e-6 (T5, logits up to 5).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedhead.cli import app
from fedhead.config import config_from_dict
from fedhead.runners.local import run_simulation
from fedhead.trained import load_trained
from tests.conftest import MNLI_EVAL, MNLI_TRAIN, tiny_config

ATOL = 1e-5
PAIRS = (["The cat sat on the mat.", "Prices rose sharply in the second quarter of the year."],
         ["A cat is sitting.", "Nothing changed."])

# Run in a fresh interpreter: loads each exported directory with transformers alone and saves its logits.
LOADER = """
import json, sys, torch
import transformers
jobs = json.loads(sys.argv[1])
out = {}
for job in jobs:
    auto = getattr(transformers, job["auto_class"])
    trust = {"trust_remote_code": True} if job["remote_code"] else {}
    model = auto.from_pretrained(job["path"], **trust).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(job["path"], **trust)
    if job["task"] == "classification":
        batch = tokenizer(*job["texts"], padding=True, return_tensors="pt")
    else:
        batch = tokenizer(job["texts"][0], padding=True, return_tensors="pt")
        if job["task"] == "seq2seq":
            batch["decoder_input_ids"] = tokenizer(job["texts"][1], padding=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out[job["path"]] = {"logits": model(**batch).logits, "class": type(model).__module__ + "." +
                            type(model).__name__, "id2label": getattr(model.config, "id2label", None)}
assert not any(name == "fedhead" or name.startswith("fedhead.") for name in sys.modules), "fedhead was imported"
torch.save(out, job["save"])
"""


def _fedhead_logits(run_dir: Path, task: str) -> torch.Tensor:
    """Logits of fedhead's model of the run (LoRA unmerged, as trained) on PAIRS."""
    run = load_trained(run_dir, device="cpu")
    tok = run.lm.tokenizer
    if task == "classification":
        batch = tok(*PAIRS, padding=True, return_tensors="pt")
    else:
        batch = tok(PAIRS[0], padding=True, return_tensors="pt")
        if task == "seq2seq":
            batch["decoder_input_ids"] = tok(PAIRS[1], padding=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return run.lm.model(**batch).logits


def _load_without_fedhead(exports: list[dict], tmp_path: Path) -> dict:
    save = tmp_path / "loaded.pt"
    jobs = [{**job, "texts": PAIRS, "save": str(save)} for job in exports]
    subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs)], check=True, capture_output=True, text=True,
                   cwd=tmp_path)
    return torch.load(save)


def _export(run_dir: Path, out: Path) -> dict:
    result = CliRunner().invoke(app, ["export", str(run_dir), str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "fedhead_export.json").read_text())
    return {"path": str(out), "auto_class": info["load_with"].split(".")[-1], "remote_code": info["trust_remote_code"],
            "task": info["task"]}


def _tiny_run(kind: str, tmp_path: Path, model_dir: str) -> tuple[Path, str]:
    """A one-round run (two local steps, so LoRA B, the classifier and the pooler are trained) of `kind`."""
    federated = {"rounds": 1, "local_steps": 2, "clients_per_round": 1, "batch_size": 8, "learning_rate": 1e-2}
    data = {"train_size": 16, "eval_size": 2}
    if kind in ("minilm-mean", "bert-cls"):
        pooling = {"pooling": "cls", "train_pooler": True} if kind == "bert-cls" else {"pooling": "mean"}
        cfg = tiny_config(model_dir, tmp_path, model={"max_length": 32, **pooling}, federated=federated, data=data,
                          partition={"num_clients": 1, "method": "iid"}, heads={"samples": 4})
        task = "classification"
    else:
        task = "seq2seq" if kind == "t5" else "causal_lm"
        cfg = config_from_dict({
            "model": {"name": model_dir, "task": task, "max_length": 32, "max_target_length": 4},
            "data": {"train": str(MNLI_TRAIN), "eval": str(MNLI_EVAL), **data},
            "generation": {"metrics": ["accuracy"], "max_new_tokens": 2},
            "partition": {"method": "iid", "num_clients": 1}, "federated": federated, "heads": {"samples": 4},
            "out": str(tmp_path)})
    run_simulation(cfg, tmp_path / kind)
    return tmp_path / kind, task


@pytest.mark.parametrize("kind, remote_code, expected_class", [
    ("minilm-mean", True, "modeling_pooled_classifier.PooledClassifier"),  # the default pooling: the custom head
    ("bert-cls", False, "transformers.models.bert.modeling_bert.BertForSequenceClassification"),
    ("t5", False, "transformers.models.t5.modeling_t5.T5ForConditionalGeneration"),
    ("llama", False, "transformers.models.llama.modeling_llama.LlamaForCausalLM"),
])
def test_exported_model_loads_with_plain_transformers_and_matches(kind, remote_code, expected_class, tmp_path,
                                                                   request):
    # Prepare: MiniLM (pretrained) with mean pooling, the tiny BERT with a trained [CLS] pooler, a tiny T5 and
    # a tiny LLaMA, one round each
    model_dir = {"minilm-mean": "minilm", "bert-cls": "tiny_bert_dir", "t5": "tiny_t5_dir", "llama": "tiny_llama_dir"}
    name = model_dir[kind]
    run_dir, task = _tiny_run(kind, tmp_path, name if name == "minilm" else request.getfixturevalue(name))
    # Execute
    export = _export(run_dir, tmp_path / "out")
    loaded = _load_without_fedhead([export], tmp_path)[str(tmp_path / "out")]
    # Assert
    assert export["remote_code"] == remote_code and loaded["class"].endswith(expected_class)
    if task == "classification":
        assert loaded["id2label"] == {0: "contradiction", 1: "entailment", 2: "neutral"}
    torch.testing.assert_close(loaded["logits"], _fedhead_logits(run_dir, task), atol=ATOL, rtol=0)


def test_exported_weights_hold_the_merged_lora(tiny_bert_dir, tmp_path):
    """The LoRA targets (query, value) moved away from the base weights, the other projections did not."""
    run_dir, _ = _tiny_run("bert-cls", tmp_path, tiny_bert_dir)
    _export(run_dir, tmp_path / "out")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(Path(tiny_bert_dir) / "model.safetensors")
    for projection, moved in [("query", True), ("value", True), ("key", False)]:
        name = f"encoder.layer.0.attention.self.{projection}.weight"
        assert torch.equal(exported[f"bert.{name}"], base[name]) != moved, projection


def test_export_refuses_a_used_folder_and_a_run_without_checkpoint(tiny_bert_dir, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.json").write_text(tiny_config(tiny_bert_dir, tmp_path).model_dump_json())
    (tmp_path / "fresh" / "partition.json").write_text('{"label_names": ["a", "b"]}')
    for run_dir, out, expected in [(tmp_path / "fresh", tmp_path / "used", "not an empty directory"),
                                   (tmp_path / "fresh", tmp_path / "new", "no readable checkpoint"),
                                   (tmp_path / "nothing", tmp_path / "new", "no such run directory")]:
        result = CliRunner().invoke(app, ["export", str(run_dir), str(out)])
        assert result.exit_code == 2 and expected in result.output, result.output


def test_pruned_export_is_refused_in_one_line(tmp_path):
    """Plain transformers 5 has no per-layer head counts (and no config.pruned_heads): nothing is written."""
    # Execute
    result = CliRunner().invoke(app, ["export", str(tmp_path / "any-run"), str(tmp_path / "out"), "--pruned", "0.5"])
    # Assert
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "cannot load a model whose blocks lost heads" in error[0], result.output
    assert not (tmp_path / "out").exists()
