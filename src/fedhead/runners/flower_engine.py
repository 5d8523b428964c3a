"""`fedhead run CONFIG --engine flower`: the experiment on Flower's simulation engine, on this machine.

It starts a private `flower-superlink --simulation` on a free 127.0.0.1 port with its own Flower home (a
temporary directory: the app, Flower's config.toml with one SuperLink connection, the logs), submits the Flower
app of `fedhead.runners.flower_app` with `flwr run` (one simulated SuperNode per client, node config
`partition-id` / `num-partitions`), follows the run directory's metrics.jsonl while it runs, and stops the
SuperLink (and everything it started) at the end. The ServerApp writes the run directory with the in-process
engine's run loop, so it holds the same files with the same keys.

Runtime dependency installation, telemetry and update checks are switched off: the app runs in this
environment (`flwr run` would otherwise install the app's dependencies with uv, e.g. a CUDA build of torch).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedhead.config import Config
from fedhead.data.loading import DataError
from fedhead.run_dir import RunDir

APP_NAME = "fedhead-flower"
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray: node address 127.0.0.1 (loopback) instead of the host IP
}

APP_PYPROJECT = """\
# The Flower app of fedhead: `flwr run THIS_DIRECTORY CONNECTION --run-config 'config="/abs/path.toml"'`.
# fedhead (and so flwr, torch, ...) must be installed on the SuperLink machine and on every SuperNode.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "{version}"
description = "fedhead: federated LoRA with attention-head pruning, on Flower"
license = "Apache-2.0"
dependencies = ["flwr>=1.42,<2"]

[tool.flwr.app]
publisher = "fedhead"

[tool.flwr.app.components]
serverapp = "fedhead.runners.flower_app:server_app"
clientapp = "fedhead.runners.flower_client:client_app"

[tool.flwr.app.config]
config = ""            # fedhead TOML (or config.json) on the SuperLink machine; empty: RUN-DIR/config.json
run-dir = ""           # run directory; empty: OUT/RUN_NAME of the config
resume = false         # continue the run in run-dir after its last checkpoint
round-timeout = 3600.0 # seconds a round waits for the selected nodes' replies; later ones are dropped
node-wait = 600.0      # seconds the first round waits until clients_per_round nodes are connected
"""


def write_app(directory: str | Path) -> Path:
    """Write the Flower app (its pyproject.toml) to `directory`; returns the directory."""
    from importlib.metadata import version

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "pyproject.toml").write_text(APP_PYPROJECT.format(name=APP_NAME, version=version("fedhead")))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executable(name: str) -> str:
    """A console script of this environment (flwr, flower-superlink, ...), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def flower_env(home: str | Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process started here: its own Flower home, no installs, no telemetry."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def write_connection(home: str | Path, name: str, port: int) -> None:
    """Flower's config.toml in `home` with one insecure SuperLink connection to 127.0.0.1:port (the default)."""
    Path(home).mkdir(parents=True, exist_ok=True)
    (Path(home) / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')


def write_run_config(path: str | Path, values: Mapping[str, Any]) -> Path:
    """A TOML file of run-config values for `flwr run --run-config FILE`."""
    lines = [f"{k} = {json.dumps(v) if isinstance(v, str | bool) else repr(v)}" for k, v in values.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def start(args: list[str], env: Mapping[str, str], log_path: str | Path) -> subprocess.Popen:
    """Start a Flower process in a session of its own (so that it and its children can be stopped together)."""
    log = open(log_path, "ab")  # noqa: SIM115 (the child keeps it)
    try:
        return subprocess.Popen(args, env=dict(env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        log.close()


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process started by `start` and every process left in its session: SIGTERM, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            try:
                os.killpg(proc.pid, 0)  # children of the session still there?
            except ProcessLookupError:
                break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Wait until 127.0.0.1:port accepts connections (the process must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            program = proc.args if isinstance(proc.args, str | bytes | os.PathLike) else proc.args[0]
            raise RuntimeError(f"{os.fsdecode(program)} exited with code {proc.returncode}{_tail(log)}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s{_tail(log)}")


def _tail(log: Path | None, lines: int = 30) -> str:
    if log is None or not Path(log).exists():
        return ""
    return "\n--- " + str(log) + " ---\n" + "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])


def torch_gpus() -> int:
    """CUDA devices torch sees here (the GPUs the simulation engine may hand out)."""
    import torch

    return torch.cuda.device_count()


def simulation_cpus() -> int:
    """CPUs of this machine as Ray counts them (each simulated client takes them all: one client at a time,
    with all cores, as in the in-process engine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_flower(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    round_timeout: float = 3600.0,
    keep_home: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run (or resume) `cfg` on Flower's simulation engine, writing `run_dir`; returns the summary (as
    `fedhead.runners.local.run_simulation` does). On failure the Flower home with the logs is kept and named."""
    if cfg.data.train is None:
        raise DataError("data.train is not set: Flower's simulation engine gives each simulated node a partition of "
                        "it (devices that bring their own data run on the deployment engine, docs/deployment.md)")
    run_dir = Path(run_dir).resolve()
    rd = RunDir(run_dir)
    if resume:
        checkpoint = rd.load_checkpoint()
        if checkpoint is None:
            rd.accept_config(cfg)
        else:
            rd.accept_config(cfg, checkpoint.round, pinned=checkpoint.config)
            rd.accept_metrics(checkpoint.round)
        rd.commit_config(cfg)  # the ServerApp reads config.json: it may extend the rounds
    else:
        rd.create(cfg.model_dump_json(indent=2), overwrite=overwrite)  # config.json: what the ServerApp reads
    rd.summary_file.unlink(missing_ok=True)  # written again by the ServerApp when the run ends
    home = Path(tempfile.mkdtemp(prefix="fedhead-flower-"))
    app = write_app(home / "app")
    port = free_port()
    write_connection(home, "fedhead", port)
    env = flower_env(home)
    cpus = simulation_cpus()
    link = start([executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                  "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
                 env, home / "superlink.log")
    ok = False
    try:
        wait_for_port(port, 60, link, home / "superlink.log")
        run_config = write_run_config(home / "run_config.toml", {
            "run-dir": str(run_dir), "resume": resume, "round-timeout": float(round_timeout), "node-wait": 0.0})
        fed_config = (f"num-supernodes={cfg.partition.num_clients} client-resources-num-cpus={cpus} "
                      f"client-resources-num-gpus={float(cfg.gpus_per_client)} init-args-num-cpus={cpus}")
        if cfg.gpus_per_client > 0:  # Ray must see at least one GPU to grant a client its share
            fed_config += f" init-args-num-gpus={max(1, torch_gpus())}"
        flwr = start([executable("flwr"), "run", str(app), "fedhead", "--run-config", str(run_config),
                      "--federation-config", fed_config, "--stream"], env, home / "flwr-run.log")
        seen = 0
        try:
            while True:
                done = flwr.poll() is not None
                lines = rd.metrics()  # a line being written is read next time
                for metrics in lines[seen:]:
                    seen += 1
                    if on_round:
                        on_round(metrics)
                if done:
                    break
                time.sleep(0.5)
        finally:
            if flwr.poll() is None:
                stop(flwr)
        if not rd.summary_file.exists():
            raise RuntimeError(f"the Flower run ended without a summary in {run_dir}; logs in {home}"
                               f"{_tail(home / 'flwr-run.log')}")
        ok = True
        return json.loads(rd.summary_file.read_text())
    finally:
        stop(link)
        if ok and not keep_home:
            shutil.rmtree(home, ignore_errors=True)
