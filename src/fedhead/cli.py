"""The `fedhead` command line: run experiments, score heads, print the config reference."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedhead.config import Config, ConfigError, config_reference, load_config
from fedhead.data.loading import DataError
from fedhead.models.head_map import UnsupportedModelError
from fedhead.run_metrics import TAIL

app = typer.Typer(
    help="Federated LoRA fine-tuning with attention-head pruning, head-weighted aggregation and strategic "
    "client selection.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True, soft_wrap=True)
# Errors a user can fix (bad config, data, model, paths): one line and exit code 2. Anything else still ends in
# one line (exit 1, "internal error"), never in a traceback; FEDHEAD_DEBUG=1 shows the traceback.
USER_ERRORS = (ConfigError, DataError, UnsupportedModelError, OSError, UnicodeError, ValueError)


def _setup_logging() -> None:
    """fedhead's own log lines to stderr; imported libraries (flwr) may have configured the root logger."""
    log = logging.getLogger("fedhead")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _fail(err: Exception) -> None:
    if os.environ.get("FEDHEAD_DEBUG"):
        raise err
    user = isinstance(err, USER_ERRORS)
    kind = "" if isinstance(err, ConfigError | DataError | UnsupportedModelError) else f"{type(err).__name__}: "
    message = " ".join(str(err).split()) or type(err).__name__
    console.print(f"[bold red]{'error' if user else 'internal error'}:[/] {escape(kind + message)}", markup=True,
                  highlight=False)  # escaped: a message may hold brackets, e.g. fedhead[tensorboard]
    raise typer.Exit(code=2 if user else 1)


def _overrides(**fields: Any) -> dict[str, Any]:
    names = {
        "rounds": "federated.rounds",
        "seed": "seed",
        "out": "out",
        "name": "run_name",
        "sparsity": "heads.sparsity",
        "clients": "partition.num_clients",
        "clients_per_round": "federated.clients_per_round",
        "init_from": "model.init_from",
    }
    return {names[k]: v for k, v in fields.items() if v is not None}


def _parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


class Engine(StrEnum):
    local = "local"
    flower = "flower"


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="TOML config file (defaults when omitted).")] = None,
    rounds: Annotated[int | None, typer.Option(help="Override federated.rounds.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override seed.")] = None,
    out: Annotated[str | None, typer.Option(help="Override out (parent of run directories).")] = None,
    name: Annotated[str | None, typer.Option(help="Override run_name.")] = None,
    sparsity: Annotated[float | None, typer.Option(help="Override heads.sparsity.")] = None,
    clients: Annotated[int | None, typer.Option(help="Override partition.num_clients.")] = None,
    clients_per_round: Annotated[int | None, typer.Option(help="Override federated.clients_per_round.")] = None,
    init_from: Annotated[Path | None, typer.Option(
        help="Warm start from this run's global model (model.init_from).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Any option as dotted.key=value (JSON values), repeatable.")
    ] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue the run in this run directory; with --rounds, extend it to that many rounds.")] = None,
    quiet: Annotated[bool, typer.Option(help="Log lines instead of a progress bar.")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Start afresh in a run directory that holds another run (its files are replaced).")] = False,
    engine: Annotated[
        Engine, typer.Option(help="local: in-process simulation; flower: Flower's simulation engine (Ray), "
                             "one simulated SuperNode per client.")
    ] = Engine.local,
    tensorboard: Annotated[bool, typer.Option(
        help="Also write each round's scalars to RUN_DIR/tensorboard (needs fedhead[tensorboard]).")] = False,
) -> None:
    """Run a federated experiment; results go to OUT/RUN_NAME/."""
    from fedhead.run_dir import RunDir

    run_simulation: Callable[..., dict[str, Any]]  # the engine: both take (cfg, run_dir, resume=, on_round=, ...)
    if engine == Engine.flower:
        from fedhead.runners.flower_engine import run_flower as run_simulation
    else:
        from fedhead.runners.local import run_simulation

    _setup_logging()
    try:
        if resume is not None:
            resumed = RunDir(resume)
            resumed.read_config_json()  # a folder without a readable config.json is refused before anything else
            others = _overrides(seed=seed, out=out, name=name, sparsity=sparsity, clients=clients,
                                clients_per_round=clients_per_round, init_from=init_from)
            if config is not None or set_ or others:
                raise ConfigError("--resume continues the run with its own config.json; only --rounds may be given "
                                  "with it (to extend a finished run)")
            cfg = resumed.read_config(rounds)
            run_dir = resume
        else:
            overrides = {**_parse_set(set_ or []), **_overrides(
                rounds=rounds, seed=seed, out=out, name=name, sparsity=sparsity, clients=clients,
                clients_per_round=clients_per_round, init_from=None if init_from is None else str(init_from))}
            cfg = load_config(config, overrides)
            run_dir = Path(cfg.out) / (cfg.run_name or "run")
        summary = _run_with_progress(cfg, run_dir, resume is not None, quiet, run_simulation, overwrite, tensorboard)
    except Exception as err:  # noqa: BLE001 - one line, never a traceback (see _fail)
        _fail(err)
    console.print(f"[green]done[/]: final {summary.get('metric')} {summary.get('final_score')}, results in {run_dir}")
    typer.echo(json.dumps(summary))


def _run_with_progress(cfg: Config, run_dir: Path, resume: bool, quiet: bool, run_simulation,
                       overwrite: bool = False, tensorboard: bool = False) -> dict:
    """Run with a progress bar on a terminal, else one log line a round; with `tensorboard`, each round's
    scalars also go to RUN_DIR/tensorboard (the same per-round callback)."""
    log = logging.getLogger("fedhead")
    tracker = None
    if tensorboard:
        from fedhead.tracking import TensorBoardTracker

        tracker = TensorBoardTracker(run_dir, cfg)  # a missing package fails here, before the run starts

    def tracked(show: Callable[[dict], None]) -> Callable[[dict], None]:
        if tracker is None:
            return show

        def both(m: dict) -> None:
            show(m)
            tracker(m)

        return both

    started, first_round = time.monotonic(), [None]

    def line(m: dict) -> str:
        metric = cfg.metric
        acc = f" {metric} {m[metric]:.4f} eval_loss {m['eval_loss']:.4f}" if metric in m else ""
        loss = f" train_loss {m['train_loss']:.4f}" if m.get("train_loss") is not None else ""
        up = f" up {m['bytes_up'] / 1e6:.2f} MB down {m['bytes_down'] / 1e6:.2f} MB" if "bytes_up" in m else ""
        seconds = sum(v for k, v in m.items() if k.startswith("seconds_") and isinstance(v, int | float))
        took = f" {seconds:.1f} s" if seconds else ""
        eta = ""
        if m["round"] > 0:  # time left from this session's rounds so far
            first_round[0] = m["round"] if first_round[0] is None else first_round[0]
            done = m["round"] - first_round[0] + 1
            left = cfg.federated.rounds - m["round"]
            eta = f" (about {(time.monotonic() - started) / done * left / 60:.1f} min left)" if left else ""
        return f"round {m['round']}/{cfg.federated.rounds}{loss}{acc}{up}{took}{eta}"

    try:
        if quiet or not console.is_terminal:  # a file, a pipe, a batch job: one log line a round
            return run_simulation(cfg, run_dir, resume=resume, on_round=tracked(lambda m: log.info(line(m))),
                                  overwrite=overwrite)
        columns = (TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"))
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("", total=cfg.federated.rounds)

            def update(m: dict) -> None:
                progress.update(task, completed=m["round"], description=line(m))

            return run_simulation(cfg, run_dir, resume=resume, on_round=tracked(update), overwrite=overwrite)
    finally:
        if tracker is not None:
            tracker.close()


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (its last checkpoint is the model scored).")],
    data: Annotated[str, typer.Option(help="Data file (.jsonl/.json/.csv) or Hub dataset id, in the run's data "
                                           "format (text fields, label field from its config).")],
    label_map: Annotated[str | None, typer.Option(
        help="FILE_LABEL=MODEL_LABEL[|MODEL_LABEL...],... for a file whose label names differ, e.g. "
             "'not_entailment=neutral|contradiction' (a prediction in the set counts as that label).")] = None,
    out: Annotated[Path | None, typer.Option(help="JSON file of the scores (default RUN_DIR/evaluate.STEM.json, "
                                                  "STEM the data file's; RUN_DIR/evaluate.STEM.pruned-S.json with "
                                                  "--pruned).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Evaluation batch size (default: the run's "
                                                               "federated.eval_batch_size).")] = None,
    device: Annotated[str | None, typer.Option(help="Device to evaluate on (default: the run's device).")] = None,
    pruned: Annotated[float | None, typer.Option(
        help="Score the model with a fraction S in (0, 1) of each block's heads physically removed: those the "
             "clients of the last --window rounds kept least often.")] = None,
    window: Annotated[int, typer.Option(min=1, help="With --pruned: the last rounds whose client head masks "
                                                    "vote.")] = 5,
    tail_average: Annotated[bool, typer.Option(
        "--tail-average", help="Score the tail-averaged model (federated.tail_average_rounds) instead of the last "
                               "round's.")] = False,
) -> None:
    """Score a run's trained global model on a dataset: one line per metric, and a JSON file."""
    from fedhead.evaluation import evaluate_run, parse_label_map
    from fedhead.run_dir import refuse_run_file

    try:
        mapping = parse_label_map(label_map)
        suffix = ("" if pruned is None else f".pruned-{pruned:g}") + (".tail-average" if tail_average else "")
        target = out or run_dir / f"evaluate.{Path(data).stem}{suffix}.json"
        refuse_run_file(target, "--out")  # before the (long) evaluation
        result = evaluate_run(run_dir, data, mapping, batch_size, device, pruned, window, tail_average)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2) + "\n")
    except Exception as err:  # noqa: BLE001 - one line, never a traceback (see _fail)
        _fail(err)
    for name, value in result["metrics"].items():
        typer.echo(f"{name} {value:.4f}")
    typer.echo(f"examples {result['examples']}")
    if "pruned" in result:
        p = result["pruned"]
        typer.echo(f"kept_heads {p['kept_heads']} of {p['total_heads']}")
        typer.echo(f"forward_flops {p['forward_flops']['pruned']} of {p['forward_flops']['whole']} (one batch of "
                   f"{p['flops_batch_size']})")
    console.print(f"round {result['round']} of {run_dir} on {data}; scores in {target}", highlight=False)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (its last checkpoint is the model exported).")],
    out: Annotated[Path, typer.Argument(help="New directory for the model (must not exist, or be empty).")],
    pruned: Annotated[float | None, typer.Option(
        help="Refused: plain transformers cannot load a model whose blocks lost heads (see docs/usage.md).")] = None,
    tail_average: Annotated[bool, typer.Option(
        "--tail-average", help="Export the tail-averaged model (federated.tail_average_rounds) instead of the last "
                               "round's.")] = False,
) -> None:
    """Write a run's trained global model, LoRA merged, as a directory plain transformers loads."""
    from fedhead.export import export_run

    try:
        result = export_run(run_dir, out, pruned, tail_average)
    except Exception as err:  # noqa: BLE001 - one line, never a traceback (see _fail)
        _fail(err)
    trust = ", trust_remote_code=True" if result.remote_code else ""
    console.print(f"{result.architecture} in {out}: transformers.{result.auto_class}.from_pretrained('{out}'{trust})",
                  highlight=False)


@app.command()
def heads(
    config: Annotated[Path | None, typer.Argument(help="TOML config file (defaults when omitted).")] = None,
    out: Annotated[Path, typer.Option(help="Heat map PNG; the scores go beside it as JSON.")] = Path("heads.png"),
    samples: Annotated[int, typer.Option(min=1, help="Training examples to score on.")] = 256,
    method: Annotated[str | None, typer.Option(help="Importance: confidence, gradient or random.")] = None,
) -> None:
    """Score the attention heads of the configured model on the configured data and draw a heat map."""
    from fedhead.heads_report import score_and_plot
    from fedhead.run_dir import refuse_run_file

    try:
        cfg = load_config(config, {"heads.importance": method})
        if out.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
            raise ConfigError(f"--out {out}: the heat map is an image: give a .png, .pdf, .svg or .jpg path")
        for written in (out, out.with_suffix(".json")):
            refuse_run_file(written, "--out")
        result = score_and_plot(cfg, out, samples)
    except Exception as err:  # noqa: BLE001 - one line, never a traceback (see _fail)
        _fail(err)
    console.print(f"heat map: {out}, scores: {result}")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories to compare.")],
    out: Annotated[Path, typer.Option(help="Directory for table.md, summary.json and the PNG plots.")] = Path(
        "report"),
    baseline: Annotated[Path | None, typer.Option(help="Dense run to compare against (default: the first "
                                                       "run with sparsity 0 and FedAvg).")] = None,
    target: Annotated[float | None, typer.Option(help=(
        f"Target accuracy (default: the baseline's mean of its last {TAIL} evaluations, or of all when it has "
        "fewer, minus 2 points)."))] = None,
) -> None:
    """Compare runs: accuracy, bytes, FLOPs, time, and the cost to reach a target accuracy; table and plots."""
    from fedhead.report import ReportError, write_report

    try:
        table = write_report(runs, out, baseline, target)
    except ReportError as err:
        _fail(ConfigError(str(err)))
    except Exception as err:  # noqa: BLE001 - one line, never a traceback (see _fail)
        _fail(err)
    typer.echo(table.read_text())


@app.command("flower-app")
def flower_app(
    directory: Annotated[Path, typer.Argument(help="Directory to write the app's pyproject.toml to.")],
) -> None:
    """Write the Flower app of fedhead (for `flwr run DIRECTORY ...` on a Flower deployment)."""
    from fedhead.runners.flower_engine import write_app

    try:
        path = write_app(directory)
    except Exception as err:  # noqa: BLE001 - one line, never a traceback (see _fail)
        _fail(err)
    console.print(f"Flower app in {path}: flwr run {path} SUPERLINK --run-config 'config=\"/abs/config.toml\"'")


@app.command("config-reference")
def config_reference_cmd() -> None:
    """Print the Markdown table of every config option (the README's reference)."""
    typer.echo(config_reference())


if __name__ == "__main__":  # pragma: no cover - `python -m fedhead.cli`
    app()
