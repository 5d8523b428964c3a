"""The run directory: resolved config, metrics.jsonl, checkpoints, final adapter and summary.

Checkpoints are written atomically (temporary file, fsync, rename), so a run killed at any moment leaves
either the previous checkpoint or the new one, never a torn file. Resuming reads the last checkpoint and
drops the metrics lines of rounds after it.

What a resume trusts: each checkpoint pins the config it was written with (its metadata's "config"), so a
config.json edited since is refused (`accept_config`; only the rounds and evaluation-only options may change);
a checkpoint whose tensors do not fit the config, and a metrics.jsonl that lost lines of checkpointed rounds
(`accept_metrics`), are refused too. Other commands never write the run's files (`refuse_run_file`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fedhead.config import Config, ConfigError, config_from_dict
from fedhead.federated.payload import decode_state_with_metadata, encode_state
from fedhead.federated.state import State
from fedhead.run_metrics import read_metrics

CHECKPOINT = "checkpoint.safetensors"
PREVIOUS = "checkpoint.prev.safetensors"
MOMENTS = "server_optimizer/"  # prefix of the server optimiser's tensors in a checkpoint
RESIDUALS = "client_residual/"  # prefix of the clients' error-feedback residuals (federated.upload_bits): /<c>/<name>
METRICS = "metrics.jsonl"
RUN_FILES = ("config.json", METRICS, CHECKPOINT, PREVIOUS, "summary.json", "partition.json", "adapter")

log = logging.getLogger("fedhead")


def checkpoint_parts(saved: State) -> tuple[State, State, dict[int, State]]:
    """A checkpoint's tensors (its tail-average sums already removed) as (global state, server optimiser moments,
    each client's error-feedback residual)."""
    state: State = {}
    moments: State = {}
    residuals: dict[int, State] = {}
    for key, value in saved.items():
        if key.startswith(MOMENTS):
            moments[key[len(MOMENTS):]] = value
        elif key.startswith(RESIDUALS):
            client, _, name = key[len(RESIDUALS):].partition("/")
            residuals.setdefault(int(client), {})[name] = value
        else:
            state[key] = value
    return state, moments, residuals


def checkpoint_tensors(state: State, moments: State, residuals: dict[int, State]) -> State:
    """Inverse of `checkpoint_parts`: one flat tensor dict to checkpoint."""
    saved = {**state, **{MOMENTS + k: v for k, v in moments.items()}}
    for client, residual in residuals.items():
        saved.update({f"{RESIDUALS}{client}/{k}": v for k, v in residual.items()})
    return saved


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def refuse_run_file(path: Path, option: str) -> None:
    """Raise ConfigError when writing `path` would replace a file of a run directory (a folder with a
    config.json): one of RUN_FILES or anything under its adapter/. Only the run's own writer (this module)
    writes those; a command's output beside them (e.g. evaluate.STEM.json) is fine."""
    resolved = Path(path).resolve()
    for folder in resolved.parents:
        if (folder / "config.json").is_file():
            name = resolved.relative_to(folder).parts[0]
            if name in RUN_FILES:
                raise ConfigError(f"{option} {path} would replace {name} of the run in {folder}: give a path "
                                  "outside the run's own files")
            return


class RunDir:
    """Files of one run under `out/<run-name>/`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def holds_a_run(self) -> bool:
        """Whether the folder holds results of a run (metrics, checkpoints, summary or adapter); a config.json
        alone (a run that never started, or the Flower engine's handover to its ServerApp) is not one."""
        return self.path.is_dir() and any((self.path / n).exists() for n in RUN_FILES[1:] if n != "partition.json")

    def create(self, config_json: str, overwrite: bool = False) -> None:
        """Start a fresh run here. A folder holding another run is refused (ConfigError) unless `overwrite`,
        which deletes that run's files first: two runs are never mixed."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path} is a file, not a run directory")
        if self.holds_a_run():
            if not overwrite:
                raise ConfigError(f"{self.path} holds another run: continue it with --resume {self.path}, or "
                                  "start afresh with --overwrite (its files are replaced)")
            for name in RUN_FILES:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self.remove_temporary_files()
        atomic_write(self.path / "config.json", config_json.encode())

    def remove_temporary_files(self) -> None:
        """Delete the temporary files of writes a kill interrupted (`.NAME.*` beside NAME)."""
        if self.path.is_dir():
            for tmp in self.path.glob(".*.*"):
                if tmp.is_file() and tmp.name[1:].split(".")[0] in {n.split(".")[0] for n in RUN_FILES}:
                    tmp.unlink(missing_ok=True)

    def accept_config(self, cfg: Config, last_round: int = 0, pinned: dict[str, Any] | None = None) -> None:
        """Check that `cfg` may resume this run after `last_round`; nothing is written (see `commit_config`).

        `pinned` is the config the run's checkpoint was written with (its metadata, `checkpoint_meta`): a
        config.json edited since cannot change the resumed run. Without one (a checkpoint older than the pin)
        config.json is the reference. Only the rounds (to extend a finished run or shorten an unfinished one),
        the run name, the output folder and the evaluation-only options (federated.tail_average_rounds,
        heads.eval_pruned and its window) may differ (RESUMABLE); anything else raises ConfigError.
        """
        path = self.path / "config.json"
        self.remove_temporary_files()
        if pinned is not None:
            try:
                stored = _resumable(config_from_dict(pinned).model_dump(mode="json"))
            except (ConfigError, ValueError, TypeError) as err:
                raise ConfigError(f"the checkpoint of {self.path} holds a damaged config ({err})") from None
            given = _resumable(cfg.model_dump(mode="json"))
            changed = sorted(k for k in given if stored.get(k) != given[k])
            if changed:
                raise ConfigError(
                    f"cannot resume {self.path}: its config differs from the one its checkpoint (round {last_round}) "
                    f"was written with in {changed} (was config.json edited?); a resume may change "
                    "only the rounds (--resume RUN --rounds N): start a new run for other settings")
        elif path.exists():
            try:
                raw = json.loads(path.read_text())
            except (ValueError, UnicodeError) as err:
                raise ConfigError(f"{path} is damaged ({type(err).__name__}: {err})") from None
            # validating fills an option newer than the run's config.json with its default: what the run did
            stored = _resumable(config_from_dict(raw).model_dump(mode="json"))
            given = _resumable(cfg.model_dump(mode="json"))
            changed = sorted(k for k in given if stored[k] != given[k])
            if changed:
                raise ConfigError(f"cannot resume {self.path}: the config differs in {changed}; "
                                  "only the rounds may change")
        if cfg.federated.rounds < last_round:
            raise ConfigError(f"cannot resume {self.path} with {cfg.federated.rounds} rounds: it has run {last_round}")

    def accept_metrics(self, last_round: int) -> None:
        """Check that metrics.jsonl holds a line for every round up to `last_round`, the checkpoint's: a resumed
        run's summary counts its rounds, bytes and FLOPs from these lines, and lost ones cannot be rebuilt
        (ConfigError naming them; lines after the checkpoint, or a line torn by a kill after it, are dropped)."""
        found = {m.get("round") for m in self.metrics() if isinstance(m, dict)}
        missing = [r for r in range(last_round + 1) if r not in found]
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            raise ConfigError(
                f"cannot resume {self.path}: its {METRICS} lacks the lines of rounds {shown} that its checkpoint "
                f"(round {last_round}) has done (the file was deleted, cut or edited), and the history of a round "
                f"cannot be rebuilt: restore {METRICS}, or start afresh with --overwrite")

    def commit_config(self, cfg: Config) -> None:
        """Record a resumed run's config (its rounds may have changed) and drop the summary it supersedes;
        called once the resumed run has done its first new round, so a resume that fails earlier leaves the
        run as it was."""
        atomic_write(self.path / "config.json", cfg.model_dump_json(indent=2).encode())
        (self.path / "summary.json").unlink(missing_ok=True)

    def write_json(self, name: str, data: Any) -> None:
        atomic_write(self.path / name, json.dumps(data, indent=2).encode())

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def append_metrics(self, line: dict[str, Any]) -> None:
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path / METRICS)

    def truncate_metrics(self, last_round: int) -> None:
        """Keep only the metrics of rounds up to `last_round` (resume)."""
        kept = [m for m in self.metrics() if isinstance(m, dict) and m.get("round", 0) <= last_round]
        atomic_write(self.path / METRICS, "".join(json.dumps(m) + "\n" for m in kept).encode())

    def save_checkpoint(self, state: State, meta: dict[str, Any]) -> None:
        """One file holds the state and its metadata (round, RNG, client stats), so they never disagree.

        The previous checkpoint is kept as checkpoint.prev.safetensors, the fallback if the newest is damaged.
        """
        current = self.path / CHECKPOINT
        if current.exists():
            os.replace(current, self.path / PREVIOUS)
        atomic_write(current, encode_state(state, {"fedhead_checkpoint": json.dumps(meta)}))

    def load_checkpoint(self) -> tuple[State, dict[str, Any]] | None:
        """The newest readable checkpoint (state, metadata); a damaged one is reported and the previous one used."""
        found = self.newest_checkpoint()
        return None if found is None else found[1:]

    def newest_checkpoint(self) -> tuple[Path, State, dict[str, Any]] | None:
        """(its file, state, metadata) of the newest readable checkpoint: checkpoint.safetensors, or
        checkpoint.prev.safetensors when the newest is damaged (reported); None when there is none."""
        for name in (CHECKPOINT, PREVIOUS):
            path = self.path / name
            if not path.exists():
                continue
            try:
                state, metadata = decode_state_with_metadata(path.read_bytes())
                return path, state, json.loads(metadata["fedhead_checkpoint"])
            except Exception as err:  # noqa: BLE001 - any damage means: fall back
                log.warning("checkpoint %s is damaged (%s: %s); trying the previous one", path,
                            type(err).__name__, err)
        return None


def _resumable(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config flattened to dotted keys, without what a resumed run may change."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value

    walk("", config)
    # the rounds, the names, and what only evaluates the global model without changing it
    for key in ("federated.rounds", "run_name", "out", "federated.tail_average_rounds", "heads.eval_pruned",
                "heads.eval_pruned_window"):
        flat.pop(key, None)
    return flat

