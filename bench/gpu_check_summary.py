"""The GPU check's JSON (bench/gpu_check.sh runs the parts, then this): the card, driver, CUDA and library
versions, and for each part its exit status, wall seconds, peak GPU memory and key numbers.

    python bench/gpu_check_summary.py WORK OUTPUT.json [--bitsandbytes-installed true|false]

WORK holds what gpu_check.sh's `part` leaves for each part NAME: NAME.status ("exit-status start end", start and
end in epoch seconds), NAME.log (its output), NAME.gpu_mib (nvidia-smi's memory.used of every GPU, MiB, every
half second), and the part's own files: tests.xml (pytest's JUnit report), step_cost.json (bench/step_cost.py's
rows) and runs/quickstart, runs/smollm2_4bit (fedhead run directories). Exits 1 when a part failed or did not
run, else 0.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from fedhead.config import Config

PARTS = ("tests", "step_cost", "quickstart", "install_bitsandbytes", "smollm2_4bit")
OPTIONAL = {"install_bitsandbytes"}  # runs only where bitsandbytes is missing
LOG_TAIL_LINES = 20


def test_counts(work: Path) -> dict[str, Any]:
    """Passed, failed, errored and skipped tests of pytest's JUnit report, and the names of those that failed."""
    suite = ET.parse(work / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
            "failed_tests": failed}


def round_seconds(line: dict[str, Any]) -> float:
    """A metrics line's seconds: the sum of its seconds_* fields (clients, aggregation, evaluation)."""
    return sum(v for k, v in line.items() if k.startswith("seconds_") and isinstance(v, int | float))


def run_numbers(run_dir: Path) -> dict[str, Any]:
    """A fedhead run directory's rounds: the headline metric at the first and last evaluation, each round's train
    loss, seconds and largest client peak training memory (on CUDA: max_memory_allocated above what the client
    held before training)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metric = Config.model_validate_json((run_dir / "config.json").read_text()).metric
    rounds = [m for m in lines if m.get("round", 0) > 0]
    evaluated = [m for m in lines if metric in m]
    seconds = [round_seconds(m) for m in rounds]
    return {
        "rounds": len(rounds),
        "metric": metric,
        f"initial_{metric}": evaluated[0][metric] if evaluated else None,
        f"final_{metric}": evaluated[-1][metric] if evaluated else None,
        "final_eval_loss": evaluated[-1].get("eval_loss") if evaluated else None,
        "train_loss_per_round": [m.get("train_loss") for m in rounds],
        "seconds_per_round": seconds,
        "mean_seconds_per_round": sum(seconds) / len(seconds) if seconds else None,
        "client_peak_memory_bytes": max((c.get("peak_memory_bytes", 0) for m in rounds for c in m.get("clients", [])),
                                        default=None),
    }


NUMBERS = {
    "tests": test_counts,
    "step_cost": lambda work: {"rows": json.loads((work / "step_cost.json").read_text())},
    "quickstart": lambda work: run_numbers(work / "runs" / "quickstart"),
    "smollm2_4bit": lambda work: run_numbers(work / "runs" / "smollm2_4bit"),
}


def part_record(work: Path, name: str) -> dict[str, Any] | None:
    """One part's exit status, wall seconds, peak GPU memory.used (MiB, nvidia-smi; any GPU) and numbers; the last
    lines of its output when it failed; None when it did not run."""
    status = work / f"{name}.status"
    if not status.exists():
        return None
    code, start, end = status.read_text().split()
    record: dict[str, Any] = {"exit_status": int(code), "timed_out": int(code) in (124, 137),
                              "seconds": round(float(end) - float(start), 2)}
    samples = [int(v) for v in (work / f"{name}.gpu_mib").read_text().split() if v.isdigit()] \
        if (work / f"{name}.gpu_mib").exists() else []
    record["peak_gpu_memory_used_mib"] = max(samples, default=None)
    if record["exit_status"] != 0:
        log = work / f"{name}.log"
        record["log_tail"] = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:] if log.exists() else []
    if name in NUMBERS:
        try:
            record.update(NUMBERS[name](work))
        except (OSError, ValueError, KeyError, AttributeError, ET.ParseError) as error:  # a failed part's files
            record["numbers_missing"] = f"{type(error).__name__}: {error}"
    return record


def machine() -> dict[str, Any]:
    """The card, driver and CUDA versions (nvidia-smi) and the versions of torch and the libraries on the path."""
    import torch

    query = _stdout("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader").splitlines()
    header = _stdout("nvidia-smi")
    cuda_driver = re.search(r"CUDA Version:\s*([\d.]+)", header)
    name, driver, memory = [v.strip() for v in query[0].split(",")] if query else [None, None, None]
    versions = {}
    for package in ("transformers", "peft", "flwr", "bitsandbytes"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"card": name, "gpus": len(query), "card_memory": memory, "driver": driver,
            "driver_cuda": cuda_driver.group(1) if cuda_driver else None, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), **versions,
            "python": sys.version.split()[0]}


def _stdout(*command: str) -> str:
    """What `command` prints ("" when it cannot run)."""
    try:
        return subprocess.run(command, capture_output=True, text=True).stdout
    except OSError:
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--bitsandbytes-installed", choices=("true", "false"), default="false",
                        help="Whether gpu_check.sh pip-installed bitsandbytes (it was missing).")
    args = parser.parse_args()

    parts = {name: part_record(args.work, name) for name in PARTS}
    failed = [name for name, record in parts.items()
              if (record is None and name not in OPTIONAL) or (record is not None and record["exit_status"] != 0)]
    commit = _stdout("git", "rev-parse", "HEAD").strip() or None
    report = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "commit": commit,
              **machine(), "bitsandbytes_installed_by_check": args.bitsandbytes_installed == "true",
              "failed": failed, "parts": {name: record for name, record in parts.items() if record is not None}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"gpu_check: {args.output}: " + (f"failed: {', '.join(failed)}" if failed else "every part passed"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
