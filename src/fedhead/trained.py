"""A run's trained global model, loaded back from its run directory (what `fedhead evaluate` and `fedhead export`
start from).

The model is the run's config (config.json) rebuilt with `build_run_model`, then its last checkpoint's trainable
state loaded into it: the state that resuming continues from, written after every round, so an unfinished run has a
model too. The frozen parts (the base weights, and LoRA A with `lora.freeze_a`) come from the model files and the
seed exactly as in training (a frozen A of a warm-started run: from the run it started from). Label names come from
partition.json, written when the run started.

`starting_state` is what a warm-started run (`model.init_from`) begins from: that run's adapter tensors.

`consensus_mask_of_run` is the head mask a pruned deployment of that model keeps: the consensus
(`fedhead.heads.pruning.consensus_heads_mask`) of the kept-head masks its clients uploaded in the last rounds,
as metrics.jsonl records them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from fedhead.config import Config, ConfigError
from fedhead.federated.state import State, load_state_, state_misfit, trainable_state
from fedhead.heads.pruning import consensus_heads_mask
from fedhead.models import LoadedModel, build_model
from fedhead.models.loading import is_adapter_parameter, load_tokenizer
from fedhead.run_dir import RunDir
from fedhead.run_metrics import client_head_masks


@dataclass
class TrainedRun:
    """The global model of a run directory after its last checkpointed round.

    cfg: the run's config (its `device` possibly replaced); lm: the LoRA model holding the trained state, in eval
    mode; label_names: the classes in the order of the classifier's outputs (classification) or the label words
    (text-to-text classification; empty for free-text generation); round: the checkpoint's round.
    """

    cfg: Config
    lm: LoadedModel
    label_names: list[str]
    round: int
    path: Path


def load_trained(run_dir: str | Path, device: str | None = None, tail_average: bool | None = False) -> TrainedRun:
    """Rebuild the global model of `run_dir` from its config and last checkpoint (see the module docstring).

    Args:
        run_dir: a run directory (config.json, partition.json, checkpoint.safetensors).
        device: where to put the model ('cpu', 'cuda', ...; default: the run's `device`).
        tail_average: the tail-averaged model (`federated.tail_average_rounds`) instead of the last round's; None:
            the tail-averaged one when the checkpoint holds a complete one, else the last round's.

    Raises:
        ConfigError: no run directory, a damaged config.json or partition.json, no checkpoint yet, or (with
            tail_average) a run that has no complete tail average.
    """
    path = Path(run_dir)
    rd = RunDir(path)
    cfg = rd.read_config()
    if device is not None:
        cfg = cfg.model_copy(update={"device": device})
    label_names = rd.read_label_names()
    checkpoint = rd.load_checkpoint()
    if checkpoint is None:
        raise ConfigError(f"{path} has no readable checkpoint ({rd.checkpoint_file.name}): the run has not "
                          "finished a round")
    state = checkpoint.state
    if tail_average is not False:
        averaged = checkpoint.tail_averaged_state()
        if averaged is None and tail_average:
            raise ConfigError(f"{path} has no complete tail average: the run needs federated.tail_average_rounds "
                              "> 0 and to have finished its last round")
        state = state if averaged is None else averaged
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = load_tokenizer(cfg)
    lm = build_run_model(cfg, len(label_names), tokenizer)
    misfit = state_misfit(state, trainable_state(lm.model))
    if misfit is not None:
        raise ConfigError(f"the checkpoint of {path} does not fit the run's config (was config.json edited?): "
                          f"{misfit}")
    load_state_(lm.model, state)
    lm.model.eval()
    return TrainedRun(cfg=cfg, lm=lm, label_names=label_names, round=checkpoint.round, path=path)


def build_run_model(cfg: Config, num_labels: int = 0, tokenizer: PreTrainedTokenizerBase | None = None
                    ) -> LoadedModel:
    """The model of a run: `build_model`, started from the adapter of the run `model.init_from` names
    (`starting_state`) when it names one. Every driver builds its run's model here.

    Raises:
        ConfigError: `model.init_from` names no run directory, an unfinished run (no checkpoint), or a run whose
            adapter does not fit this run's model.
    """
    if cfg.model.init_from is None:
        return build_model(cfg, num_labels, tokenizer)
    try:
        return build_model(cfg, num_labels, tokenizer, adapter=starting_state(cfg.model.init_from))
    except ConfigError as err:
        raise ConfigError(f"model.init_from = {cfg.model.init_from}: {err}") from None


def starting_state(run_dir: str | Path) -> State:
    """The adapter a run with `model.init_from = run_dir` starts from: every adapter parameter of that run's global
    model (`is_adapter_parameter`: LoRA A and B, the classifier), including the ones it froze, on the CPU. The
    model is the tail average when the run has a complete one, else its last checkpointed round; it is rebuilt
    with `load_trained`, so a run that itself started from another run brings that run's frozen tensors along.

    Raises:
        ConfigError: `run_dir` is no run directory or has no checkpoint (`load_trained`).
    """
    path = Path(run_dir).resolve()
    checkpoint = RunDir(path).checkpoint_file
    return _starting_state(str(path), checkpoint.stat().st_mtime_ns if checkpoint.exists() else 0)


@functools.lru_cache(maxsize=2)  # every Flower client of a simulation builds the model: read the source once
def _starting_state(path: str, checkpoint_mtime: int) -> State:
    del checkpoint_mtime  # in the key only: a source that moved on is read again
    threads = torch.get_num_threads()
    try:  # load_trained sets the source's threads; this run keeps its own
        source = load_trained(path, device="cpu", tail_average=None)
    finally:
        torch.set_num_threads(threads)
    return {name: p.detach().clone() for name, p in source.lm.model.named_parameters() if is_adapter_parameter(name)}


def consensus_mask_of_run(run_dir: str | Path, sparsity: float, window: int = 5) -> torch.Tensor:
    """The heads a pruned deployment of the run's global model keeps: bool [blocks, heads], ceil((1 - sparsity) *
    heads) of every block, ranked by how often the client updates of the last `window` rounds kept them, ties by
    their mean head score (`consensus_heads_mask`, per block). A run whose clients kept every head (sparsity 0)
    gives the heads of highest mean score; if they did not score them either (a dense run scores heads only when
    the server weighs heads by importance), nothing ranks the heads and the run is refused.

    Args:
        run_dir: a run directory whose metrics.jsonl holds at least one round of client updates.
        sparsity: the fraction of heads removed, in (0, 1).
        window: how many of the last rounds' updates vote (>= 1).

    Raises:
        ConfigError: a sparsity outside (0, 1), a window < 1, no run directory, no client update in its metrics,
            or updates that kept every head with equal scores.
    """
    if not 0 < sparsity < 1:
        raise ConfigError(f"pruned sparsity must be in (0, 1), got {sparsity}")
    if window < 1:
        raise ConfigError(f"the consensus window must be at least one round, got {window}")
    RunDir(run_dir).read_config()
    kept, scores = client_head_masks(RunDir(run_dir).metrics(), window)
    if bool(kept.all()) and bool((scores == scores.flatten()[0]).all()):
        raise ConfigError(f"the client updates of the last {window} rounds kept every head and did not score them: "
                          "nothing ranks the heads for a pruned deployment (bench/pruned_deployment.py --ranking "
                          "scores them on the model itself)")
    return consensus_heads_mask(kept, scores, sparsity)
