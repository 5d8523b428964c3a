"""Live tracking of a run in TensorBoard (`fedhead run --tensorboard`): each round's scalars, from the same metrics
line that metrics.jsonl gets, written with `torch.utils.tensorboard.SummaryWriter` into RUN_DIR/tensorboard.

The tracker is a per-round callback (`on_round` of the run loop, beside the progress display), so every engine
that reports rounds gets it. The step of every scalar is the round (0: the model before training). A resumed run
appends to the same folder; the rounds an interrupted session wrote after its last checkpoint are purged
(`purge_step`), as metrics.jsonl drops them. Needs the optional `tensorboard` package (`fedhead[tensorboard]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedhead.config import Config, ConfigError

TENSORBOARD_DIR = "tensorboard"
# metrics.jsonl key -> TensorBoard tag (a round's key that is missing or None is not written)
SCALARS = {
    "train_loss": "train/loss",
    "eval_loss": "eval/loss",
    "bytes_up": "communication/bytes_up",
    "bytes_down": "communication/bytes_down",
    "train_flops": "compute/train_flops",
    "scoring_flops": "compute/scoring_flops",
    "seconds_clients": "time/seconds_clients",
    "seconds_aggregate": "time/seconds_aggregate",
    "seconds_eval": "time/seconds_eval",
    "dp_epsilon": "privacy/epsilon",
}


def round_scalars(metrics: dict[str, Any], scores: list[str]) -> dict[str, float]:
    """The TensorBoard scalars of one metrics line: SCALARS, the evaluation `scores` (tag eval/NAME, in rounds
    that were evaluated), and per-client summaries: heads/mean_client_sparsity (mean over the accepted clients'
    sparsity), clients/accepted, clients/rejected, clients/failed."""
    out = {tag: float(metrics[key]) for key, tag in SCALARS.items() if metrics.get(key) is not None}
    out.update({f"eval/{name}": float(metrics[name]) for name in scores if metrics.get(name) is not None})
    clients = metrics.get("clients")
    if clients is not None:
        sparsities = [c["sparsity"] for c in clients if c.get("sparsity") is not None]
        if sparsities:
            out["heads/mean_client_sparsity"] = sum(sparsities) / len(sparsities)
        out["clients/accepted"] = float(len(clients))
        out["clients/rejected"] = float(len(metrics.get("rejected", [])))
        out["clients/failed"] = float(len(metrics.get("failed", [])))
    return out


class TensorBoardTracker:
    """A run's per-round callback writing `round_scalars` to `run_dir/tensorboard`; call `close()` at the end.

    Raises ConfigError at construction, before any work, when the tensorboard package is missing.
    """

    def __init__(self, run_dir: str | Path, cfg: Config) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'fedhead[tensorboard]' "
                              "(or pip install tensorboard)") from None
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self.scores = [cfg.metric] if cfg.model.task == "classification" else list(cfg.generation.metrics)
        self._writer_class = SummaryWriter
        self._writer: Any = None

    def __call__(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["round"])
        if self._writer is None:  # the first round of this session: later steps of an earlier session are purged
            self._writer = self._writer_class(log_dir=str(self.log_dir), purge_step=step)
        for tag, value in round_scalars(metrics, self.scores).items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()  # a run killed later still has every round it reported

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
