"""Seconds per round of Flower nodes in partition form, on three engines, to compare what a node loads per message.

    PYTHONPATH=src python bench/node_round.py --engine loop|simulation|deployment [--model tiny|minilm]

- loop: `FedHeadStrategy.start` over an in-process grid that hands each message to fedhead's ClientApp in this
  process (as the tests do); also counts the node side's model builds and the record files it reads.
- simulation: `fedhead run --engine flower` (Flower's simulation engine: Ray workers keep their process between
  messages).
- deployment: a loopback deployment: flower-superlink, one flower-supernode per client, `flwr run`. Flower 1.42
  starts a fresh `flwr-clientapp` process for every message there, so each message pays the imports and the
  node's loads whatever the node keeps in memory.
- load: no rounds; the node's loads in this fresh process (partition 0), after the import of fedhead's ClientApp
  (import_seconds, printed for every engine).

Rounds are timed from the moment each line of metrics.jsonl appears (a round: selection, the clients' updates,
aggregation, the server's evaluation). The model is the tiny random BERT of the tests (hidden 32, MiniLM's
tokenizer) or MiniLM; MultiNLI rows from ../shared/data/mnli. Run it on the code before and after a change (e.g.
PYTHONPATH=/path/to/old/src) in one batch: the numbers depend on the machine's load. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MNLI = ROOT.parent / "shared" / "data" / "mnli"


def tiny_bert(path: Path) -> str:
    """The tests' tiny random BERT (2 blocks of 4 heads, hidden 32), saved beside MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedhead.models.loading import resolve_model_path

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path("minilm")).save_pretrained(path)
    return str(path)


def bench_config(args: argparse.Namespace, work: Path) -> Any:
    from fedhead.config import config_from_dict
    from fedhead.models.loading import resolve_model_path

    model = resolve_model_path("minilm") if args.model == "minilm" else tiny_bert(work / "tiny")
    return config_from_dict({
        "model": {"name": model, "max_length": 128},
        "data": {"train": str(MNLI / "train.jsonl"), "eval": str(MNLI / "validation_matched.jsonl"),
                 "train_size": args.train_size, "eval_size": args.eval_size},
        "partition": {"num_clients": args.nodes},
        "federated": {"rounds": args.rounds, "clients_per_round": args.nodes, "local_steps": args.local_steps,
                      "batch_size": 8},
        "heads": {"sparsity": 0.5, "samples": 8},
        "threads": 1, "out": str(work), "run_name": "bench"})


def follow(metrics: Path, until: Callable[[], bool], rounds: int) -> list[float]:
    """Seconds between consecutive lines of `metrics` (round r: its line's time less round r-1's)."""
    seen: list[float] = []
    while True:
        stop = until()
        lines = metrics.read_text().count("\n") if metrics.exists() else 0
        seen += [time.perf_counter()] * (lines - len(seen))
        if stop or len(seen) > rounds:
            break
        time.sleep(0.05)
    return [round(b - a, 2) for a, b in zip(seen, seen[1:], strict=False)]


def loop_rounds(cfg: Any, work: Path) -> dict[str, Any]:
    """Rounds over an in-process grid; the node side's model builds and record reads counted."""
    from flwr.app import ArrayRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedhead import loop
    from fedhead.data import loading
    from fedhead.federated.state import trainable_state
    from fedhead.runners import flower_client
    from fedhead.runners.flower_app import nodes_config
    from fedhead.runners.flower_strategy import FedHeadStrategy

    sim = loop.Simulation.setup(cfg)
    builds: list[int] = []
    reads: list[str] = []
    for module in (loop, flower_client, _node_side()):  # the node side builds in one of them, depending on the code
        if hasattr(module, "build_run_model"):
            build = module.build_run_model
            module.build_run_model = lambda *a, _b=build, **k: builds.append(1) or _b(*a, **k)  # type: ignore
    read = loading.load_records
    loading.load_records = lambda source, split: reads.append(source) or read(source, split)  # type: ignore

    class Grid:
        def __init__(self) -> None:
            self.replies: dict[str, Message] = {}
            n = cfg.partition.num_clients
            self.contexts = {i + 1: Context(run_id=1, node_id=i + 1, state=RecordDict(), run_config={},
                                            node_config={"partition-id": i, "num-partitions": n}) for i in range(n)}

        def get_node_ids(self) -> list[int]:
            return list(self.contexts)

        def push_messages(self, messages: list[Message]) -> list[str]:
            ids = []
            for i, msg in enumerate(messages):
                msg.metadata.__dict__["_message_id"] = f"m{time.perf_counter_ns()}-{i}"
                context = self.contexts[msg.metadata.dst_node_id]
                self.replies[msg.metadata.message_id] = flower_client.client_app(msg, context)
                ids.append(msg.metadata.message_id)
            return ids

        def pull_messages(self, ids: list[str]) -> list[Message]:
            return [self.replies.pop(i) for i in list(ids) if i in self.replies]

        def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
            return self.pull_messages(self.push_messages(messages))

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # messages outside Flower
    strategy = FedHeadStrategy(nodes_config(cfg, sim), sim.lm.layout, node_wait=0.0)
    stamps = [time.perf_counter()]
    strategy.start(grid=Grid(), initial_arrays=ArrayRecord(trainable_state(sim.lm.model)),
                   num_rounds=cfg.federated.rounds, evaluate_fn=lambda r, a: stamps.append(time.perf_counter()))
    return {"round_seconds": [round(b - a, 2) for a, b in zip(stamps[1:], stamps[2:], strict=False)],
            "node_model_builds": len(builds), "node_record_reads": [Path(r).name for r in reads]}


def simulation_rounds(cfg: Any, work: Path) -> dict[str, Any]:
    """Rounds on Flower's simulation engine (`fedhead run --engine flower`)."""
    import threading

    from fedhead.runners.flower_engine import run_flower

    run_dir, done = work / "simulation", threading.Event()
    watcher: list[list[float]] = []
    thread = threading.Thread(target=lambda: watcher.append(follow(run_dir / "metrics.jsonl", done.is_set,
                                                                   cfg.federated.rounds)))
    thread.start()
    try:
        run_flower(cfg, run_dir)
    finally:
        done.set()
        thread.join()
    return {"round_seconds": watcher[0]}


def deployment_rounds(cfg: Any, work: Path) -> dict[str, Any]:
    """Rounds of a loopback deployment: a SuperLink, one SuperNode per client (partition form), `flwr run`."""
    from fedhead.runners import flower_engine as fe

    home = work / "flower"
    port = fe.free_port()
    fe.write_connection(home, "loopback", port)
    env = fe.flower_env(home)
    config, run_dir = work / "server.json", work / "deployed"
    config.write_text(cfg.model_dump_json())
    procs = [fe.start([fe.executable("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                       "--host", "127.0.0.1", "--port", str(port)], env, home / "superlink.log")]
    try:
        fe.wait_for_port(port, 60, procs[0], home / "superlink.log")
        for i in range(cfg.partition.num_clients):
            procs.append(fe.start([fe.executable("flower-supernode"), "--insecure", "--superlink",
                                   f"127.0.0.1:{port}", "--host", "127.0.0.1", "--port", str(fe.free_port()),
                                   "--node-config", f"partition-id={i} num-partitions={cfg.partition.num_clients}"],
                                  env, home / f"supernode{i}.log"))
        run_config = fe.write_run_config(home / "run.toml", {"config": str(config), "run-dir": str(run_dir),
                                                             "round-timeout": 900.0, "node-wait": 120.0})
        run = fe.start([fe.executable("flwr"), "run", str(fe.write_app(home / "app")), "loopback", "--run-config",
                        str(run_config), "--stream"], env, home / "flwr-run.log")
        procs.append(run)
        seconds = follow(run_dir / "metrics.jsonl", lambda: run.poll() is not None, cfg.federated.rounds)
        if len(seconds) < cfg.federated.rounds:
            raise RuntimeError(f"the run stopped early: see {home}")
    finally:
        for proc in reversed(procs):
            fe.stop(proc)
    return {"round_seconds": seconds}


MNLI_LABELS = ["contradiction", "entailment", "neutral"]  # what the server sends its nodes as data.labels


def node_load(cfg: Any, work: Path) -> dict[str, Any]:
    """No rounds: a node's loads in a process that has nothing loaded yet (partition 0), what every message pays
    on Flower's deployment engine besides its imports and Flower's own work."""
    import inspect

    node_side = _node_side()
    config = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": MNLI_LABELS})})
    args: tuple = (1, config.model_dump_json(), node_side.NodeIdentity(0, cfg.partition.num_clients))
    if "run_id" not in inspect.signature(node_side.node_data).parameters:  # the code before run ids
        args = args[1:]
    start = time.perf_counter()
    node = node_side.node_data(*args)
    return {"node_load_seconds": round(time.perf_counter() - start, 2), "node_rows": len(node.data)}


ENGINES = {"loop": loop_rounds, "simulation": simulation_rounds, "deployment": deployment_rounds, "load": node_load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=sorted(ENGINES), required=True)
    parser.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--label", default="", help="a name for the code measured, printed with the numbers")
    args = parser.parse_args()
    start = time.perf_counter()
    import fedhead.runners.flower_client  # noqa: F401  (what a ClientApp process imports first)

    imports = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="fedhead-node-round-") as tmp:
        cfg = bench_config(args, Path(tmp))
        start = time.perf_counter()
        result = ENGINES[args.engine](cfg, Path(tmp))
    print(json.dumps({"label": args.label, "engine": args.engine, "model": args.model, "nodes": args.nodes,
                      "train_size": args.train_size, "eval_size": args.eval_size,
                      "import_seconds": round(imports, 2), **result,
                      "total_seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()


def _node_side() -> Any:
    """The module with the node's loads: `flower_node` (from its split out of `flower_client`), else
    `flower_client` (the code before it, for before/after timings)."""
    import importlib

    try:
        return importlib.import_module("fedhead.runners.flower_node")
    except ModuleNotFoundError:
        return importlib.import_module("fedhead.runners.flower_client")
