"""The run directory's owner: its file names, config.json, metrics.jsonl, the checkpoint's format, the adapter and
the summary. Every other module asks this one for a run's files.

Files of a run (`RunDir`):

    config.json                   the resolved config (`read_config`; `read_config_json` for the raw object)
    metrics.jsonl                 one JSON line a round, round 0 the initial evaluation (`metrics`)
    partition.json                label names, partition sizes, label histograms (`read_label_names`)
    checkpoint.safetensors        the last round's `Checkpoint`; checkpoint.prev.safetensors: the one before
    adapter/                      the final global model as a peft adapter, with adapter/labels.json
    summary.json                  totals and scores of the finished run

Checkpoints are written atomically (temporary file, fsync, rename), so a run killed at any moment leaves
either the previous checkpoint or the new one, never a torn file. Resuming reads the last checkpoint and
drops the metrics lines of rounds after it.

What a resume trusts: each checkpoint pins the config it was written with (`Checkpoint.config`), so a
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedhead.config import Config, ConfigError, config_from_dict
from fedhead.federated.payload import decode_state_with_metadata, encode_state
from fedhead.federated.selection import ClientStats
from fedhead.federated.state import State
from fedhead.federated.tail_average import TailAverage
from fedhead.run_metrics import read_metrics

CONFIG = "config.json"
METRICS = "metrics.jsonl"
PARTITION = "partition.json"
CHECKPOINT = "checkpoint.safetensors"
PREVIOUS = "checkpoint.prev.safetensors"
ADAPTER = "adapter"  # a folder: the peft adapter and LABELS
LABELS = "labels.json"  # in ADAPTER: the label names in the order of the classifier's outputs
SUMMARY = "summary.json"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, PREVIOUS, SUMMARY, PARTITION, ADAPTER)

# The checkpoint file: tensors under these prefixes besides the global state's own names, and one JSON metadata
# entry. Existing run folders are resumed with these names: never change them.
MOMENTS = "server_optimizer/"  # the server optimiser's moments: server_optimizer/<name>
RESIDUALS = "client_residual/"  # the clients' error-feedback residuals (federated.upload_bits): /<c>/<name>
TAIL_AVERAGE = "tail_average/"  # the tail average's running sum (federated.tail_average_rounds): /<name>
METADATA = "fedhead_checkpoint"  # the safetensors metadata key of the JSON metadata

log = logging.getLogger("fedhead")


@dataclass
class Checkpoint:
    """What a run saves after every round: enough to resume it exactly, or to load its global model.

    The file (`to_bytes`, `from_bytes`) is one safetensors file: the global state under its own names, the server
    optimiser's moments under MOMENTS, each client's residual under RESIDUALS<client>/, the tail average's running
    sum under TAIL_AVERAGE; and, as its METADATA entry, the JSON object

        {"round": R, "rng": {...}, "client_stats": {...}, "config": {...},
         "tail_average": {"start": S, "count": N, "complete": bool}}

    ("config" is missing from checkpoints older than the pin, "tail_average" from runs without the average).

    Attributes:
        round: the last round done (>= 1).
        state: the global trainable state after it (name -> tensor).
        rng: the client-selection RNG's `bit_generator.state` after it.
        client_stats: what the server knows of each client (`ClientStats`: last rounds, losses, kept heads).
        config: the run's config as JSON (`Config.model_dump(mode="json")`), pinned: a resume refuses a config.json
            edited since; None for a checkpoint older than the pin.
        server_moments: the server optimiser's state (name -> tensor; empty for plain FedAvg).
        residuals: client id -> its error-feedback residual (name -> tensor; federated.upload_bits < 32).
        tail_average: the tail average's running sum, its first round and count (None: the run has none).
        tail_average_complete: the sum holds every round of the window and the run has done its last round, so
            `tail_average.mean(state)` is the tail-averaged model.
    """

    round: int
    state: State
    rng: dict[str, Any]
    client_stats: ClientStats
    config: dict[str, Any] | None = None
    server_moments: State = field(default_factory=dict)
    residuals: dict[int, State] = field(default_factory=dict)
    tail_average: TailAverage | None = None
    tail_average_complete: bool = False

    def tail_averaged_state(self) -> State | None:
        """The tail-averaged model theta_bar (`TailAverage.mean`, in the dtypes of `state`) when the checkpoint
        holds a complete tail average, else None."""
        if self.tail_average is None or not self.tail_average_complete:
            return None
        return self.tail_average.mean(like=self.state)

    def to_bytes(self) -> bytes:
        """The checkpoint file (layout in the class docstring)."""
        tensors = {**self.state, **{MOMENTS + k: v for k, v in self.server_moments.items()}}
        for client, residual in self.residuals.items():
            tensors.update({f"{RESIDUALS}{client}/{k}": v for k, v in residual.items()})
        meta: dict[str, Any] = {"round": self.round, "rng": self.rng, "client_stats": self.client_stats.to_json()}
        if self.config is not None:
            meta["config"] = self.config
        if self.tail_average is not None:
            tail = self.tail_average
            tensors.update({TAIL_AVERAGE + k: v for k, v in tail.total.items()})
            meta["tail_average"] = {"start": tail.start, "count": tail.count, "complete": self.tail_average_complete}
        return encode_state(tensors, {METADATA: json.dumps(meta)})

    @classmethod
    def from_bytes(cls, blob: bytes) -> Checkpoint:
        """Inverse of `to_bytes`; raises (ValueError, KeyError, ...) on a damaged file."""
        tensors, metadata = decode_state_with_metadata(blob)
        meta = json.loads(metadata[METADATA])
        state: State = {}
        moments: State = {}
        residuals: dict[int, State] = {}
        sums: State = {}
        for key, value in tensors.items():
            if key.startswith(TAIL_AVERAGE):
                sums[key[len(TAIL_AVERAGE):]] = value
            elif key.startswith(MOMENTS):
                moments[key[len(MOMENTS):]] = value
            elif key.startswith(RESIDUALS):
                client, _, name = key[len(RESIDUALS):].partition("/")
                residuals.setdefault(int(client), {})[name] = value
            else:
                state[key] = value
        info = meta.get("tail_average")
        tail = TailAverage(start=int(info["start"]), count=int(info["count"]), total=sums) if info else None
        return cls(round=int(meta["round"]), state=state, rng=meta["rng"],
                   client_stats=ClientStats.from_json(meta["client_stats"]), config=meta.get("config"),
                   server_moments=moments, residuals=residuals, tail_average=tail,
                   tail_average_complete=bool(info and info.get("complete")))


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
        if (folder / CONFIG).is_file():
            name = resolved.relative_to(folder).parts[0]
            if name in RUN_FILES:
                raise ConfigError(f"{option} {path} would replace {name} of the run in {folder}: give a path "
                                  "outside the run's own files")
            return


class RunDir:
    """Files of one run under `out/<run-name>/` (the module docstring lists them)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def partition_file(self) -> Path:
        return self.path / PARTITION

    @property
    def checkpoint_file(self) -> Path:
        """The newest checkpoint (the previous one is PREVIOUS beside it)."""
        return self.path / CHECKPOINT

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY

    def holds_a_run(self) -> bool:
        """Whether the folder holds results of a run (metrics, checkpoints, summary or adapter); a config.json
        alone (a run that never started, or the Flower engine's handover to its ServerApp) is not one."""
        return self.path.is_dir() and any((self.path / n).exists() for n in RUN_FILES if n not in (CONFIG, PARTITION))

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
        atomic_write(self.config_file, config_json.encode())

    def remove_temporary_files(self) -> None:
        """Delete the temporary files of writes a kill interrupted (`.NAME.*` beside NAME)."""
        if self.path.is_dir():
            for tmp in self.path.glob(".*.*"):
                if tmp.is_file() and tmp.name[1:].split(".")[0] in {n.split(".")[0] for n in RUN_FILES}:
                    tmp.unlink(missing_ok=True)

    def read_config_json(self) -> dict[str, Any]:
        """config.json as the JSON object it holds, not validated (`fedhead report` reads runs this way).

        Raises:
            ConfigError: no such folder, no config.json in it, or a config.json that is no JSON object.
        """
        if not self.path.is_dir():
            raise ConfigError(f"{self.path}: no such run directory")
        if not self.config_file.is_file():
            raise ConfigError(f"{self.path} is not a run directory (no {CONFIG})")
        try:
            raw = json.loads(self.config_file.read_text())
        except (ValueError, UnicodeError) as err:
            raise ConfigError(f"{self.config_file} is damaged ({type(err).__name__}: {' '.join(str(err).split())})"
                              ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.config_file} is damaged (a JSON {type(raw).__name__}, not an object)")
        return raw

    def read_config(self, rounds: int | None = None) -> Config:
        """The run's config (config.json, validated; an option newer than the file gets its default, which is
        what the run did). `rounds` replaces federated.rounds before validating (`fedhead run --resume --rounds`).

        Raises:
            ConfigError: as `read_config_json`, or a config.json that is no valid config (with `rounds`).
        """
        raw = self.read_config_json()
        if rounds is not None:
            if not isinstance(raw.get("federated"), dict):
                raise ConfigError(f"{self.config_file} is damaged (no federated section)")
            raw["federated"]["rounds"] = rounds
        try:
            return config_from_dict(raw)
        except ConfigError as err:
            raise ConfigError(f"{self.config_file}: {err}") from None

    def read_label_names(self) -> list[str]:
        """The label names partition.json records (the classes in the order of the classifier's outputs; the
        label words of text-to-text classification; empty for free-text generation).

        Raises:
            ConfigError: no partition.json (the run never started), or a damaged one.
        """
        try:
            return [str(n) for n in self.read_json(PARTITION)["label_names"]]
        except FileNotFoundError:
            raise ConfigError(f"{self.path} has no {PARTITION}: the run never started") from None
        except (ValueError, UnicodeError, KeyError, TypeError) as err:
            raise ConfigError(f"{self.partition_file} is damaged ({type(err).__name__}: {err})") from None

    def accept_config(self, cfg: Config, last_round: int = 0, pinned: dict[str, Any] | None = None) -> None:
        """Check that `cfg` may resume this run after `last_round`; nothing is written (see `commit_config`).

        `pinned` is the config the run's checkpoint was written with (`Checkpoint.config`): a config.json edited
        since cannot change the resumed run. Without one (a checkpoint older than the pin) config.json is the
        reference. Only the rounds (to extend a finished run or shorten an unfinished one), the run name, the
        output folder and the evaluation-only options (federated.tail_average_rounds, heads.eval_pruned and its
        window) may differ (RESUMABLE); anything else raises ConfigError.
        """
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
        elif self.config_file.exists():
            stored = _resumable(self.read_config().model_dump(mode="json"))
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
        atomic_write(self.config_file, cfg.model_dump_json(indent=2).encode())
        self.summary_file.unlink(missing_ok=True)

    def write_json(self, name: str, data: Any) -> None:
        atomic_write(self.path / name, json.dumps(data, indent=2).encode())

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def append_metrics(self, line: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_file)

    def truncate_metrics(self, last_round: int) -> None:
        """Keep only the metrics of rounds up to `last_round` (resume)."""
        kept = [m for m in self.metrics() if isinstance(m, dict) and m.get("round", 0) <= last_round]
        atomic_write(self.metrics_file, "".join(json.dumps(m) + "\n" for m in kept).encode())

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write `checkpoint` (`Checkpoint.to_bytes`): one file holds the state and its metadata, so they never
        disagree. The previous checkpoint is kept as checkpoint.prev.safetensors, the fallback if the newest is
        damaged."""
        if self.checkpoint_file.exists():
            os.replace(self.checkpoint_file, self.path / PREVIOUS)
        atomic_write(self.checkpoint_file, checkpoint.to_bytes())

    def load_checkpoint(self) -> Checkpoint | None:
        """The newest readable checkpoint; a damaged one is reported and the previous one used."""
        found = self.newest_checkpoint()
        return None if found is None else found[1]

    def newest_checkpoint(self) -> tuple[Path, Checkpoint] | None:
        """(its file, the checkpoint) of the newest readable checkpoint: checkpoint.safetensors, or
        checkpoint.prev.safetensors when the newest is damaged (reported); None when there is none."""
        for name in (CHECKPOINT, PREVIOUS):
            path = self.path / name
            if not path.exists():
                continue
            try:
                return path, Checkpoint.from_bytes(path.read_bytes())
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

