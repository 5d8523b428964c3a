#!/usr/bin/env bash
# The GPU check (issue 37, item 3). On a machine with a CUDA GPU, in under 10 minutes:
#   tests         the CUDA-only tests (tests/test_device.py; skipped without a GPU)
#   step_cost     bench/step_cost.py on the GPU: dense, remove at 90% and each configs/save_*.toml, 128 and 512 tokens
#   quickstart    configs/quickstart.toml for 3 rounds with device = "cuda"
#   smollm2_4bit  one round of configs/e2e_nlg.toml (SmolLM2-135M) with model.load_in_4bit = true
# each under its own `timeout` (one failing does not stop the others), then writes their numbers to ONE JSON file
# (bench/gpu_check_summary.py): card, driver, CUDA and library versions, each part's exit status, wall seconds,
# peak GPU memory (nvidia-smi) and key numbers.
#
#     bash bench/gpu_check.sh [OUTPUT.json]    # default: docs/results/gpu/<card name, slugged>.json
#
# Needs scripts/install.sh's .venv (run here if missing) with a CUDA build of torch, and ../shared/data (MNLI and
# E2E NLG). No internet needed: the models are the offline MiniLM and SmolLM2 (bitsandbytes is pip-installed if
# missing, which needs a package index). Without a CUDA GPU it stops at once with one line and exit code 2.
# Time limits: tests 90 s, step_cost 120 s, quickstart 150 s, the bitsandbytes install 60 s, SmolLM2 150 s
# (9.5 minutes at most). Exit code: 0 when every part passed, 1 when one failed (the JSON says which).
set -uo pipefail
cd "$(dirname "$0")/.."

stop() { echo "gpu_check: $*" >&2; exit 2; }

{ command -v nvidia-smi && nvidia-smi -L; } >/dev/null 2>&1 \
  || stop "no CUDA GPU here (nvidia-smi finds none); run it on a machine with one"
[ -x .venv/bin/python ] || bash scripts/install.sh || stop "scripts/install.sh failed"
PY=.venv/bin/python
export PYTHONPATH=$PWD/src  # this checkout's fedhead, whichever checkout .venv was installed from
export HF_HUB_OFFLINE=1     # no internet: fail at once rather than wait on the Hub
"$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
  || stop "torch in .venv sees no CUDA device (a CPU build?); install a CUDA build of torch==2.13.0 into .venv"
[ -d ../shared/data/mnli ] && [ -d ../shared/data/e2e_nlg ] \
  || stop "no ../shared/data/mnli or ../shared/data/e2e_nlg beside the repository"

card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
slug=$(echo "$card" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
output=${1:-docs/results/gpu/$slug.json}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# part NAME SECONDS COMMAND...: COMMAND under `timeout`; its output in $work/NAME.log, "exit-status start end" in
# $work/NAME.status, the GPUs' memory.used (MiB) every half second in $work/NAME.gpu_mib
part() {
  local name=$1 seconds=$2 sampler start
  shift 2
  echo "gpu_check: $name (at most $seconds s)"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$work/$name.gpu_mib" 2>/dev/null &
  sampler=$!
  start=$EPOCHREALTIME
  timeout --kill-after=10 "$seconds" "$@" >"$work/$name.log" 2>&1
  echo "$? $start $EPOCHREALTIME" >"$work/$name.status"
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null || true
}

part tests 90 "$PY" -m pytest -n 0 -q -p no:cacheprovider tests/test_device.py --junitxml="$work/tests.xml"

shopt -s nullglob
presets=(configs/save_*.toml)
preset_args=()
[ ${#presets[@]} -gt 0 ] && preset_args=(--presets "${presets[@]}")
part step_cost 120 "$PY" bench/step_cost.py --device cuda --modes remove --sparsities 0 0.9 --lengths 128 512 \
  "${preset_args[@]}" --json "$work/step_cost.json"

part quickstart 150 .venv/bin/fedhead run configs/quickstart.toml --rounds 3 --set device=cuda \
  --out "$work/runs" --name quickstart --quiet

bitsandbytes_installed=false
if ! "$PY" -c "import bitsandbytes" >/dev/null 2>&1; then
  part install_bitsandbytes 60 "$PY" -m pip install -q bitsandbytes
  bitsandbytes_installed=true
fi
part smollm2_4bit 150 .venv/bin/fedhead run configs/e2e_nlg.toml --rounds 1 --set device=cuda \
  --set model.load_in_4bit=true --out "$work/runs" --name smollm2_4bit --quiet

"$PY" bench/gpu_check_summary.py "$work" "$output" --bitsandbytes-installed "$bitsandbytes_installed"
