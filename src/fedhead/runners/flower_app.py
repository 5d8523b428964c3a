"""fedhead on Flower: the ServerApp (fedhead's run loop around `flower_strategy.FedHeadStrategy`) and, in
`flower_client`, the ClientApp. The same app runs on Flower's simulation engine (`fedhead run --engine flower`)
and on a real deployment (`flower-superlink` + one `flower-supernode` per device, `flwr run`).

What travels (Flower Message API; every payload is fedhead's own safetensors bytes, an update's deflated with
federated.upload_deflate, carried unchanged as one `Array` of an `ArrayRecord`, so the bytes recorded are the
lengths of the real messages' payloads, exactly as in the in-process engine):

    query     server -> node   (nothing)                     node -> server  ConfigRecord "node": client-id and,
                                                                             in partition form, num-clients
    train     server -> node   ArrayRecord "arrays": payload = encode_state(global trainable state)
                               ConfigRecord "config": fedhead-config (the run's config as JSON, with the run's
                               data.labels), server-round, client-id
              node -> server   ArrayRecord "update": payload = encode_update(kept-head slices + shared tensors)
                               MetricRecord "metrics": num-examples and seconds measured on the node
    evaluate  server -> node   as train (power_of_choice only)  node -> server  MetricRecord "metrics":
                                                                eval_loss of the global model on its sample

Which client a node is (its own file with `data=`, or a partition), how the server numbers nodes and which nodes
it stops using: `flower_nodes`. A node that fails (error reply: it went offline, its ClientApp raised, or its data
does not fit the run's config: a field missing, a label not in data.labels) or does not answer within
`round-timeout` is dropped from that round and listed under `failed` in the round's metrics line (client, node,
reason); the round completes with the rest. With fewer than `federated.min_clients` good updates the global
state is kept (`skipped`), as in the in-process engine: the server's side of a round is the same `server_round`.

The server needs no training data: when it cannot read data.train (unset, or a file that is not on this
machine) it builds the model from the run's labels (data.labels, else those of data.eval), evaluates on data.eval
if it has one and otherwise only aggregates.

Run config of the app (`flwr run APP --run-config 'key=value ...'`): `config` (a fedhead TOML or config.json on
the SuperLink machine; empty: RUN_DIR/config.json), `run-dir` (empty: OUT/RUN_NAME of the config), `resume`,
`round-timeout` (seconds a round waits for replies), `node-wait` (seconds the first round waits until
`clients_per_round` nodes are connected). A problem the user can fix (config, data, model, a run directory that
already holds a run without resume=true) stops the ServerApp in one log line (`RunRefused`), and Flower records
the run as failed (`flwr ls`). fedhead's own log lines (resume, damaged checkpoints) go through Flower's logger.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedhead.config import Config, ConfigError, load_config
from fedhead.data.loading import LOCAL_FORMATS, DataError
from fedhead.data.tasks import label_values
from fedhead.federated.selection import ClientStats
from fedhead.federated.state import State
from fedhead.loop import Simulation, drive_rounds
from fedhead.models import UnsupportedModelError
from fedhead.run_dir import RunDir
from fedhead.runners.flower_start import route_fedhead_logs_through_flower
from fedhead.runners.flower_strategy import FedHeadStrategy

log = logging.getLogger("flwr")  # shown by `flwr run --stream` and in the SuperLink's log

server_app = ServerApp()
USER_ERRORS = (ConfigError, DataError, UnsupportedModelError)  # the ServerApp refuses in one line (RunRefused)


def readable_here(source: str | None) -> bool:
    """Whether this machine can read the data source `source` (a local file that exists, or a Hub id)."""
    if source is None:
        return False
    return Path(source).suffix.lower() not in LOCAL_FORMATS or Path(source).is_file()


def nodes_config(cfg: Config, sim: Simulation) -> Config:
    """The config the nodes are sent: the run's, with the label values the server's model was built with."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": label_values(sim.data)})})


def server_options(run_config: dict[str, Any]) -> tuple[Config, Path, bool, float, float]:
    """(config, run directory, resume, round timeout, node wait) from the app's run config; ConfigError when
    it names no config, or one that cannot be read."""
    config, run_dir = str(run_config.get("config", "")), str(run_config.get("run-dir", ""))
    resume = bool(run_config.get("resume", False))
    if not config and not run_dir:
        raise ConfigError("the run config needs config (a fedhead config file on the SuperLink machine) or run-dir "
                          "(a run directory with config.json)")
    if config:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file not found on the SuperLink machine: {path.resolve()} (run config config)")
        cfg = Config.model_validate_json(path.read_text()) if path.suffix == ".json" else load_config(path)
    else:  # the run directory's own config.json
        cfg = RunDir(Path(run_dir).resolve()).read_config()
    path = Path(run_dir) if run_dir else Path(cfg.out) / (cfg.run_name or "run")
    return (cfg, path, resume, float(run_config.get("round-timeout", 3600.0)),
            float(run_config.get("node-wait", 600.0)))


def serve(grid: Grid, cfg: Config, run_dir: str | Path, *, resume: bool = False, round_timeout: float = 3600.0,
          node_wait: float = 600.0) -> dict[str, Any]:
    """The whole run on the server: the in-process engine's run loop with rounds over Flower messages."""
    start = time.perf_counter()
    with_train = readable_here(cfg.data.train)
    if not with_train:
        log.info("fedhead: no training data on the server (data.train = %s): devices train on their own data",
                 cfg.data.train)
    sim = Simulation.setup(cfg, training_data=with_train)
    known = {c: len(p) for c, p in enumerate(sim.parts)}  # partition nodes' data sizes, where the server has them
    strategy = FedHeadStrategy(nodes_config(cfg, sim), sim.lm.layout, known_sizes=known,
                               round_timeout=round_timeout, node_wait=node_wait)
    strategy.summary()

    def round_fn(state: State, round_: int, rng: np.random.Generator, stats: ClientStats):
        return strategy.run_round(grid, sim, state, round_, rng, stats)

    def on_round(m: dict[str, Any]) -> None:
        keys = ("selected", "train_loss", cfg.metric, "eval_loss", "failed", "rejected", "skipped")
        log.info("fedhead round %d: %s", m["round"], {k: m[k] for k in keys if k in m})

    return drive_rounds(sim, RunDir(run_dir), round_fn, resume=resume, start=start, on_round=on_round)


class RunRefused(Exception):
    """The ServerApp stops on a problem the user can fix (config, data, model, run directory); Flower records the
    run as failed and logs this one line, without a traceback (`OneLineRefusal`)."""


class OneLineRefusal(logging.Filter):
    """On Flower's logger: the record Flower logs for a ServerApp that raised `RunRefused` ("ServerApp raised an
    exception", with its traceback) becomes one line that ends with the refusal."""

    def filter(self, record: logging.LogRecord) -> bool:
        refusal = record.exc_info[1] if record.exc_info else None
        if isinstance(refusal, RunRefused):
            record.msg, record.args = f"{record.getMessage()}: {refusal}", ()
            record.exc_info, record.exc_text = None, None
        return True


def show_fedhead_logs_through_flower() -> None:
    """fedhead's INFO and higher records through Flower's logger, once each; refusals in one line."""
    route_fedhead_logs_through_flower()
    if not any(isinstance(f, OneLineRefusal) for f in log.filters):
        log.addFilter(OneLineRefusal())


def refuse_a_second_run(run_dir: Path, resume: bool) -> None:
    """ConfigError (with the run-config keys that apply) when `run_dir` holds a run and resume is not set."""
    if not resume and RunDir(run_dir).holds_a_run():
        raise ConfigError(f"{run_dir.resolve()} holds another run: continue it with run config resume=true "
                          "(flwr run ... --run-config 'config=\"...\" resume=true'), or give another run-dir")


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """fedhead's ServerApp: the run loop of `serve` with the options of the run config (module docstring)."""
    show_fedhead_logs_through_flower()
    try:
        cfg, run_dir, resume, round_timeout, node_wait = server_options(dict(context.run_config))
        log.info("fedhead: run directory %s", run_dir.resolve())
        refuse_a_second_run(run_dir, resume)
        summary = serve(grid, cfg, run_dir, resume=resume, round_timeout=round_timeout, node_wait=node_wait)
    except USER_ERRORS as err:
        raise RunRefused(" ".join(str(err).split())) from None
    log.info("fedhead: done, final %s %s", summary.get("metric"), summary.get("final_score"))
