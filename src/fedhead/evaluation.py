"""`fedhead evaluate`: a run's trained global model scored on a dataset file, its labels mapped onto the model's.

The data is read as the run's config reads `data.eval` (a .jsonl/.json/.csv file or a Hub dataset id, the same
text fields, label field, prompt and label words), all of its records, no `eval_size` cut.

Label maps. A file's label names may differ from the model's (`--label-map`, `FILE_LABEL=MODEL_LABEL,...`); one
file label may stand for several model labels (`FILE_LABEL=A|B`). Classification scores each example against
the set G(y) of model labels its file label y stands for (G(y) = {y} for labels not in the map):

    accuracy  = mean_i 1[argmax_c p(c | x_i) in G(y_i)]
    eval_loss = mean_i -log sum_{c in G(y_i)} p(c | x_i)

With singleton sets these are the run loop's accuracy and cross-entropy. A two-way entailment / not_entailment
set (RTE-style) scored with a three-way MNLI model: `not_entailment=neutral|contradiction` counts a prediction
of neutral or of contradiction as not_entailment, as HANS (McCoy et al. 2019) scores MNLI models, and the loss
is that of the two-way model whose not_entailment probability is p(neutral) + p(contradiction). Several file
labels may map to one model label (a five-way sentiment set scored with a two-way model). Text-to-text tasks:
the model's labels are its label words (or the label values of `data.label_words`), and G(y) is the set of
references the generated text is matched against; free-text generation has no labels to map.

Pruned deployment (`--pruned S`). The global model is first physically pruned (`prune_heads_`, LoRA included) to
`consensus_mask_of_run(run, S, window)`: in every block the ceil((1 - S) * heads) heads the clients of the last
`window` rounds kept most often, ties by mean head score. The metrics are then the pruned model's; the result's
"pruned" entry holds the mask and the forward FLOPs of the first evaluation batch for the whole and the pruned
model (`torch.utils.flop_counter`; attention scores are counted under eager attention only).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch

from fedhead.config import Config, ConfigError
from fedhead.data.batching import collate, to_device
from fedhead.data.generation import check_fields as check_generation_fields
from fedhead.data.generation import encode_evaluation, render_inputs
from fedhead.data.loading import DataError, check_fields, label_names_of, load_records, tokenize_split
from fedhead.federated.accounting import count_flops
from fedhead.federated.evaluation import evaluate
from fedhead.models.loading import device_of
from fedhead.models.slicing import prune_heads_
from fedhead.trained import TrainedRun, consensus_mask_of_run, load_trained

LabelMap = dict[str, list[str]]  # file label -> the model labels it stands for
Scorer = Callable[[torch.nn.Module], dict[str, Any]]  # a model -> {"metrics": ..., and "confusion" if any}


def parse_label_map(text: str | None) -> LabelMap:
    """`"a=x,b=y|z"` -> `{"a": ["x"], "b": ["y", "z"]}`; None or "" -> {}. Names are stripped of spaces; a name
    cannot hold ',', '=' or '|'. ConfigError for a malformed pair, an empty name or a file label given twice."""
    mapping: LabelMap = {}
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        source, sep, targets = pair.partition("=")
        names = [t.strip() for t in targets.split("|")]
        if not sep or not source.strip() or not all(names) or "=" in targets:
            raise ConfigError(f"--label-map expects FILE_LABEL=MODEL_LABEL[|MODEL_LABEL...] pairs separated by "
                              f"commas, got '{pair.strip()}'")
        if source.strip() in mapping:
            raise ConfigError(f"--label-map gives file label '{source.strip()}' twice")
        mapping[source.strip()] = names
    return mapping


def evaluate_run(
    run_dir: str | Path,
    data: str,
    label_map: LabelMap | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    pruned: float | None = None,
    window: int = 5,
    tail_average: bool = False,
) -> dict[str, Any]:
    """Score the global model of `run_dir` (its last checkpoint, see `fedhead.trained`) on every record of `data`.

    Args:
        run_dir: the run directory.
        data: a data file (or Hub dataset id, its `data.eval_split`) in the run's data format.
        label_map: file label -> model labels (see the module docstring); default: the file's labels are the model's.
        batch_size: evaluation batch size (default: the run's `federated.eval_batch_size`).
        device: where to evaluate (default: the run's `device`).
        pruned: score the model pruned to the consensus mask at this sparsity, in (0, 1) (module docstring).
        window: with `pruned`, the last rounds whose client masks form the consensus.
        tail_average: score the tail-averaged model (`federated.tail_average_rounds`) instead of the last round's.

    Returns:
        {"run", "round", "data", "examples", "label_map", "metrics": {name: value}} and, for classification,
        "confusion": {file label: {predicted model label: count}}; with `pruned`, "pruned": {"sparsity", "window",
        "kept_heads", "total_heads", "mask" (0/1 [blocks, heads]), "flops_batch_size", "forward_flops": {"whole",
        "pruned"}}, the metrics being the pruned model's.

    Raises:
        ConfigError: no run or checkpoint, a label map naming labels the model does not have, a label map for
            free-text generation, a `pruned` sparsity outside (0, 1), a run without client updates.
        DataError: unreadable data, missing fields, file labels the model does not know.
    """
    mask = consensus_mask_of_run(run_dir, pruned, window) if pruned is not None else None  # before the model loads
    run = load_trained(run_dir, device, tail_average)
    records = load_records(data, run.cfg.data.eval_split)
    size = batch_size or run.cfg.federated.eval_batch_size
    result: dict[str, Any] = {"run": str(run.path), "round": run.round, "data": data, "examples": len(records),
                              "label_map": label_map or {}, "model": "tail_average" if tail_average else "last_round"}
    if run.cfg.model.task == "classification":
        check_fields(records, run.cfg.data, data)
        rows, score = _classification(run, records, data, label_map or {}, size)
    else:
        check_generation_fields(records, run.cfg.data, data)
        rows, score = _generation(run, records, data, label_map or {}, size)
    if mask is not None:
        result["pruned"] = {"sparsity": pruned, "window": window, **_prune_(run, mask, rows[:size])}
    result.update(score(run.lm.model))
    return result


@torch.no_grad()
def _prune_(run: TrainedRun, mask: torch.Tensor, rows: dict[str, list]) -> dict[str, Any]:
    """Prune `run`'s model to `mask` (bool [blocks, heads]) in place; the mask and the forward FLOPs of the batch
    `rows` before and after."""
    model, blocks, heads = run.lm.model, run.lm.head_map.num_blocks, run.lm.head_map.num_heads
    rows = {k: v for k, v in rows.items() if k != "references"}
    batch = collate(rows, run.lm.tokenizer)
    if run.cfg.model.task == "classification":
        batch.pop("labels")  # file-label ids, not the model's
    batch = to_device(batch, device_of(model))
    with count_flops() as whole:
        model(**batch)
    prune_heads_(model, run.lm.head_map, mask, run.lm.prefix)
    with count_flops() as pruned:
        model(**batch)
    return {"kept_heads": int(mask.sum()), "total_heads": blocks * heads, "mask": mask.int().tolist(),
            "flops_batch_size": len(batch["input_ids"]), "forward_flops": {"whole": whole[0], "pruned": pruned[0]}}


def _label_sets(file_labels: list[str], model_labels: list[str], label_map: LabelMap, source: str,
                aliases: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Each file label's set G(y) of model labels; `aliases` names model labels otherwise (label value -> word)."""
    aliases = aliases or {}
    known = set(model_labels)

    def resolve(name: str) -> str | None:
        name = aliases.get(name, name) if name not in known else name
        return name if name in known else None

    for source_label, targets in label_map.items():
        bad = [t for t in targets if resolve(t) is None]
        if bad:
            raise ConfigError(f"--label-map {source_label}=...: {bad} not among the model's labels "
                              f"({', '.join(model_labels)})")
    unknown = [y for y in file_labels if y not in label_map and resolve(y) is None]
    if unknown:
        listed = unknown if len(unknown) <= 20 else [*unknown[:20], f"... {len(unknown)} in all"]
        raise DataError(f"{source}: labels the model does not know: {listed} (the model's labels: "
                        f"{', '.join(model_labels)}); map them with --label-map FILE_LABEL=MODEL_LABEL[|MODEL_LABEL]")
    return {y: [resolve(t) for t in label_map.get(y, [y])] for y in file_labels}  # type: ignore[misc]


def _classification(run: TrainedRun, records: datasets.Dataset, source: str, label_map: LabelMap,
                    batch_size: int) -> tuple[datasets.Dataset, Scorer]:
    """The encoded records and the function scoring a model on them (accuracy, loss and confusion over G(y))."""
    cfg: Config = run.cfg
    file_labels = label_names_of(list(records[cfg.data.label_field]))
    sets = _label_sets(file_labels, run.label_names, label_map, source)
    index = {y: i for i, y in enumerate(file_labels)}
    rows = tokenize_split(records, cfg.data, run.lm.tokenizer, cfg.model.max_length, index, source)
    model_index = {name: i for i, name in enumerate(run.label_names)}
    allowed = torch.zeros(len(file_labels), len(run.label_names), dtype=torch.bool)  # (Y_file, C_model): G(y)
    for y, targets in sets.items():
        allowed[index[y], [model_index[t] for t in targets]] = True

    @torch.no_grad()
    def score(model: torch.nn.Module) -> dict[str, Any]:
        loss_sum, correct = 0.0, 0
        confusion = torch.zeros(len(file_labels), len(run.label_names), dtype=torch.long)
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i : i + batch_size], run.lm.tokenizer)
            gold = batch.pop("labels")  # (B,) file-label ids
            logits = model(**to_device(batch, device_of(model))).logits.float().cpu()  # (B, C)
            log_p = logits.log_softmax(-1)
            ok = allowed[gold]  # (B, C)
            loss_sum -= float(log_p.masked_fill(~ok, float("-inf")).logsumexp(-1).sum())
            predicted = logits.argmax(-1)  # (B,)
            correct += int(ok.gather(1, predicted[:, None]).sum())
            confusion.index_put_((gold, predicted), torch.ones_like(gold), accumulate=True)
        n = len(rows)
        return {
            "metrics": {"accuracy": correct / n, "eval_loss": loss_sum / n},
            "confusion": {y: {c: int(confusion[index[y], j]) for j, c in enumerate(run.label_names)}
                          for y in file_labels},
        }

    return rows, score


def _generation(run: TrainedRun, records: datasets.Dataset, source: str, label_map: LabelMap,
                batch_size: int) -> tuple[datasets.Dataset, Scorer]:
    """The encoded records and the function scoring a model on them: the run loop's evaluation
    (`fedhead.federated.evaluation.evaluate`), references from the label sets (text-to-text classification) or the
    target field."""
    cfg = run.cfg
    if cfg.data.target_field is not None:
        if label_map:
            raise ConfigError(f"--label-map: the run generates free text (data.target_field = "
                              f"'{cfg.data.target_field}'); it has no labels to map")
        references = [[str(t)] for t in records[cfg.data.target_field]]
    else:
        values = [str(v) for v in records[cfg.data.label_field]]
        sets = _label_sets(label_names_of(values), run.label_names, label_map, source, cfg.data.label_words)
        references = [sets[v] for v in values]
    rows = encode_evaluation(render_inputs(records, cfg.data), references, run.lm.tokenizer, cfg.model.task,
                             cfg.model.max_length, cfg.model.max_target_length)

    def score(model: torch.nn.Module) -> dict[str, Any]:
        return {"metrics": evaluate(model, rows, run.lm.tokenizer, batch_size, task=cfg.model.task,
                                    generation=cfg.generation)}

    return rows, score
