"""`fedhead export`: a run's trained global model as a standalone transformers model directory.

The model is the run's last checkpoint (`fedhead.trained`), its LoRA merged into the base weights (peft's
`merge_and_unload`: W <- W + (alpha / r) B A), saved with its tokenizer:

- seq2seq / causal_lm runs: the model's own class, loaded by `AutoModelForSeq2SeqLM` / `AutoModelForCausalLM`.
- classification with `model.pooling = 'cls'` on a BERT encoder: a `BertForSequenceClassification` (the pooler
  over [CLS], then the classifier: what fedhead computes), loaded by `AutoModelForSequenceClassification` with
  no custom code.
- any other classification run, in particular the default 'mean' pooling: no transformers class pools by the
  attention-masked mean, and a `BertForSequenceClassification` would silently pool [CLS] through a pooler the
  run never trained. The directory then holds `modeling_pooled_classifier.py` (torch + transformers only, 70
  lines, `fedhead.models.modeling_pooled_classifier`) and a config of its own model type, so that
  `AutoModelForSequenceClassification.from_pretrained(OUT, trust_remote_code=True)` reproduces fedhead's logits
  and loading without `trust_remote_code` fails loudly instead of pooling wrongly. Without remote code, the
  README.md written beside the weights shows the four lines that compute the same logits from
  `AutoModel.from_config` and the saved tensors.

No pruned export. A model pruned to the consensus head mask (`fedhead evaluate --pruned`) keeps fewer heads per
block than its config declares, and plain transformers 5 has no way to say so: BERT, T5 and LLaMA configs give one
head count for every layer (BERT's head size is even hidden_size / num_attention_heads), and `prune_heads` /
`config.pruned_heads`, which once rebuilt the smaller blocks on load, were removed. So `pruned` is refused rather
than written in a format only fedhead could load.

Classification configs carry the label names (`id2label`, `label2id`). `fedhead_export.json` records the run,
the round, the input format (text fields, prompt, label words) and how to load the directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import BertForSequenceClassification, PreTrainedModel

from fedhead.config import ConfigError
from fedhead.models.headwise import standard_lora_
from fedhead.models.loading import SequenceClassifier
from fedhead.models.modeling_pooled_classifier import PooledClassifier, PooledClassifierConfig
from fedhead.trained import TrainedRun, load_trained

# encoders whose *ForSequenceClassification = pooler + linear
NATIVE_CLS: dict[str, type[PreTrainedModel]] = {"bert": BertForSequenceClassification}
AUTO_CLASS = {"classification": "AutoModelForSequenceClassification", "seq2seq": "AutoModelForSeq2SeqLM",
              "causal_lm": "AutoModelForCausalLM"}


@dataclass
class Export:
    """An exported directory: `path`, the transformers class it holds, the Auto class that loads it and whether
    that needs `trust_remote_code=True`."""

    path: Path
    architecture: str
    auto_class: str
    remote_code: bool


NO_PRUNED_EXPORT = ("--pruned: plain transformers 5 cannot load a model whose blocks lost heads (its configs fix one "
                    "head count for every layer and it removed prune_heads / config.pruned_heads); score the pruned "
                    "model with `fedhead evaluate --pruned` and export the whole one")


def export_run(run_dir: str | Path, out: str | Path, pruned: float | None = None,
               tail_average: bool = False) -> Export:
    """Write the global model of `run_dir` to `out` as a transformers model directory (see the module docstring).

    Args:
        run_dir: a run directory with at least one checkpointed round.
        out: the directory to write; it must not exist or be empty.
        pruned: a pruned export's sparsity; always refused (see the module docstring).
        tail_average: export the run's tail-averaged model (`federated.tail_average_rounds`).

    Raises:
        ConfigError: `pruned` given, no run or checkpoint (or no complete tail average), or `out` is a file or a
            folder holding files.
    """
    if pruned is not None:
        raise ConfigError(NO_PRUNED_EXPORT)
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{target} exists and is not an empty directory: export to a new one")
    run = load_trained(run_dir, device="cpu", tail_average=tail_average)
    standard_lora_(run.lm.model)  # head-wise LoRA's compact factors -> block-diagonal ones, which peft can merge
    merged = run.lm.model.merge_and_unload().eval()  # the base model, each LoRA folded into its Linear
    if run.cfg.model.task == "classification":
        model, remote = _classifier(merged, run)
    else:
        model, remote = merged, False
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    run.lm.tokenizer.save_pretrained(target)
    export = Export(target, type(model).__name__, AUTO_CLASS[run.cfg.model.task], remote)
    _describe(export, run)
    return export


def _classifier(merged: SequenceClassifier, run: TrainedRun) -> tuple[PreTrainedModel, bool]:
    """fedhead's SequenceClassifier (merged) as a transformers model with the run's label names."""
    backbone, pooling = merged.backbone, run.cfg.model.pooling
    labels: dict[str, Any] = {"num_labels": len(run.label_names), "id2label": dict(enumerate(run.label_names)),
              "label2id": {name: i for i, name in enumerate(run.label_names)}}
    native = NATIVE_CLS.get(backbone.config.model_type) if pooling == "cls" else None
    if native is not None:
        config = backbone.config.__class__.from_dict({**backbone.config.to_dict(), **labels})
        model = native(config)
        getattr(model, model.base_model_prefix).load_state_dict(backbone.state_dict())  # encoder + its pooler
        model.get_submodule("classifier").load_state_dict(merged.classifier.state_dict())
        return model.eval(), False
    config = PooledClassifierConfig(encoder=backbone.config.to_diff_dict(), pooling=pooling, **labels)
    PooledClassifierConfig.register_for_auto_class()
    PooledClassifier.register_for_auto_class("AutoModelForSequenceClassification")
    pooled = PooledClassifier(config)
    pooled.encoder.load_state_dict(backbone.state_dict())
    pooled.classifier.load_state_dict(merged.classifier.state_dict())
    return pooled.eval(), True


def _describe(export: Export, run: TrainedRun) -> None:
    """fedhead_export.json (provenance and input format) and a README.md saying how to load the directory."""
    cfg, data = run.cfg, run.cfg.data
    trust = ", trust_remote_code=True" if export.remote_code else ""
    info = {
        "run": str(run.path.resolve()), "round": run.round, "task": cfg.model.task, "base_model": cfg.model.name,
        "architecture": export.architecture, "load_with": f"transformers.{export.auto_class}", "trust_remote_code":
        export.remote_code, "pooling": cfg.model.pooling if cfg.model.task == "classification" else None,
        "text_fields": data.text_fields, "prompt": data.prompt, "label_names": run.label_names,
        "label_words": data.label_words, "max_length": cfg.model.max_length,
    }
    (export.path / "fedhead_export.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = [
        f"# {run.path.name}, round {run.round}, exported by fedhead",
        "",
        f"The global model of the fedhead run `{run.path.name}` after round {run.round}: `{cfg.model.name}` with its "
        f"LoRA adapters merged into the weights ({export.architecture}).",
        "",
        "```python",
        f"from transformers import AutoTokenizer, {export.auto_class}",
        f'model = {export.auto_class}.from_pretrained("{export.path.name}"{trust}).eval()',
        f'tokenizer = AutoTokenizer.from_pretrained("{export.path.name}")',
        "```",
        "",
    ]
    if cfg.model.task == "classification":
        kind = "a text pair" if len(data.text_fields) == 2 else "one text"
        lines += [f"Inputs: the tokenizer applied to {' and '.join(data.text_fields)} ({kind}, truncated to "
                  f"{cfg.model.max_length} tokens). Labels: {', '.join(run.label_names)}."]
    else:
        prompt = f"`{data.prompt}`" if data.prompt else f"the fields {', '.join(data.text_fields)} joined by spaces"
        lines += [f"Inputs: {prompt}" + (", followed by ` ->` (the separator the model learned to continue after)"
                                         if cfg.model.task == "causal_lm" else "") + "."]
    if export.remote_code:
        lines += ["", f"Pooling `{cfg.model.pooling}` has no transformers class: `modeling_pooled_classifier.py` "
                  "(torch and transformers only) computes it, hence `trust_remote_code=True`. The same logits "
                  "without remote code:", "", "```python", "import json, torch", "from safetensors.torch import "
                  "load_file", "from transformers import AutoConfig, AutoModel",
                  f'config = json.load(open("{export.path.name}/config.json"))',
                  f'weights = load_file("{export.path.name}/model.safetensors")',
                  'encoder = AutoModel.from_config(AutoConfig.for_model(**config["encoder"]), '
                  'add_pooling_layer=config["pooling"] == "cls").eval()',
                  'encoder.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("encoder.")})',
                  "h = encoder(**batch).last_hidden_state  # (B, T, D); batch = tokenizer(...)",
                  'mask = batch["attention_mask"].unsqueeze(-1).float()',
                  "pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # 'mean'; 'cls_raw': h[:, 0]",
                  'logits = pooled @ weights["classifier.weight"].T + weights["classifier.bias"]', "```"]
    (export.path / "README.md").write_text("\n".join(lines) + "\n")
